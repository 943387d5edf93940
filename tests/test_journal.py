"""The arrival journal's writer (bot/journal.py): what the long-connection process relies on."""

from __future__ import annotations

import sqlite3
import stat
import threading
from contextlib import closing
from pathlib import Path

import pytest

from bot.errors import StoreError
from bot.journal import ArrivalJournal


def rows(path: Path) -> list[tuple[str, str, float]]:
    with closing(sqlite3.connect(path)) as connection:
        query = "SELECT message_id, event, received_at FROM arrivals ORDER BY rowid"
        return [(row[0], row[1], row[2]) for row in connection.execute(query)]


def test_an_event_is_journaled_once_in_a_0600_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "bot.db.arrivals"
    journal = ArrivalJournal.open(path)
    assert journal.record("om_1", '{"event": 1}', 10.0, timeout_s=1)
    assert journal.record("om_1", '{"event": "again"}', 11.0, timeout_s=1)  # kept as it was
    journal.close()
    assert rows(path) == [("om_1", '{"event": 1}', 10.0)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_closed_journal_refuses_to_record_and_to_be_read(tmp_path: Path) -> None:
    journal = ArrivalJournal.open(tmp_path / "j")
    journal.close()
    assert not journal.record("om_1", "{}", 1.0, timeout_s=1)
    with pytest.raises(StoreError, match="closed"), journal.connection():
        pass


def test_a_record_gives_up_after_its_timeout_while_the_journal_is_held(tmp_path: Path) -> None:
    journal = ArrivalJournal.open(tmp_path / "j")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with journal.connection():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        assert not journal.record("om_1", "{}", 1.0, timeout_s=0.05)
    finally:
        release.set()
        holder.join()
    assert journal.record("om_1", "{}", 1.0, timeout_s=1)
    journal.close()


def test_a_journal_locked_by_another_writer_longer_than_its_busy_timeout_is_not_waited_for(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j"
    ArrivalJournal.open(path).close()
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process writing, as the store's clean-up
        journal = ArrivalJournal.open(path, busy_timeout_s=0.05)
        assert not journal.record("om_1", "{}", 1.0, timeout_s=1)
        other.execute("COMMIT")
        assert journal.record("om_1", "{}", 1.0, timeout_s=1)
        journal.close()
