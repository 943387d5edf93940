"""The long connection's own process (bot/feishu/ingress.py), end to end: `python -m bot run`.

The bot starts a process that holds the long connection, journals every message event and
acknowledges it; these tests freeze, kill and restart the two processes around messages and
check what Feishu saw (the ACKs), what the journal and the store hold, and what the user gets.

Slow suite (`make test-all`): each test starts the real bot process.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from bot.feishu.ingress import RESTARTS_PER_WINDOW
from tests.e2e_harness import USER_A, BotProcess, World, make_world

pytestmark = pytest.mark.slow


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def journaled(world: World) -> list[str]:
    path = world.workdir / "data" / "bot.db.arrivals"
    with closing(sqlite3.connect(path)) as connection:
        return [row[0] for row in connection.execute("SELECT message_id FROM arrivals")]


def the_long_connection_process(bot: BotProcess) -> int:
    """The pid of the bot's one child process (its long connection)."""
    children = bot.children()
    assert len(children) == 1, f"expected one long-connection process, found {children}"
    return children[0]


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie nobody reaped yet has ended too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_frozen_bot_still_acknowledges_and_journals_then_answers_once_thawed(
    world: World,
) -> None:
    bot = world.start_bot()
    the_long_connection_process(bot)
    bot.signal(signal.SIGSTOP)  # the answering process holds still, as under a heavy load
    try:
        message = world.send("p2p_text", text="are you there?", sender_open_id=USER_A)
        ack = world.fs.wait_for_ack_blocking(world.frame_of(message), timeout=10)
        assert ack.code == 200
        assert message in journaled(world)
        assert world.replies(message) == []
    finally:
        bot.signal(signal.SIGCONT)
    assert world.wait_for_final_reply(message) == "echo: are you there?"
    bot.wait_for_event("reply_sent")
    assert len(world.replies(message)) == 1
    assert bot.stop() == 0


def test_a_message_acknowledged_while_the_bot_was_frozen_and_then_killed_is_answered_once(
    world: World,
) -> None:
    bot = world.start_bot()
    bot.signal(signal.SIGSTOP)
    message = world.send("p2p_text", text="caught in the window", sender_open_id=USER_A)
    world.fs.wait_for_ack_blocking(world.frame_of(message), timeout=10)
    bot.kill()  # kill -9: the message was acknowledged, never accepted
    restarted = world.start_bot()
    assert world.wait_for_final_reply(message) == "echo: caught in the window"
    restarted.wait_for_event("reply_sent")
    assert restarted.stop() == 0
    # The next start finds the journaled event accepted already: dropped, not answered again.
    assert world.start_bot().stop() == 0
    assert journaled(world) == []
    assert len(world.replies(message)) == 1


def test_a_killed_bot_takes_its_long_connection_process_with_it(world: World) -> None:
    bot = world.start_bot()
    child = the_long_connection_process(bot)
    bot.kill()  # kill -9 leaves the child no chance to be told
    world.fs.wait_until_blocking(
        lambda: not world.fs.open_connections() or None, timeout=10, what="connection closed"
    )
    assert gone(child)


def test_a_stopped_bot_leaves_no_long_connection_process_behind(world: World) -> None:
    bot = world.start_bot()
    child = the_long_connection_process(bot)
    assert bot.stop() == 0
    assert gone(child)
    assert world.fs.open_connections() == []


def test_a_killed_long_connection_process_is_started_again_and_the_bot_keeps_answering(
    world: World,
) -> None:
    bot = world.start_bot()
    first = the_long_connection_process(bot)
    os.kill(first, signal.SIGKILL)
    (restarted,) = bot.wait_for_event("ingress_restarted")
    assert restarted["status"] == "killed by signal 9"
    bot.wait_for_event("feishu_reconnected")
    assert the_long_connection_process(bot) != first
    message = world.send("p2p_text", text="still there?", sender_open_id=USER_A)
    assert world.wait_for_final_reply(message) == "echo: still there?"
    bot.wait_for_event("reply_sent")
    assert bot.stop() == 0
    assert len(world.replies(message)) == 1
    assert "Traceback" not in bot.output


def test_what_a_dying_process_acknowledged_is_answered_once(world: World) -> None:
    bot = world.start_bot()
    child = the_long_connection_process(bot)
    bot.signal(signal.SIGSTOP)  # the bot cannot read what the process passes on
    try:
        message = world.send("p2p_text", text="just before the crash", sender_open_id=USER_A)
        world.fs.wait_for_ack_blocking(world.frame_of(message), timeout=10)
        os.kill(child, signal.SIGKILL)  # journaled, passed on and acknowledged, then killed
    finally:
        bot.signal(signal.SIGCONT)
    assert world.wait_for_final_reply(message) == "echo: just before the crash"
    bot.wait_for_event("ingress_restarted")
    bot.wait_for_event("feishu_reconnected")
    bot.wait_for_event("reply_sent")
    assert bot.stop() == 0
    assert len(world.replies(message)) == 1
    assert journaled(world) == []


def test_a_journal_that_cannot_be_read_after_a_restart_is_logged_and_the_bot_serves_on(
    world: World,
) -> None:
    bot = world.start_bot()
    first = world.send("p2p_text", text="before", sender_open_id=USER_A)
    assert world.wait_for_final_reply(first) == "echo: before"  # the journal exists now
    with closing(sqlite3.connect(world.workdir / "data" / "bot.db.arrivals")) as journal:
        journal.execute("DROP TABLE arrivals")  # the bot's replay cannot read it now
        journal.commit()
    os.kill(the_long_connection_process(bot), signal.SIGKILL)
    (failure,) = bot.wait_for_event("arrivals_not_replayed")
    assert "arrivals" in failure["error"]
    bot.wait_for_event("feishu_reconnected")
    message = world.send("p2p_text", text="after", sender_open_id=USER_A)
    assert world.wait_for_final_reply(message) == "echo: after"
    bot.wait_for_event("reply_sent", count=2)
    assert bot.stop() == 0
    assert len(world.replies(message)) == 1
    assert "Traceback" not in bot.output


def test_a_long_connection_process_that_keeps_dying_ends_the_bot_with_a_clear_error(
    world: World,
) -> None:
    bot = world.start_bot()
    for restarts in range(1, RESTARTS_PER_WINDOW + 1):
        os.kill(the_long_connection_process(bot), signal.SIGKILL)
        bot.wait_for_event("ingress_restarted", count=restarts)
        bot.wait_for_event("feishu_reconnected", count=restarts)
    os.kill(the_long_connection_process(bot), signal.SIGKILL)  # once more within the minute
    assert bot.wait(30) == 1
    assert (
        "long-connection process ended unexpectedly (killed by signal 9) and was not started "
        "again" in bot.output
    )
    assert "Traceback" not in bot.output


def test_sigterm_to_every_process_of_the_bot_stops_it_cleanly(world: World) -> None:
    # What `systemctl stop` and a terminal's Ctrl-C do: signal the whole group.
    bot = world.start_bot()
    child = the_long_connection_process(bot)
    os.kill(child, signal.SIGTERM)
    bot.signal(signal.SIGTERM)
    assert bot.wait(30) == 0
    assert "ended unexpectedly" not in bot.output
    assert gone(child)
