"""Persistence: the :class:`Store` protocol and the factory that builds one from settings."""

from __future__ import annotations

import time
from pathlib import Path

from bot.config import StoreSettings
from bot.errors import ConfigError
from bot.store.base import (
    InboxEntry,
    KeySource,
    KeyState,
    Store,
    StoredKey,
    Turn,
    TurnStatus,
    Usage,
    UsageRecord,
)
from bot.store.lock import InstanceLock, lock_holder
from bot.store.sqlite import SQLiteStore
from bot.timing import Clock

__all__ = [
    "InboxEntry",
    "InstanceLock",
    "KeySource",
    "KeyState",
    "SQLiteStore",
    "Store",
    "StoredKey",
    "Turn",
    "TurnStatus",
    "Usage",
    "UsageRecord",
    "create_store",
    "lock_holder",
]


def create_store(
    settings: StoreSettings, *, cwd: Path | None = None, clock: Clock = time.time
) -> Store:
    """Build the store named by ``store.url`` (not opened yet)."""
    if settings.url.startswith("sqlite:"):
        return SQLiteStore(settings.sqlite_path(cwd), clock=clock)
    scheme = settings.url.split("://", 1)[0]
    raise ConfigError(
        [
            f"store.url: {scheme}:// stores are not available in this version yet; "
            "use sqlite:///data/bot.db"
        ]
    )
