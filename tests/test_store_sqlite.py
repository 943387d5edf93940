"""The SQLite store: the shared contract plus file-level behaviour."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import parse_settings
from bot.errors import ConfigError, StoreError
from bot.store import SQLiteStore, create_store
from bot.store.sqlite import MIGRATIONS
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


async def test_the_running_bot_purges_expired_dedup_marks(
    store: SQLiteStore, clock: FakeClock
) -> None:
    from bot.feishu.runner import _purge_expired_marks

    await store.mark_seen("msg:old", ttl_s=10)
    await store.mark_seen("msg:fresh", ttl_s=1000)
    clock.advance(20)
    housekeeping = asyncio.create_task(_purge_expired_marks(store, every_s=3600))
    await asyncio.sleep(0)  # its first purge is queued on the store's single thread first
    assert await store.purge_expired() == 0
    assert await store.is_seen("msg:fresh")
    housekeeping.cancel()
