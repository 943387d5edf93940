"""bench/ack_floor.py and its SDK floor receiver measure what they say they measure.

The floor receiver (bench/_sdk_floor_bot.py) runs the real SDK against the fake Feishu; with
``--raw --journal`` it must journal every event before the ACK exactly as the bot's
long-connection process does, or the ``ws_journal`` row would not be that process's floor.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from bench._bots import CommandProcess, feishu_options
from bench._burst import _events, _questions, _send
from bench._fake_world import Scenario, fake_world

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _journaled(path: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(path)) as connection:
        query = "SELECT message_id, event FROM arrivals ORDER BY received_at, rowid"
        return [(row[0], row[1]) for row in connection.execute(query)]


def test_the_sdk_floor_receiver_journals_every_event_before_its_ack(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db.arrivals"
    with fake_world(Scenario(), feishu_limits=False) as world:
        fs = world.fs
        command = [sys.executable, "-m", "bench._sdk_floor_bot", *feishu_options(fs)]
        process = CommandProcess(tmp_path, [*command, "--raw", "--journal", str(journal)]).start()
        try:
            process.wait_for_event("bot_ready", timeout=60)
            fs.wait_for_connections_blocking(1, timeout=60)
            frames = _send(world, _events(fs, "t", _questions("t", 3)))
            message_ids = []
            for frame in frames:
                fs.wait_for_ack_blocking(frame, timeout=30)
                message_ids.append(fs.delivery(frame).message_id)
                # Journaled before the ACK left: the row is there as soon as the ACK is.
                assert message_ids[-1] in [m for m, _ in _journaled(journal)]
        finally:
            assert process.stop() == 0, process.output
    assert "arrival_not_journaled" not in process.output
    journaled = _journaled(journal)
    assert [message_id for message_id, _ in journaled] == message_ids
    assert all('"im.message.receive_v1"' in event for _, event in journaled)


def test_ack_floor_prints_every_measure_of_every_receiver_it_ran() -> None:
    receivers = ("reference", "sdk", "ws_journal")
    options = ["--concurrency", "3", "--bursts", "1", "--receivers", ",".join(receivers)]
    result = subprocess.run(
        [sys.executable, "bench/ack_floor.py", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    values = {
        name: float(value)
        for name, value, _unit in (
            line.split() for line in result.stdout.splitlines() if not line.startswith("#")
        )
    }
    measures = ("ack_p50", "ack_p99", "ack_p99_min", "ack_p99_max")
    expected = {f"ack_floor.{r}.c3.{m}" for r in receivers for m in measures}
    ratios = {f"ack_floor.{r}.c3.ack_p99_vs_reference" for r in receivers[1:]}
    assert set(values) == expected | ratios
    assert all(value > 0 for value in values.values())
