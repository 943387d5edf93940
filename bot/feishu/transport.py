"""How the answer path's REST calls reach Feishu: one kept-alive aiohttp pool.

A streaming answer makes a Feishu call per card update, and 200 answers at once make hundreds
of calls in flight. The SDK's async transport goes through httpx/httpcore: with a small
kept-alive pool almost every call then opens a new TCP (and, against the real Feishu, TLS)
connection, and with a large one httpcore's per-request pool scans dominate the CPU (measured
with ``bench/concurrency.py``, see ``bench/RESULTS.md``). :class:`AiohttpTransport` keeps one
``aiohttp`` session whose connector reuses connections without a fixed cap, and authenticates
with the tenant token the SDK's cache holds (kept fresh by
:class:`bot.feishu.token_keeper.TenantTokenKeeper`).

It returns the raw status, headers and body; :func:`bot.feishu.api.read_answer` reads them, so
Feishu's codes decide the retry and fallback rules, as they did through the SDK.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from bot import __version__


class TransportError(Exception):
    """The call did not get an answer (connection refused or cut, timeout, no token)."""


RawAnswer = tuple[int, dict[str, str], bytes]


class Transport(Protocol):
    """Sends one Feishu open-platform request with the app's tenant token."""

    async def request(
        self,
        method: str,
        uri: str,
        paths: Mapping[str, str],
        queries: Sequence[tuple[str, str]],
        body: Any,
    ) -> RawAnswer:
        """The answer's status, lower-cased headers and body; :class:`TransportError` when
        there is none."""

    async def aclose(self) -> None:
        """Release the connections."""


def _path(uri: str, paths: Mapping[str, str]) -> str:
    for name, value in paths.items():
        uri = uri.replace(f":{name}", quote(value, safe=""))
    return uri


class AiohttpTransport:
    """Feishu REST over one kept-alive aiohttp session (create and use it on one event loop).

    ``token`` returns the current tenant token (None when there is none yet); ``refresh``
    fetches one. Connections are reused across calls, as many as are in flight at once, and
    closed after ``keepalive_s`` idle.
    """

    def __init__(
        self,
        domain: str,
        token: Callable[[], str | None],
        refresh: Callable[[], Awaitable[None]],
        *,
        timeout_s: float,
        keepalive_s: float = 60.0,
    ) -> None:
        self._domain = domain.rstrip("/")
        self._token = token
        self._refresh = refresh
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=self._keepalive_s, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers={"User-Agent": f"feishu-gpt-bot/{__version__}"},
                json_serialize=lambda value: json.dumps(value, ensure_ascii=False),
            )
        return self._session

    async def _bearer(self) -> str:
        token = self._token()
        if token is None:
            await self._refresh()
            token = self._token()
        if token is None:
            raise TransportError("no tenant access token")
        return f"Bearer {token}"

    async def request(
        self,
        method: str,
        uri: str,
        paths: Mapping[str, str],
        queries: Sequence[tuple[str, str]],
        body: Any,
    ) -> RawAnswer:
        """Send the request; see :class:`Transport`."""
        headers = {"Authorization": await self._bearer()}
        try:
            async with self._open().request(
                method,
                self._domain + _path(uri, paths),
                params=list(queries) or None,
                json=body,
                headers=headers,
            ) as response:
                content = await response.read()
                answer_headers = {k.lower(): v for k, v in response.headers.items()}
                return response.status, answer_headers, content
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
