"""The store as the channel's ``DedupStore``, so its dedup marks survive restarts.

The channel calls ``seen``/``mark`` synchronously on its own background loop (lark-channel-bg).
The store is async and lives on the bot's loop, so each call is handed over to that loop; a
``seen`` that cannot be answered in time says "not seen" (the bot's own acceptance gate, a
single atomic store write, still stops a duplicate answer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from bot.logging import get_logger
from bot.store import Store

log = get_logger(__name__)


class StoreDedup:
    """``lark_oapi.channel.DedupStore`` backed by :class:`bot.store.Store`."""

    def __init__(
        self, store: Store, loop: asyncio.AbstractEventLoop, *, timeout_s: float = 2.0
    ) -> None:
        self._store = store
        self._loop = loop
        self._timeout_s = timeout_s

    def seen(self, key: str) -> bool:
        """Whether the channel marked ``key`` before (in this or an earlier run)."""
        future = asyncio.run_coroutine_threadsafe(self._store.is_seen(key), self._loop)
        try:
            return future.result(timeout=self._timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError, OSError) as exc:
            future.cancel()
            log.warning("dedup_lookup_failed", key=key, error=type(exc).__name__)
            return False

    def mark(self, key: str, ttl_seconds: int) -> None:
        """Remember ``key`` for ``ttl_seconds`` (written without waiting)."""
        asyncio.run_coroutine_threadsafe(self._store.mark_seen(key, float(ttl_seconds)), self._loop)
