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

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson

from bot import __version__


class TransportError(Exception):
    """The call did not get an answer (connection refused or cut, timeout, no token)."""


class AnswerTooLarge(TransportError):
    """The answer's body is larger than the caller allows (``limit`` bytes)."""

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__(f"the answer is larger than {limit} bytes")
        self.size = size  # None when the server did not say (the body ran over while read)
        self.limit = limit


@dataclass(frozen=True)
class Upload:
    """A multipart form: text ``fields`` and one file (``file_field`` = ``data``)."""

    fields: Mapping[str, str]
    file_field: str
    file_name: str
    data: bytes
    content_type: str = "application/octet-stream"


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
        *,
        upload: Upload | None = None,
        max_bytes: int | None = None,
    ) -> RawAnswer:
        """The answer's status, lower-cased headers and body; :class:`TransportError` when
        there is none. ``upload`` is sent as a multipart form instead of the JSON ``body``; a
        successful answer over ``max_bytes`` raises :class:`AnswerTooLarge` without being read
        whole."""

    async def aclose(self) -> None:
        """Release the connections."""


def _form(upload: Upload) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in upload.fields.items():
        form.add_field(name, value)
    form.add_field(
        upload.file_field, upload.data, filename=upload.file_name, content_type=upload.content_type
    )
    return form


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, refused before reading when its length is declared too large, and as soon as
    it runs over ``limit`` otherwise."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise AnswerTooLarge(declared, limit)
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(None, limit)
    return bytes(body)


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
        *,
        upload: Upload | None = None,
        max_bytes: int | None = None,
    ) -> RawAnswer:
        """Send the request; see :class:`Transport`."""
        headers = {"Authorization": await self._bearer()}
        payload: dict[str, Any] = {}
        if upload is not None:
            payload["data"] = _form(upload)
        elif body is not None:  # orjson: several times cheaper than aiohttp's json.dumps
            payload["data"] = orjson.dumps(body)
            headers["Content-Type"] = "application/json; charset=utf-8"
        try:
            async with self._open().request(
                method,
                self._domain + _path(uri, paths),
                params=list(queries) or None,
                headers=headers,
                **payload,
            ) as response:
                answer_headers = {k.lower(): v for k, v in response.headers.items()}
                if max_bytes is None or response.status >= 300:
                    content = await response.read()
                else:
                    content = await _read_at_most(response, max_bytes)
                return response.status, answer_headers, content
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from None

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
