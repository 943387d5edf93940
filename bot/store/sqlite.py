"""The embedded SQLite store (the default): one file, WAL mode, mode 0600, versioned schema.

Writes run on one dedicated thread that owns the writing connection, so coroutines from any
event loop (the bot's, or the Feishu SDK's own) await them without blocking and writes never
interleave. Reads run on the thread that asks, with that thread's own connection (see
:meth:`SQLiteStore._run_read`); the arrival journal is a file of its own
(:mod:`bot.journal`), written before each ACK by the bot's long-connection process. The
schema version lives in ``PRAGMA user_version``; :data:`MIGRATIONS` upgrades it (a migration,
once released, is never edited: changes go into a new one).

Writes that belong together (accepting a message, recording a delivered answer, setting an inbox
row aside, pruning old turns with the sent messages of their time) run in one ``BEGIN IMMEDIATE``
transaction, so a crash keeps all of them or none. Accepts that wait for the store's thread
together are written in one such transaction (:meth:`SQLiteStore.accept_message`).

With a :class:`bot.store.crypto.KeyCipher` (``BOT_SECRET_KEY`` set) API key secrets are written
sealed, and :meth:`SQLiteStore.open` seals the plain ones it finds in place, then rewrites the
file (``VACUUM``) and empties the WAL, so no old plain copy is left behind in free space.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from bot.errors import StoreError
from bot.journal import INSERT_ARRIVAL, ArrivalJournal, connect_journal, journal_path
from bot.logging import get_logger
from bot.store.base import (
    AttachmentKind,
    HeldAttachment,
    InboxEntry,
    KeySource,
    KeyState,
    Role,
    SentMessage,
    StoredKey,
    Turn,
    TurnStatus,
    Usage,
    UsageRecord,
)
from bot.store.crypto import KeyCipher, is_sealed, open_secret, seal_secret
from bot.timing import Clock

T = TypeVar("T")

log = get_logger(__name__)

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        created_at REAL NOT NULL,
        tokens INTEGER NOT NULL
    );
    CREATE INDEX turns_by_conversation ON turns (conversation_id, id);
    CREATE TABLE processed (
        key TEXT PRIMARY KEY,
        expires_at REAL NOT NULL
    );
    CREATE INDEX processed_by_expiry ON processed (expires_at);
    CREATE TABLE inbox (
        message_id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        secret TEXT NOT NULL,
        masked TEXT NOT NULL,
        owner TEXT NOT NULL,
        source TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        disabled_by TEXT,
        until REAL,
        requests INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        last_used_at REAL,
        created_at REAL NOT NULL
    );
    CREATE TABLE usage (
        day TEXT NOT NULL,
        user_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        PRIMARY KEY (day, user_id, key_id)
    );
    """,
    # 2: cut answers, the gateway's delivery record, inbox rows set aside, pruning by age,
    #    the arrival journal
    """
    ALTER TABLE turns ADD COLUMN status TEXT NOT NULL DEFAULT 'complete'
        CHECK (status IN ('complete', 'cut'));
    CREATE INDEX turns_by_age ON turns (created_at);
    ALTER TABLE inbox ADD COLUMN delivery TEXT;
    CREATE TABLE inbox_rejected (
        message_id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        received_at REAL NOT NULL,
        reason TEXT NOT NULL,
        moved_at REAL NOT NULL
    );
    CREATE TABLE arrivals (
        message_id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    """,
    # 3: preferences (persona, model), the bot's sent messages (to read back a quoted answer)
    """
    CREATE TABLE preferences (
        scope TEXT NOT NULL,
        subject TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (scope, subject)
    );
    CREATE TABLE sent_messages (
        message_id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX sent_messages_by_age ON sent_messages (created_at);
    """,
    # 4: images drawn per usage row, attachments held for the next question
    """
    ALTER TABLE usage ADD COLUMN images INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE held_attachments (
        attachment_id INTEGER PRIMARY KEY AUTOINCREMENT,
        holder TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('image', 'file')),
        name TEXT NOT NULL,
        mime TEXT NOT NULL,
        content BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX held_attachments_by_holder ON held_attachments (holder, created_at);
    """,
)

RECENT_PAGE = 50
"""Turns fetched at a time by :meth:`SQLiteStore.load_recent_turns` while it walks back."""

_INSERT_TURN = (
    "INSERT INTO turns (conversation_id, role, content, created_at, tokens, status)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_TURN_COLUMNS = "conversation_id, role, content, created_at, tokens, status"
_ADD_USAGE = (
    "INSERT INTO usage (day, user_id, key_id, requests, prompt_tokens, completion_tokens, images)"
    " VALUES (?, ?, ?, 1, ?, ?, ?) ON CONFLICT (day, user_id, key_id) DO UPDATE SET"
    " requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens,"
    " images = images + excluded.images"
)
_INSERT_SENT = (
    "INSERT OR REPLACE INTO sent_messages (message_id, conversation_id, content, created_at)"
    " VALUES (?, ?, ?, ?)"
)
_USAGE_COLUMNS = "day, user_id, key_id, requests, prompt_tokens, completion_tokens, images"
_INSERT_INBOX_ROWS = (
    "INSERT OR IGNORE INTO inbox (message_id, conversation_id, payload, received_at, delivery)"
    " VALUES "
)
_INSERT_INBOX = _INSERT_INBOX_ROWS + "(?, ?, ?, ?, ?)"
_HELD_MARKS = "SELECT key FROM processed WHERE expires_at > ? AND key IN ({})"
_UPSERT_MARKS = (
    "INSERT INTO processed (key, expires_at) VALUES {}"
    " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
)
#: the most accepts written in one transaction (5 parameters each: SQLite before 3.32 allows 999)
ACCEPT_BATCH = 100


@dataclass(frozen=True)
class _WaitingAccept:
    """An accept waiting for the store's thread; ``accepted`` is its result."""

    entry: InboxEntry
    now: float
    ttl_s: float
    accepted: Future[bool]


def _accepted_mark(message_id: str) -> str:
    """The dedup mark's key of an accepted message (table ``processed``)."""
    return f"accepted:{message_id}"


def _marks(rows: int, columns: int) -> str:
    """``rows`` placeholders (a bare ``?`` each), or rows of ``columns`` ones in parentheses."""
    if columns == 1:
        return ", ".join(["?"] * rows)
    row = f"({', '.join(['?'] * columns)})"
    return ", ".join([row] * rows)


def _turn_row(turn: Turn) -> tuple[Any, ...]:
    return (
        turn.conversation_id,
        turn.role,
        turn.content,
        turn.created_at,
        turn.tokens,
        turn.status,
    )


def _turn_of(row: sqlite3.Row) -> Turn:
    return Turn(
        conversation_id=row["conversation_id"],
        role=cast(Role, row["role"]),
        content=row["content"],
        created_at=row["created_at"],
        tokens=row["tokens"],
        status=cast(TurnStatus, row["status"]),
    )


def _inbox_row(entry: InboxEntry) -> tuple[Any, ...]:
    return (
        entry.message_id,
        entry.conversation_id,
        entry.payload,
        entry.received_at,
        entry.delivery,
    )


class SQLiteStore:
    """:class:`bot.store.base.Store` on a local SQLite file.

    ``cipher`` seals API key secrets (see :mod:`bot.store.crypto`); without it they are stored
    plain, and sealed ones cannot be read.
    """

    def __init__(
        self, path: Path | str, *, clock: Clock = time.time, cipher: KeyCipher | None = None
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._cipher = cipher
        self._executor: ThreadPoolExecutor | None = None
        self._journal: ArrivalJournal | None = None
        # Reads run on the thread that asks, each thread with a connection of its own (WAL lets
        # them read while the store thread writes): see _run_read.
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._on_reader = threading.local()
        self._connection: sqlite3.Connection | None = None
        # Accepts waiting for the store's thread, and whether it has been asked to write them.
        self._accepts: list[_WaitingAccept] = []
        self._accepts_lock = threading.Lock()
        self._accept_queued = False

    # ---- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file (0600) and its directory, switch to WAL and migrate the schema.

        With a cipher, plain key secrets are sealed in place; a :class:`StoreError` when the keys
        already sealed were sealed with another ``BOT_SECRET_KEY`` (nothing is changed then).
        """
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            await self._run(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def close(self) -> None:
        """Close the connections and stop the store's thread."""
        self._close_readers()
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        executor.shutdown(wait=True)

    @property
    def schema_version(self) -> int:
        """The schema version the code migrates to."""
        return len(MIGRATIONS)

    def _open_sync(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(self.path, 0o600)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the SQLite store at {self.path}: {exc}") from None
        connection.row_factory = sqlite3.Row
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=5000")
            self._migrate(connection)
            if self._cipher is not None:
                self._seal_plain_keys(connection, self._cipher)
            journal = self._open_journal(connection)
        except (sqlite3.Error, OSError) as exc:
            connection.close()
            raise StoreError(f"cannot prepare the SQLite store at {self.path}: {exc}") from None
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._journal = ArrivalJournal(journal)

    @property
    def journal_path(self) -> Path:
        """The arrival journal's own database file, next to the store's."""
        return journal_path(self.path)

    def _open_journal(self, main: sqlite3.Connection) -> sqlite3.Connection:
        """Open (create, 0600) the arrival journal and move in what an older version journaled
        in the main database."""
        journal = connect_journal(self.journal_path)
        try:
            older = main.execute("SELECT message_id, event, received_at FROM arrivals").fetchall()
            if older:
                journal.executemany(INSERT_ARRIVAL, [tuple(row) for row in older])
                main.execute("DELETE FROM arrivals")
        except BaseException:
            journal.close()
            raise
        return journal

    def _migrate(self, connection: sqlite3.Connection) -> None:
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this bot knows "
                f"({len(MIGRATIONS)}): upgrade the bot or use another store"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            connection.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")

    def _seal_plain_keys(self, connection: sqlite3.Connection, cipher: KeyCipher) -> None:
        """Encrypt the secrets stored plain (written before ``BOT_SECRET_KEY`` was set)."""
        rows = connection.execute("SELECT key_id, secret FROM api_keys").fetchall()
        plain = [(row["key_id"], row["secret"]) for row in rows if not is_sealed(row["secret"])]
        for row in rows:  # mixing two keys in one table would leave some keys unreadable
            if is_sealed(row["secret"]):
                cipher.open(row["secret"])
        if not plain:
            return
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(
                "UPDATE api_keys SET secret = ? WHERE key_id = ?",
                [(cipher.seal(secret), key_id) for key_id, secret in plain],
            )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        # Every earlier save of a key may have left a plain copy in the file's free space (SQLite
        # zeroes freed space only when built with SECURE_DELETE, which depends on the platform):
        # VACUUM rewrites the file from the live rows alone and the checkpoint empties the WAL.
        connection.execute("VACUUM")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.info("keys_encrypted", count=len(plain), store=str(self.path))

    def _close_sync(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _close_readers(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for connection in readers:
            connection.close()

    async def _run_read(self, function: Callable[..., T], *args: Any) -> T:
        """Run a function that only reads, here on the calling thread (its ``_db()`` is this
        thread's reading connection).

        Every read is an indexed lookup of a few rows, tens of microseconds, and in WAL mode a
        reader never waits for a writer. Sent to a thread instead, a read cost three hand-overs
        of the GIL to and from a busy event loop: at 200 concurrent answers, with four reads
        before each question reaches the model, those queued for about a second
        (``bench/concurrency.py``).
        """
        if self._executor is None:
            raise StoreError("the store is not open")
        self._on_reader.active = True
        try:
            return function(*args)
        finally:
            self._on_reader.active = False

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreError("the store is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    def _db(self) -> sqlite3.Connection:
        if getattr(self._on_reader, "active", False):
            return self._reader_db()
        if self._connection is None:
            raise StoreError("the store is not open")
        return self._connection

    def _reader_db(self) -> sqlite3.Connection:
        """The calling thread's reading connection, opened on first use."""
        connection: sqlite3.Connection | None = getattr(self._on_reader, "connection", None)
        if connection is not None and connection in self._readers:
            return connection
        try:
            # check_same_thread=False only so that close() may close it from another thread
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the SQLite store at {self.path}: {exc}") from None
        with self._readers_lock:
            self._readers.append(connection)
        self._on_reader.connection = connection
        return connection

    def _write(self, sql: str, parameters: tuple[Any, ...] = ()) -> int:
        cursor = self._db().execute(sql, parameters)
        return cursor.rowcount

    def _read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self._db().execute(sql, parameters).fetchall())

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; on any error ``ROLLBACK``, so nothing is written.

        A database error becomes a :class:`StoreError` naming ``what`` was being done.
        """
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:  # some errors (a full disk) have rolled it back already
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot {what} in {self.path}: {exc}") from exc
            raise

    # ---- history ---------------------------------------------------------------------------

    async def append_turn(self, turn: Turn) -> None:
        """Add a turn at the end of its conversation."""
        await self._run(self._write, _INSERT_TURN, _turn_row(turn))

    async def load_turns(self, conversation_id: str) -> list[Turn]:
        """All turns of a conversation, oldest first."""
        rows = await self._run_read(
            self._read,
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE conversation_id = ? ORDER BY id",  # noqa: S608
            (conversation_id,),
        )
        return [_turn_of(row) for row in rows]

    async def load_recent_turns(self, conversation_id: str, max_tokens: int) -> list[Turn]:
        """The newest turns that fit ``max_tokens``, oldest first; reads no further back."""
        return await self._run_read(self._recent_sync, conversation_id, max_tokens)

    def _recent_sync(self, conversation_id: str, max_tokens: int) -> list[Turn]:
        # Walks the (conversation_id, id) index backwards a page at a time: the cursor steps
        # lazily, so closing it early leaves the older turns unread.
        cursor = self._db().execute(
            f"SELECT {_TURN_COLUMNS} FROM turns"  # noqa: S608
            " WHERE conversation_id = ? ORDER BY id DESC",
            (conversation_id,),
        )
        newest_first: list[Turn] = []
        budget = max_tokens
        try:
            while page := cursor.fetchmany(RECENT_PAGE):
                for row in page:
                    if row["tokens"] > budget:
                        return newest_first[::-1]
                    budget -= row["tokens"]
                    newest_first.append(_turn_of(row))
        finally:
            cursor.close()
        return newest_first[::-1]

    async def clear_conversation(self, conversation_id: str) -> int:
        """Forget a conversation's turns; return how many were removed."""
        return await self._run(
            self._write, "DELETE FROM turns WHERE conversation_id = ?", (conversation_id,)
        )

    async def prune_turns(self, older_than: float) -> int:
        """Delete every turn and sent message created before ``older_than``; return how many
        turns."""
        return await self._run(self._prune_sync, older_than)

    def _prune_sync(self, older_than: float) -> int:
        with self._transaction("prune old turns") as db:
            removed = db.execute("DELETE FROM turns WHERE created_at < ?", (older_than,)).rowcount
            db.execute("DELETE FROM sent_messages WHERE created_at < ?", (older_than,))
        return removed

    # ---- dedup -----------------------------------------------------------------------------

    async def mark_seen(self, key: str, ttl_s: float) -> bool:
        """Record ``key`` for ``ttl_s`` seconds; True when it was not already recorded (atomic)."""
        now = self._clock()
        changed = await self._run(
            self._write,
            "INSERT INTO processed (key, expires_at) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
            " WHERE processed.expires_at <= ?",
            (key, now + ttl_s, now),
        )
        return changed > 0

    async def is_seen(self, key: str) -> bool:
        """Whether ``key`` is recorded and not expired."""
        rows = await self._run_read(
            self._read,
            "SELECT 1 FROM processed WHERE key = ? AND expires_at > ?",
            (key, self._clock()),
        )
        return bool(rows)

    async def purge_expired(self) -> int:
        """Drop expired dedup records; return how many."""
        return await self._run(
            self._write, "DELETE FROM processed WHERE expires_at <= ?", (self._clock(),)
        )

    # ---- inbox -----------------------------------------------------------------------------

    async def accept_message(self, entry: InboxEntry, ttl_s: float) -> bool:
        """Atomically mark the message answered-once and record it in the inbox.

        Accepts that arrive while the store's thread is busy wait for it together and are then
        written in one transaction of a few statements (:meth:`_accept_waiting`), each
        still all or nothing: under a burst of hundreds of messages every accept was a
        transaction of its own on one thread, and the card writes of answers already under way
        queued behind all of them.
        """
        executor = self._executor
        if executor is None:
            raise StoreError("the store is not open")
        waiting = _WaitingAccept(entry, self._clock(), ttl_s, Future())
        with self._accepts_lock:
            self._accepts.append(waiting)
            submit, self._accept_queued = not self._accept_queued, True
        if submit:
            self._submit_accepts(executor)
        return await asyncio.wrap_future(waiting.accepted)

    def _submit_accepts(self, executor: ThreadPoolExecutor | None) -> None:
        """Queue :meth:`_accept_waiting` on the store's thread, or fail the waiting accepts
        when the store has been closed."""
        try:
            if executor is None:
                raise RuntimeError("closed")
            executor.submit(self._accept_waiting)
        except RuntimeError:
            with self._accepts_lock:
                waiting, self._accepts = self._accepts, []
                self._accept_queued = False
            for accept in waiting:
                if accept.accepted.set_running_or_notify_cancel():
                    accept.accepted.set_exception(StoreError("the store is not open"))

    def _accept_waiting(self) -> None:
        """On the store's thread: write up to :data:`ACCEPT_BATCH` waiting accepts together,
        and queue itself again behind the other writes if more are waiting."""
        with self._accepts_lock:
            taken = self._accepts[:ACCEPT_BATCH]
            del self._accepts[:ACCEPT_BATCH]
            more = bool(self._accepts)
            self._accept_queued = more
        batch = [a for a in taken if a.accepted.set_running_or_notify_cancel()]
        if batch:
            self._settle_accepts(batch)
        if more:
            self._submit_accepts(self._executor)

    def _settle_accepts(self, batch: list[_WaitingAccept]) -> None:
        try:
            fresh = self._accept_batch_sync(batch)
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].accepted.set_exception(exc)
                return
            # Whatever failed is found alone: one by one, each accept fails or holds on its own.
            for accept in batch:
                try:
                    accept.accepted.set_result(self._accept_batch_sync([accept])[0])
                except BaseException as one:
                    accept.accepted.set_exception(one)
            return
        for accept, is_fresh in zip(batch, fresh, strict=True):
            accept.accepted.set_result(is_fresh)

    def _accept_batch_sync(self, batch: list[_WaitingAccept]) -> list[bool]:
        """One transaction for ``batch``: which messages were new. A message id seen twice in
        the batch is new at most the first time; a mark counts as expired at the latest of
        the batch's times."""
        now = max(accept.now for accept in batch)
        firsts: dict[str, _WaitingAccept] = {}
        for accept in batch:
            firsts.setdefault(_accepted_mark(accept.entry.message_id), accept)
        with self._transaction("accept a message") as db:
            # Only placeholders are put into these statements; every value is a parameter.
            held = {
                row[0]
                for row in db.execute(_HELD_MARKS.format(_marks(len(firsts), 1)), (now, *firsts))
            }
            new = {key: accept for key, accept in firsts.items() if key not in held}
            if new:
                db.execute(
                    _UPSERT_MARKS.format(_marks(len(new), 2)),
                    [v for key, a in new.items() for v in (key, a.now + a.ttl_s)],
                )
                db.execute(
                    _INSERT_INBOX_ROWS + _marks(len(new), 5),
                    [v for a in new.values() for v in _inbox_row(a.entry)],
                )
        accepted = {id(a) for a in new.values()}
        return [id(accept) in accepted for accept in batch]

    # ---- arrival journal -------------------------------------------------------------------

    async def arrivals(self) -> list[tuple[str, str]]:
        """Journaled events never accepted, oldest first: ``(message_id, event)``."""
        return await self._run(self._arrivals_sync)

    def _arrivals_sync(self) -> list[tuple[str, str]]:
        with self._journaled() as journal:
            rows = journal.execute(
                "SELECT message_id, event FROM arrivals ORDER BY received_at, rowid"
            ).fetchall()
            accepted = {
                row[0]
                for row in rows
                if self._db()
                .execute("SELECT 1 FROM processed WHERE key = ?", (_accepted_mark(row[0]),))
                .fetchone()
            }
            journal.executemany(
                "DELETE FROM arrivals WHERE message_id = ?", [(each,) for each in accepted]
            )
        return [(row[0], row[1]) for row in rows if row[0] not in accepted]

    async def forget_arrivals(self, message_ids: Sequence[str] = (), *, before: float = 0) -> int:
        """Drop journaled events by id, and those received before ``before``."""

        def forget() -> int:
            with self._journaled() as journal:
                removed = journal.execute(
                    "DELETE FROM arrivals WHERE received_at < ?", (before,)
                ).rowcount
                for message_id in message_ids:
                    removed += journal.execute(
                        "DELETE FROM arrivals WHERE message_id = ?", (message_id,)
                    ).rowcount
            return removed

        return await self._run(forget)

    def _journaled(self) -> AbstractContextManager[sqlite3.Connection]:
        if self._journal is None:
            raise StoreError("the store is not open")
        return self._journal.connection()

    async def inbox_add(self, entry: InboxEntry) -> None:
        """Record a message awaiting its answer (idempotent per message id)."""
        await self._run(self._write, _INSERT_INBOX, _inbox_row(entry))

    async def inbox_remove(self, message_id: str) -> None:
        """The message was answered (or refused): forget it."""
        await self._run(self._write, "DELETE FROM inbox WHERE message_id = ?", (message_id,))

    async def inbox_list(self) -> list[InboxEntry]:
        """Every message still awaiting an answer, oldest first, with its ``delivery``."""
        rows = await self._run_read(
            self._read,
            "SELECT message_id, conversation_id, payload, received_at, delivery FROM inbox"
            " ORDER BY received_at, rowid",
        )
        return [
            InboxEntry(
                message_id=row["message_id"],
                conversation_id=row["conversation_id"],
                payload=row["payload"],
                received_at=row["received_at"],
                delivery=row["delivery"],
            )
            for row in rows
        ]

    async def inbox_set_delivery(self, message_id: str, delivery: str | None) -> None:
        """Replace the ``delivery`` record of an inbox entry; nothing when it is not there."""
        await self._run(
            self._write,
            "UPDATE inbox SET delivery = ? WHERE message_id = ?",
            (delivery, message_id),
        )

    async def inbox_reject(self, message_id: str, reason: str) -> None:
        """Move an inbox entry to ``inbox_rejected`` with ``reason``; nothing when it is absent."""
        await self._run(self._reject_sync, message_id, reason, self._clock())

    def _reject_sync(self, message_id: str, reason: str, now: float) -> None:
        with self._transaction("set an inbox message aside") as db:
            db.execute(
                "INSERT OR REPLACE INTO inbox_rejected"
                " (message_id, conversation_id, payload, received_at, reason, moved_at)"
                " SELECT message_id, conversation_id, payload, received_at, ?, ? FROM inbox"
                " WHERE message_id = ?",
                (reason, now, message_id),
            )
            db.execute("DELETE FROM inbox WHERE message_id = ?", (message_id,))

    async def complete_message(
        self,
        message_ids: Sequence[str],
        turns: Sequence[Turn],
        usage: UsageRecord | None,
        sent: Sequence[SentMessage] = (),
        release: Sequence[int] = (),
    ) -> None:
        """Append ``turns``, count ``usage``, record ``sent``, drop the held attachments
        ``release`` names, clear ``message_ids`` from the inbox: atomically."""
        await self._run(
            self._complete_sync,
            list(message_ids),
            list(turns),
            usage,
            list(sent),
            list(release),
        )

    def _complete_sync(
        self,
        message_ids: list[str],
        turns: list[Turn],
        usage: UsageRecord | None,
        sent: list[SentMessage],
        release: list[int],
    ) -> None:
        with self._transaction("record the answer") as db:
            for turn in turns:
                db.execute(_INSERT_TURN, _turn_row(turn))
            db.executemany(
                _INSERT_SENT,
                [(m.message_id, m.conversation_id, m.content, m.created_at) for m in sent],
            )
            if usage is not None:
                db.execute(
                    _ADD_USAGE,
                    (
                        usage.day,
                        usage.user_id,
                        usage.key_id,
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        usage.images,
                    ),
                )
            db.executemany(
                "DELETE FROM held_attachments WHERE attachment_id = ?", [(i,) for i in release]
            )
            db.executemany(
                "DELETE FROM inbox WHERE message_id = ?", [(each,) for each in message_ids]
            )

    async def find_sent(self, message_id: str) -> SentMessage | None:
        """The bot's own message with this id, or None when it is not recorded."""
        rows = await self._run_read(
            self._read,
            "SELECT message_id, conversation_id, content, created_at FROM sent_messages"
            " WHERE message_id = ?",
            (message_id,),
        )
        return SentMessage(**dict(rows[0])) if rows else None

    # ---- keys ------------------------------------------------------------------------------

    async def save_key(self, key: StoredKey) -> None:
        """Insert or replace a key record (its secret sealed when the store has a cipher)."""
        await self._run(self._save_key_sync, key)

    def _save_key_sync(self, key: StoredKey) -> None:
        self._write(
            "INSERT OR REPLACE INTO api_keys (key_id, secret, masked, owner, source, state,"
            " reason, disabled_by, until, requests, failures, last_used_at, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key.key_id,
                seal_secret(key.secret, self._cipher),
                key.masked,
                key.owner,
                key.source,
                key.state,
                key.reason,
                key.disabled_by,
                key.until,
                key.requests,
                key.failures,
                key.last_used_at,
                key.created_at,
            ),
        )

    async def load_keys(self) -> list[StoredKey]:
        """Every key record, oldest first; :class:`StoreError` when sealed ones cannot be read."""
        return await self._run(self._load_keys_sync)

    def _load_keys_sync(self) -> list[StoredKey]:
        rows = self._read("SELECT * FROM api_keys ORDER BY created_at, key_id")
        return [
            StoredKey(
                key_id=row["key_id"],
                secret=open_secret(row["secret"], self._cipher),
                masked=row["masked"],
                owner=row["owner"],
                source=cast(KeySource, row["source"]),
                state=cast(KeyState, row["state"]),
                reason=row["reason"],
                disabled_by=row["disabled_by"],
                until=row["until"],
                requests=row["requests"],
                failures=row["failures"],
                last_used_at=row["last_used_at"],
                created_at=row["created_at"],
            )
            for row in rows
        ]

    async def delete_key(self, key_id: str) -> bool:
        """Remove a key; True when it existed."""
        return await self._run(self._write, "DELETE FROM api_keys WHERE key_id = ?", (key_id,)) > 0

    # ---- usage -----------------------------------------------------------------------------

    async def add_usage(
        self,
        day: str,
        user_id: str,
        key_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        images: int = 0,
    ) -> None:
        """Count one request, its tokens and the images it drew for (day, user, key)."""
        await self._run(
            self._write,
            _ADD_USAGE,
            (day, user_id, key_id, prompt_tokens, completion_tokens, images),
        )

    # ---- held attachments ------------------------------------------------------------------

    async def hold_attachment(self, attachment: HeldAttachment) -> int:
        """Keep ``attachment`` for the holder's next question; return its id."""

        def insert() -> int:
            with self._transaction("hold the attachment") as db:
                cursor = db.execute(
                    "INSERT INTO held_attachments (holder, kind, name, mime, content, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        attachment.holder,
                        attachment.kind,
                        attachment.name,
                        attachment.mime,
                        attachment.content,
                        attachment.created_at,
                    ),
                )
                return int(cursor.lastrowid or 0)

        return await self._run(insert)

    async def held_attachments(self, holder: str, since: float) -> list[HeldAttachment]:
        """``holder``'s attachments from ``since`` on, oldest first."""
        rows = await self._run_read(
            self._read,
            "SELECT attachment_id, holder, kind, name, mime, content, created_at"
            " FROM held_attachments WHERE holder = ? AND created_at >= ?"
            " ORDER BY created_at, attachment_id",
            (holder, since),
        )
        return [
            HeldAttachment(
                holder=row["holder"],
                kind=cast(AttachmentKind, row["kind"]),
                name=row["name"],
                mime=row["mime"],
                content=bytes(row["content"]),
                created_at=row["created_at"],
                attachment_id=row["attachment_id"],
            )
            for row in rows
        ]

    async def drop_held(self, before: float) -> int:
        """Forget the held attachments created before ``before``; return how many."""
        return await self._run(
            self._write, "DELETE FROM held_attachments WHERE created_at < ?", (before,)
        )

    async def usage_for_day(self, day: str) -> list[Usage]:
        """Every usage row of a day."""
        rows = await self._run_read(
            self._read,
            f"SELECT {_USAGE_COLUMNS} FROM usage"  # noqa: S608
            " WHERE day = ? ORDER BY user_id, key_id",
            (day,),
        )
        return [Usage(**dict(row)) for row in rows]

    async def usage_between(
        self, first_day: str, last_day: str, user_id: str | None = None
    ) -> list[Usage]:
        """Every usage row with ``first_day <= day <= last_day`` (of ``user_id`` when given),
        ordered by day, user, key."""
        rows = await self._run_read(
            self._read,
            f"SELECT {_USAGE_COLUMNS} FROM usage"  # noqa: S608
            " WHERE day BETWEEN ? AND ? AND (? IS NULL OR user_id = ?)"
            " ORDER BY day, user_id, key_id",
            (first_day, last_day, user_id, user_id),
        )
        return [Usage(**dict(row)) for row in rows]

    # ---- preferences -----------------------------------------------------------------------

    async def get_preference(self, scope: str, subject: str) -> str | None:
        """The value stored for ``subject`` in ``scope``, or None."""
        rows = await self._run_read(
            self._read,
            "SELECT value FROM preferences WHERE scope = ? AND subject = ?",
            (scope, subject),
        )
        return str(rows[0]["value"]) if rows else None

    async def set_preference(self, scope: str, subject: str, value: str | None) -> None:
        """Insert or replace ``subject``'s value in ``scope``; None deletes it."""
        if value is None:
            await self._run(
                self._write,
                "DELETE FROM preferences WHERE scope = ? AND subject = ?",
                (scope, subject),
            )
            return
        await self._run(
            self._write,
            "INSERT OR REPLACE INTO preferences (scope, subject, value, updated_at)"
            " VALUES (?, ?, ?, ?)",
            (scope, subject, value, self._clock()),
        )

    async def preferences(self, scope: str) -> dict[str, str]:
        """Every subject of ``scope`` with its value."""
        rows = await self._run_read(
            self._read,
            "SELECT subject, value FROM preferences WHERE scope = ? ORDER BY subject",
            (scope,),
        )
        return {row["subject"]: row["value"] for row in rows}
