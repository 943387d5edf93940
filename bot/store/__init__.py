"""Persistence: the :class:`Store` protocol and the factory that builds one from settings."""

from __future__ import annotations

import time
from pathlib import Path

from bot.config import StoreSettings
from bot.errors import ConfigError
from bot.store.base import (
    AttachmentKind,
    HeldAttachment,
    InboxEntry,
    KeySource,
    KeyState,
    SentMessage,
    Store,
    StoredKey,
    Turn,
    TurnStatus,
    Usage,
    UsageRecord,
)
from bot.store.crypto import SECRET_KEY_ENV, KeyCipher, secret_key_from_env
from bot.store.lock import InstanceLock, lock_holder
from bot.store.sqlite import SQLiteStore
from bot.timing import Clock

__all__ = [
    "SECRET_KEY_ENV",
    "AttachmentKind",
    "HeldAttachment",
    "InboxEntry",
    "InstanceLock",
    "KeyCipher",
    "KeySource",
    "KeyState",
    "SQLiteStore",
    "SentMessage",
    "Store",
    "StoredKey",
    "Turn",
    "TurnStatus",
    "Usage",
    "UsageRecord",
    "create_store",
    "lock_holder",
    "secret_key_from_env",
]


def create_store(
    settings: StoreSettings,
    *,
    cwd: Path | None = None,
    clock: Clock = time.time,
    secret_key: str | None = None,
) -> Store:
    """Build the store named by ``store.url`` (not opened yet).

    ``secret_key`` is the value of ``BOT_SECRET_KEY`` (read at the edge with
    :func:`secret_key_from_env`): when given, API key secrets are stored encrypted with it
    (:mod:`bot.store.crypto`). A value too short to be safe is a :class:`ConfigError`.
    """
    cipher = KeyCipher.from_secret(secret_key) if secret_key else None
    if settings.url.startswith("sqlite:"):
        return SQLiteStore(settings.sqlite_path(cwd), clock=clock, cipher=cipher)
    scheme = settings.url.split("://", 1)[0]
    raise ConfigError(
        [
            f"store.url: {scheme}:// stores are not available in this version yet; "
            "use sqlite:///data/bot.db"
        ]
    )
