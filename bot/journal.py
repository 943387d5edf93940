"""The arrival journal: a SQLite file of its own next to the store (``bot.db.arrivals``).

Every ``im.message.receive_v1`` event is written here before its ACK leaves, so an event that
Feishu will not redeliver is never lost between the ACK and the store's acceptance write (see
:mod:`bot.feishu.gateway`). Two writers use it: the long-connection process
(:mod:`bot.feishu.ingress_child`), which only inserts, and the store (:class:`SQLiteStore`), which
reads what was never accepted and deletes what was. Being a file of its own, an insert never
waits for the main database's write lock, however many answers are being saved.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from bot.errors import StoreError

INSERT_ARRIVAL: Final = (
    "INSERT OR IGNORE INTO arrivals (message_id, event, received_at) VALUES (?, ?, ?)"
)
#: the longest an event's ACK waits for the journal before it is acknowledged unjournaled
ARRIVAL_TIMEOUT_S: Final = 0.5


def journal_path(store_path: Path) -> Path:
    """The arrival journal's file for the store at ``store_path``."""
    return store_path.with_name(store_path.name + ".arrivals")


def connect_journal(path: Path, *, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """Open (create, 0600) the journal at ``path`` in WAL mode, with its table.

    The connection autocommits and may be used from any one thread at a time.
    """
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    journal = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        journal.execute("PRAGMA journal_mode=WAL")
        journal.execute("PRAGMA synchronous=NORMAL")
        journal.execute(f"PRAGMA busy_timeout={round(busy_timeout_s * 1000)}")
        journal.execute(
            "CREATE TABLE IF NOT EXISTS arrivals (message_id TEXT PRIMARY KEY,"
            " event TEXT NOT NULL, received_at REAL NOT NULL)"
        )
    except BaseException:
        journal.close()
        raise
    return journal


class ArrivalJournal:
    """One connection to the journal, shared by threads under one lock."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection: sqlite3.Connection | None = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, busy_timeout_s: float = 5.0) -> ArrivalJournal:
        """Open (create) the journal at ``path``; see :func:`connect_journal`."""
        return cls(connect_journal(path, busy_timeout_s=busy_timeout_s))

    def record(self, message_id: str, event: str, received_at: float, *, timeout_s: float) -> bool:
        """Blocking: journal a raw event; False if that failed, took longer than ``timeout_s``
        to get the connection, or the journal is closed. A message id already journaled is
        kept as it was."""
        if not self._lock.acquire(timeout=timeout_s):
            return False
        try:
            if self._connection is None:
                return False
            self._connection.execute(INSERT_ARRIVAL, (message_id, event, received_at))
        except sqlite3.Error:
            return False
        finally:
            self._lock.release()
        return True

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """The connection, held for the block; a :class:`StoreError` once closed."""
        with self._lock:
            if self._connection is None:
                raise StoreError("the arrival journal is closed")
            yield self._connection

    def close(self) -> None:
        """Close the connection; later records return False."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
