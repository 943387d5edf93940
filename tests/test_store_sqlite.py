"""The SQLite store: the shared contract plus file-level behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import parse_settings
from bot.errors import ConfigError, StoreError
from bot.journal import ArrivalJournal
from bot.store import HeldAttachment, InboxEntry, SentMessage, SQLiteStore, Usage, create_store
from bot.store.sqlite import MIGRATIONS
from tests.helpers import holding_the_store_thread
from tests.store_contract import FakeClock, StoreContract, turn


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SQLiteStore]:
    sqlite_store = SQLiteStore(tmp_path / "data" / "bot.db", clock=clock)
    await sqlite_store.open()
    yield sqlite_store
    await sqlite_store.close()


class TestSQLiteStoreContract(StoreContract):
    """Runs the contract against SQLite."""


async def test_open_creates_the_directory_and_a_0600_file_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "bot.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append_turn(turn("c", "user", "x"))
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_an_empty_existing_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    path.touch(mode=0o644)
    store = SQLiteStore(path)
    await store.open()
    assert await store.load_turns("c") == []
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_history_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    first = SQLiteStore(path)
    await first.open()
    await first.append_turn(turn("c", "user", "remember me"))
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    assert [t.content for t in await second.load_turns("c")] == ["remember me"]
    await second.close()


async def test_a_newer_schema_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    store = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer than this bot knows"):
        await store.open()


async def test_a_version_1_database_is_migrated_and_its_rows_read_back(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(MIGRATIONS[0])
        connection.execute("PRAGMA user_version = 1")
        connection.execute(
            "INSERT INTO turns (conversation_id, role, content, created_at, tokens)"
            " VALUES ('c', 'user', 'from the old bot', 1.0, 4)"
        )
        connection.execute(
            "INSERT INTO inbox (message_id, conversation_id, payload, received_at)"
            " VALUES ('om_old', 'c', '{}', 2.0)"
        )
    connection.close()

    store = SQLiteStore(path)
    await store.open()
    assert await store.load_turns("c") == [turn("c", "user", "from the old bot", 1.0, tokens=4)]
    assert (await store.load_turns("c"))[0].status == "complete"
    assert await store.inbox_list() == [InboxEntry("om_old", "c", "{}", 2.0, delivery=None)]
    await store.inbox_set_delivery("om_old", '{"card": "om_c"}')
    assert (await store.inbox_list())[0].delivery == '{"card": "om_c"}'
    await store.close()

    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        plan = connection.execute(
            "EXPLAIN QUERY PLAN DELETE FROM turns WHERE created_at < 5"
        ).fetchall()
        assert "turns_by_age" in str([tuple(row) for row in plan])
    connection.close()


async def test_a_version_2_database_is_migrated_to_the_latest_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bot.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(MIGRATIONS[0])
        connection.executescript(MIGRATIONS[1])
        connection.execute("PRAGMA user_version = 2")
        connection.execute(
            "INSERT INTO turns (conversation_id, role, content, created_at, tokens, status)"
            " VALUES ('c', 'assistant', 'an answer from version 2', 1.0, 5, 'cut')"
        )
        connection.execute(
            "INSERT INTO usage (day, user_id, key_id, requests, prompt_tokens, completion_tokens)"
            " VALUES ('2026-11-25', 'ou_1', 'k1', 3, 30, 9)"
        )
    connection.close()

    store = SQLiteStore(path)
    await store.open()
    assert await store.load_turns("c") == [
        turn("c", "assistant", "an answer from version 2", 1.0, tokens=5, status="cut")
    ]
    assert await store.usage_between("2026-11-01", "2026-11-30") == [
        Usage("2026-11-25", "ou_1", "k1", requests=3, prompt_tokens=30, completion_tokens=9)
    ]
    # The new tables are there and usable.
    await store.set_preference("persona", "c", "You are terse.")
    assert await store.preferences("persona") == {"c": "You are terse."}
    sent = SentMessage("om_bot", "c", "an answer", created_at=2.0)
    await store.complete_message([], [], None, [sent])
    assert await store.find_sent("om_bot") == sent
    await store.close()

    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        plan = connection.execute(
            "EXPLAIN QUERY PLAN DELETE FROM sent_messages WHERE created_at < 5"
        ).fetchall()
        assert "sent_messages_by_age" in str([tuple(row) for row in plan])
    connection.close()


async def test_a_rejected_inbox_row_is_kept_with_its_reason_and_time(
    store: SQLiteStore, clock: FakeClock
) -> None:
    await store.accept_message(InboxEntry("om_1", "c1", "garbled", received_at=5.0), 3600)
    clock.advance(60)
    await store.inbox_reject("om_1", "payload is not valid JSON")
    with sqlite3.connect(store.path) as connection:
        rows = connection.execute("SELECT * FROM inbox_rejected").fetchall()
    connection.close()
    assert rows == [("om_1", "c1", "garbled", 5.0, "payload is not valid JSON", clock.now)]


async def test_load_recent_turns_does_not_read_a_long_history_in_full(
    store: SQLiteStore,
) -> None:
    history = [turn("long", "user", f"m{index:05}", index, tokens=10) for index in range(10_000)]
    await store.complete_message([], history, None)
    connection = store._reader_db()  # reads run on the reader connection
    steps = 0

    def count_step() -> int:
        nonlocal steps
        steps += 1
        return 0  # 0 = go on

    connection.set_progress_handler(count_step, 100)
    recent = await store.load_recent_turns("long", 100)
    recent_steps, steps = steps, 0
    everything = await store.load_turns("long")
    connection.set_progress_handler(None, 0)

    assert recent == history[-10:]
    assert len(everything) == 10_000
    assert recent_steps * 20 < steps


async def test_using_a_closed_store_is_a_clear_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "bot.db")
    with pytest.raises(StoreError, match="not open"):
        await store.load_turns("c")


def test_factory_builds_sqlite_relative_to_the_working_directory(tmp_path: Path) -> None:
    settings = parse_settings({"store": {"url": "sqlite:///data/x.db"}})
    store = create_store(settings.store, cwd=tmp_path)
    assert isinstance(store, SQLiteStore)
    assert store.path == tmp_path / "data" / "x.db"


def test_factory_refuses_a_backend_this_version_lacks() -> None:
    settings = parse_settings({"store": {"url": "redis://127.0.0.1:6379/0"}})
    with pytest.raises(ConfigError, match=r"store\.url: redis:// stores are not available"):
        create_store(settings.store)


class PruneWatcher:
    """The store, plus an event set once a round of the bot's housekeeping is done."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self.pruned = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def prune_turns(self, older_than: float) -> int:
        return await self._store.prune_turns(older_than)

    async def drop_held(self, before: float) -> int:
        removed = await self._store.drop_held(before)  # the last step of a round
        self.pruned.set()
        return removed


async def test_the_running_bot_purges_expired_dedup_marks_old_turns_and_expired_attachments(
    store: SQLiteStore, clock: FakeClock
) -> None:
    from bot.feishu.runner import _housekeeping

    day = 86_400.0
    await store.mark_seen("msg:old", ttl_s=10)
    await store.mark_seen("msg:fresh", ttl_s=1000)
    await store.append_turn(turn("c", "user", "four months ago", clock.now - 120 * day))
    await store.append_turn(turn("c", "user", "last week", clock.now - 7 * day))
    await store.hold_attachment(HeldAttachment("h", "image", "old", "image/png", b"o", clock.now))
    clock.advance(20)
    await store.hold_attachment(HeldAttachment("h", "image", "new", "image/png", b"n", clock.now))
    watcher = PruneWatcher(store)

    housekeeping = asyncio.create_task(
        _housekeeping(watcher, retention_days=90, hold_minutes=0.2, every_s=3600, clock=clock)
    )
    await watcher.pruned.wait()
    housekeeping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await housekeeping

    assert await store.purge_expired() == 0  # the housekeeping did it
    assert await store.is_seen("msg:fresh")
    assert [t.content for t in await store.load_turns("c")] == ["last week"]
    assert [h.name for h in await store.held_attachments("h", since=0)] == ["new"]


async def test_reads_do_not_wait_behind_the_store_thread(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    await store.append_turn(turn("c", "user", "hello"))
    with holding_the_store_thread(store):  # busy, as under a burst of answers
        assert [t.content for t in await asyncio.wait_for(store.load_turns("c"), 5)] == ["hello"]
    await store.close()


async def test_each_thread_reads_with_its_own_connection_and_close_closes_them_all(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    await store.append_turn(turn("c", "user", "hello"))

    def read_on_another_thread() -> list[str]:
        return [t.content for t in asyncio.run(store.load_turns("c"))]

    assert await asyncio.to_thread(read_on_another_thread) == ["hello"]
    assert [t.content for t in await store.load_turns("c")] == ["hello"]
    readers = list(store._readers)
    assert len(readers) == 2  # one per thread that read
    await store.close()
    for connection in readers:
        with pytest.raises(sqlite3.ProgrammingError):  # closed
            connection.execute("SELECT 1")
    with pytest.raises(StoreError, match="not open"):
        await store.load_turns("c")


async def test_the_arrival_journal_does_not_wait_behind_the_store_thread(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    journal = ArrivalJournal.open(store.journal_path)  # the long-connection process's
    with holding_the_store_thread(store):  # busy, as under a burst of answers
        assert journal.record("om_1", '{"event": 1}', 1.0, timeout_s=2)
    journal.close()
    assert await store.arrivals() == [("om_1", '{"event": 1}')]
    await store.close()


async def test_the_journal_is_a_file_of_its_own_and_takes_over_older_entries(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bot.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # what an older version journaled
        db.execute("INSERT INTO arrivals VALUES ('om_old', '{\"old\": 1}', 5.0)")
        db.commit()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert store.journal_path == tmp_path / "bot.db.arrivals"
        assert stat.S_IMODE(store.journal_path.stat().st_mode) == 0o600
        journal = ArrivalJournal.open(store.journal_path)
        assert journal.record("om_new", "{}", 6.0, timeout_s=1)
        journal.close()
        assert await store.arrivals() == [("om_old", '{"old": 1}'), ("om_new", "{}")]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM arrivals").fetchone() == (0,)


# ---- accepts waiting for the store's thread are written together -----------------------------


def _entry(message_id: str) -> InboxEntry:
    return InboxEntry(message_id, f"conv-{message_id}", f"payload {message_id}", received_at=1.0)


def _count_transactions(store: SQLiteStore) -> list[str]:
    """The ``BEGIN IMMEDIATE`` statements the store's writing connection runs from now on."""
    begun: list[str] = []
    assert store._connection is not None
    store._connection.set_trace_callback(
        lambda sql: begun.append(sql) if sql == "BEGIN IMMEDIATE" else None
    )
    return begun


async def _queued_accepts(store: SQLiteStore, ids: list[str]) -> list[asyncio.Task[bool]]:
    """Start an accept for each id while the store's thread is busy; return once all wait."""
    tasks = [asyncio.create_task(store.accept_message(_entry(i), 3600)) for i in ids]
    await asyncio.sleep(0)  # one turn of the loop: each task runs up to its wait
    assert len(store._accepts) == len(ids)
    return tasks


async def test_accepts_waiting_for_the_store_thread_are_written_in_one_transaction(
    store: SQLiteStore,
) -> None:
    assert await store.accept_message(_entry("om_old"), 3600)
    begun = _count_transactions(store)
    ids = [f"om_{n}" for n in range(30)] + ["om_3", "om_old", "om_7"]
    with holding_the_store_thread(store):  # busy, as under a burst
        tasks = await _queued_accepts(store, ids)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert results == [True] * 30 + [False, False, False]  # repeats and the old one: no
    assert len(begun) == 1
    inbox = {entry.message_id: entry for entry in await store.inbox_list()}
    assert sorted(inbox) == sorted([f"om_{n}" for n in range(30)] + ["om_old"])
    assert inbox["om_12"].payload == "payload om_12"
    assert inbox["om_12"].conversation_id == "conv-om_12"
    # The dedup marks hold like those of accepts written one by one.
    assert not await store.accept_message(_entry("om_29"), 3600)


async def test_a_mark_expired_is_accepted_again_in_a_batch(
    store: SQLiteStore, clock: FakeClock
) -> None:
    assert await store.accept_message(_entry("om_a"), 10)
    await store.inbox_remove("om_a")
    clock.now += 11
    with holding_the_store_thread(store):
        tasks = await _queued_accepts(store, ["om_a", "om_b"])
    assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [True, True]
    assert sorted(e.message_id for e in await store.inbox_list()) == ["om_a", "om_b"]


async def test_more_accepts_than_one_batch_take_more_transactions(store: SQLiteStore) -> None:
    from bot.store.sqlite import ACCEPT_BATCH

    begun = _count_transactions(store)
    ids = [f"om_{n}" for n in range(ACCEPT_BATCH + 5)]
    with holding_the_store_thread(store):
        tasks = await _queued_accepts(store, ids)
    assert all(await asyncio.wait_for(asyncio.gather(*tasks), 5))
    assert len(begun) == 2
    assert len(await store.inbox_list()) == ACCEPT_BATCH + 5


async def test_an_accept_cancelled_while_it_waits_is_not_written(store: SQLiteStore) -> None:
    with holding_the_store_thread(store):
        first, cancelled, last = await _queued_accepts(store, ["om_1", "om_2", "om_3"])
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    assert await asyncio.wait_for(asyncio.gather(first, last), 5) == [True, True]
    assert sorted(e.message_id for e in await store.inbox_list()) == ["om_1", "om_3"]
    assert await store.accept_message(_entry("om_2"), 3600)  # never marked


async def test_a_batch_that_fails_is_written_one_by_one(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = store._accept_batch_sync

    def failing_batch(batch: list[Any]) -> list[bool]:
        # Batches of several fail, and so does om_0 alone; one by one the others are written.
        if len(batch) > 1 or batch[0].entry.message_id == "om_0":
            raise StoreError("cannot accept a message: disk I/O error")
        return write(batch)

    monkeypatch.setattr(store, "_accept_batch_sync", failing_batch)
    with pytest.raises(StoreError, match="disk I/O error"):  # alone: its own error
        await store.accept_message(_entry("om_0"), 3600)
    with holding_the_store_thread(store):
        tasks = await _queued_accepts(store, ["om_1", "om_2", "om_1"])
    assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [True, True, False]
    assert sorted(e.message_id for e in await store.inbox_list()) == ["om_1", "om_2"]


async def test_accepts_waiting_when_the_store_closes_are_written_first(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "bot.db")
    await store.open()
    with holding_the_store_thread(store):
        tasks = await _queued_accepts(store, ["om_1", "om_2"])
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)
    assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [True, True]
    await closing
    with pytest.raises(StoreError, match="not open"):
        await store.accept_message(_entry("om_3"), 3600)
    reopened = SQLiteStore(tmp_path / "bot.db")
    await reopened.open()
    assert sorted(e.message_id for e in await reopened.inbox_list()) == ["om_1", "om_2"]
    await reopened.close()
