"""One kept-alive HTTP client per event loop for the Feishu SDK's async REST calls.

lark-oapi 1.7.x's ``Transport.aexecute`` opens a new ``httpx.AsyncClient()`` for every call and
closes it afterwards: each call pays ~18 ms of CPU on the calling loop (building an SSL context)
and, against the real Feishu, a fresh TCP + TLS handshake. A streaming answer makes a call per
card update. The SDK has no hook for its HTTP client, so this module substitutes the ``httpx``
name that its transport module uses with a shim whose ``AsyncClient()`` lends a long-lived client
(one per event loop, since an httpx client belongs to the loop it runs on) and does not close it.
Everything else of ``httpx`` is passed through unchanged. Pinned by
``tests/test_feishu_http_pool.py`` and the end-to-end suite.
"""

from __future__ import annotations

import asyncio
import types
import weakref
from typing import Any

import httpx


class _LentClient:
    """``async with`` support that lends a client and closes it only if it was made for it."""

    def __init__(self, client: httpx.AsyncClient, *, owned: bool) -> None:
        self._client = client
        self._owned = owned

    async def __aenter__(self) -> httpx.AsyncClient:
        return self._client

    async def __aexit__(self, *exc_info: object) -> None:
        if self._owned:
            await self._client.aclose()


class HttpxShim(types.ModuleType):
    """Stands in for the ``httpx`` module inside the SDK's transport module."""

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__("httpx")
        self._real = real
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def AsyncClient(self, *args: Any, **kwargs: Any) -> _LentClient:
        """The shared client of the running loop, created on first use."""
        if args or kwargs:  # a caller with its own settings gets its own client, as before
            return _LentClient(self._real.AsyncClient(*args, **kwargs), owned=True)
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            client = self._real.AsyncClient(
                limits=httpx.Limits(max_keepalive_connections=10, keepalive_expiry=60)
            )
            self._clients[loop] = client
        return _LentClient(client, owned=False)

    async def aclose(self) -> None:
        """Close the running loop's shared client (at shutdown)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


def install() -> HttpxShim:
    """Make the SDK's async transport reuse connections; idempotent. Returns the shim."""
    from lark_oapi.core.http import transport

    current = getattr(transport, "httpx", None)
    if isinstance(current, HttpxShim):
        return current
    shim = HttpxShim(httpx)
    transport.httpx = shim
    return shim
