"""Faults on the answer path, end to end: the real bot process between the fakes, faults injected.

Each test names the fault it injects and asserts what the user sees in Feishu and what the
store holds afterwards (read straight from the bot's SQLite file). Slow suite (`make test-all`).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.chat.media import VISION_OFF_TEXT
from tests.e2e_harness import USER_A, World, make_world
from tests.fakes.openai_server import Reply
from tests.helpers import BOT_COMMAND, bot_environment

pytestmark = pytest.mark.slow

DELAYED = "_(Sorry for the delay: I was restarting when you sent this.)_"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def db(world: World) -> sqlite3.Connection:
    connection = sqlite3.connect(world.workdir / "data" / "bot.db")
    connection.row_factory = sqlite3.Row
    return connection


def journal(world: World) -> sqlite3.Connection:
    """The arrival journal: a database file of its own next to the store's."""
    return sqlite3.connect(world.workdir / "data" / "bot.db.arrivals")


def history(world: World, conversation: str = f"p2p:{USER_A}") -> list[tuple[str, str]]:
    with db(world) as connection:
        rows = connection.execute(
            "SELECT role, content FROM turns WHERE conversation_id = ? ORDER BY id",
            (conversation,),
        ).fetchall()
    return [(row["role"], row["content"]) for row in rows]


def inbox(world: World) -> list[str]:
    with db(world) as connection:
        rows = connection.execute("SELECT message_id FROM inbox ORDER BY rowid").fetchall()
    return [row["message_id"] for row in rows]


def prompts(world: World) -> list[list[str]]:
    return [[m["content"] for m in r.messages][1:] for r in world.llm.requests]


def final_card_text(world: World, message_id: str) -> str:
    (reply,) = world.replies(message_id)
    assert reply.card_id is not None
    card = world.fs.card(reply.card_id)
    assert card.closed
    return card.text


# ---- 1. one failed REST call no longer loses the answer --------------------------------------


def test_a_500_on_card_creation_still_delivers_the_whole_answer_once(world: World) -> None:
    world.fs.fail("card_create", 1, "internal error", http_status=500, times=1)
    bot = world.start_bot()
    message = world.send("p2p_text", text="first question", sender_open_id=USER_A)
    assert world.wait_for_final_reply(message) == "echo: first question"
    bot.wait_for_event("reply_sent")
    assert final_card_text(world, message) == "echo: first question"
    assert history(world) == [("user", "first question"), ("assistant", "echo: first question")]
    assert inbox(world) == []


def test_cardkit_refused_answers_in_a_plain_card_and_warns_once(world: World) -> None:
    world.fs.fail("card_create", "no_permission_cardkit", times=None)
    bot = world.start_bot()
    first = world.send("p2p_text", text="one", sender_open_id=USER_A)
    world.wait_for_final_reply(first, containing="echo: one")
    second = world.send("p2p_text", text="two", sender_open_id=USER_A)
    world.wait_for_final_reply(second, containing="echo: two")
    bot.wait_for_event("reply_sent", count=2)
    for message in (first, second):
        (reply,) = world.replies(message)
        assert reply.msg_type == "interactive"
    (warning,) = bot.events("feishu_scope_missing")
    assert warning["scope"] == "cardkit:card:write"
    assert "Task exception was never retrieved" not in bot.output
    assert history(world) == [
        ("user", "one"),
        ("assistant", "echo: one"),
        ("user", "two"),
        ("assistant", "echo: two"),
    ]
    assert bot.stop() == 0
    world.start_bot()  # nothing is left to answer again
    assert [r.last_user_text for r in world.llm.requests] == ["one", "two"]
    assert len(history(world)) == 4


# ---- 2. order survives a failure -------------------------------------------------------------


def test_a_failing_delivery_in_the_middle_keeps_the_conversation_in_order(world: World) -> None:
    bot = world.start_bot()
    held = world.llm.hold_next()
    a = world.send("p2p_text", text="A", sender_open_id=USER_A)
    held.wait_arrived_blocking(10)
    b_event = world.fs.build_event("p2p_text", text="B", sender_open_id=USER_A)
    b = b_event["event"]["message"]["message_id"]
    # B's replies fail for a while (its card, then the text fallback, then one redelivery)
    world.fs.fail(f"/open-apis/im/v1/messages/{b}/reply", 1, "internal", http_status=500, times=9)
    world.feishu.deliver(b_event)
    c = world.send("p2p_text", text="C", sender_open_id=USER_A)
    held.release()
    for message, text in ((a, "A"), (b, "B"), (c, "C")):
        assert f"echo: {text}" in world.wait_for_final_reply(message, containing="echo:")
    bot.wait_for_event("reply_redelivered")
    assert [r.last_user_text for r in world.llm.requests] == ["A", "B", "C"]
    assert prompts(world)[-1] == ["A", "echo: A", "B", "echo: B", "C"]
    bot.wait_for_event("reply_sent", count=3)
    assert history(world) == [
        ("user", "A"),
        ("assistant", "echo: A"),
        ("user", "B"),
        ("assistant", "echo: B"),
        ("user", "C"),
        ("assistant", "echo: C"),
    ]
    assert inbox(world) == []


def test_a_reply_feishu_refuses_for_good_does_not_block_the_next_message(world: World) -> None:
    bot = world.start_bot()
    gone_event = world.fs.build_event("p2p_text", text="recalled at once", sender_open_id=USER_A)
    gone = gone_event["event"]["message"]["message_id"]
    world.fs.fail(f"/open-apis/im/v1/messages/{gone}/reply", "message_recalled", times=None)
    world.feishu.deliver(gone_event)
    after = world.send("p2p_text", text="next", sender_open_id=USER_A)
    assert world.wait_for_final_reply(after) == "echo: next"
    bot.wait_for_event("reply_undeliverable")
    bot.wait_for_event("reply_sent")
    assert world.replies(gone) == []
    assert history(world) == [("user", "next"), ("assistant", "echo: next")]


# ---- 3. the end of an answer is never lost ---------------------------------------------------


def test_failed_final_card_updates_send_the_answer_as_a_message(world: World) -> None:
    world.fs.fail("card_batch_update", 230099, "card content failed", times=None)
    world.fs.fail("card_element_content", 230099, "card content failed", times=None)
    bot = world.start_bot()
    message = world.send("p2p_text", text="the end matters", sender_open_id=USER_A)
    bot.wait_for_event("reply_sent")
    replies = world.replies(message)
    assert [r.msg_type for r in replies] == ["interactive", "text"]
    assert world.fs.message_text(replies[1].message_id) == "echo: the end matters"
    assert world.fs.card(replies[0].card_id or "").closed
    assert history(world)[-1] == ("assistant", "echo: the end matters")


def test_rate_limited_card_updates_still_end_with_the_whole_answer(tmp_path: Path) -> None:
    for world in make_world(tmp_path, chat={"stream_update_ms": 50}):
        world.llm.default.reply = " ".join(f"word{n}" for n in range(60))
        world.llm.default.chunk_size = 8
        world.fs.fail(
            "card_element_content",
            "rate_limited",
            times=3,
            headers={"x-ogw-ratelimit-reset": "1"},
        )
        bot = world.start_bot()
        message = world.send("p2p_text", text="many words", sender_open_id=USER_A)
        bot.wait_for_event("reply_sent")
        assert final_card_text(world, message) == world.llm.default.reply


# ---- 4. a failed delivery is retried while running -------------------------------------------


def test_a_reply_that_fails_for_a_while_is_delivered_when_feishu_recovers(world: World) -> None:
    bot = world.start_bot()
    world.fs.fail("message_reply", 1, "internal error", http_status=500, times=9)
    message = world.send("p2p_text", text="please arrive", sender_open_id=USER_A)
    bot.wait_for_event("reply_redelivered", timeout=60)
    assert world.fs.reply_texts(message) == ["echo: please arrive"]
    assert "offline" not in bot.output
    bot.wait_for_event("reply_sent")
    assert inbox(world) == []
    assert history(world)[-1] == ("assistant", "echo: please arrive")


# ---- 5. kill -9 mid-answer -------------------------------------------------------------------


def test_killed_mid_answer_the_restart_finishes_the_same_card(world: World) -> None:
    first_run = world.start_bot()
    held = world.llm.hold_next(after_chunks=1)
    message = world.send("p2p_text", text="are you still there?", sender_open_id=USER_A)
    held.wait_arrived_blocking(10)
    world.fs.wait_for_calls_blocking("card_element_content", 1, timeout=10)
    first_run.kill()  # kill -9: the card is left streaming
    held.release()
    world.start_bot()
    world.bots[-1].wait_for_event("reply_sent")
    (reply,) = world.replies(message)  # one reply: the first card, finished in place
    card = world.fs.card(reply.card_id or "")
    assert card.closed
    assert card.text == f"{DELAYED}\n\necho: are you still there?"
    assert history(world) == [
        ("user", "are you still there?"),
        ("assistant", "echo: are you still there?"),
    ]
    assert inbox(world) == []


def test_every_acknowledged_message_is_already_in_the_store(world: World) -> None:
    world.start_bot()
    held = world.llm.hold_next()
    message = world.send("p2p_text", text="journal me", sender_open_id=USER_A)
    world.fs.wait_for_ack_blocking(world.frame_of(message))
    # The ACK left only after the journal write: the message is journaled, or already accepted.
    with journal(world) as connection:
        journaled = connection.execute(
            "SELECT 1 FROM arrivals WHERE message_id = ?", (message,)
        ).fetchall()
    with db(world) as connection:
        accepted = connection.execute(
            "SELECT 1 FROM inbox WHERE message_id = ?", (message,)
        ).fetchall()
    assert journaled or accepted
    held.release()
    assert world.wait_for_final_reply(message) == "echo: journal me"


def test_a_message_acknowledged_but_not_yet_accepted_when_killed_is_answered(
    world: World,
) -> None:
    bot = world.start_bot()
    assert bot.stop() == 0
    # What kill -9 leaves when it strikes between the ACK and the inbox write.
    event = world.fs.build_event("p2p_text", text="caught in the window", sender_open_id=USER_A)
    message = event["event"]["message"]["message_id"]
    with journal(world) as connection:
        connection.execute(
            "INSERT INTO arrivals (message_id, event, received_at) VALUES (?, ?, 1)",
            (message, json.dumps(event)),
        )
    bot = world.start_bot()
    assert world.wait_for_final_reply(message) == "echo: caught in the window"
    bot.wait_for_event("reply_sent")
    assert bot.stop() == 0
    with journal(world) as connection:  # replayed, accepted, cleared from the journal
        assert connection.execute("SELECT COUNT(*) FROM arrivals").fetchone()[0] == 0
    assert inbox(world) == []


# ---- 6. a second process on the same store ---------------------------------------------------


def test_a_second_bot_on_the_same_store_refuses_to_start_naming_the_first(world: World) -> None:
    first = world.start_bot()
    assert first.process is not None
    second = subprocess.run(
        [*BOT_COMMAND, "run", "--config", str(world.settings_path)],
        cwd=world.workdir,
        env=bot_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert f"in use by another running bot (pid {first.process.pid}" in errors[0]
    assert "Traceback" not in second.stderr
    message = world.send("p2p_text", text="still one bot", sender_open_id=USER_A)
    assert world.wait_for_final_reply(message) == "echo: still one bot"
    assert len(world.replies(message)) == 1


# ---- 7. shutdown keeps its promises ----------------------------------------------------------


def test_sigterm_with_a_queue_keeps_every_message_for_the_next_start(tmp_path: Path) -> None:
    for world in make_world(tmp_path, feishu={"shutdown_grace_s": 0}):
        bot = world.start_bot()
        held = world.llm.hold_next(after_chunks=1)
        messages = [
            world.send("p2p_text", text=text, sender_open_id=USER_A)
            for text in ("first", "second", "third")
        ]
        held.wait_arrived_blocking(10)
        bot.signal(signal.SIGTERM)
        assert bot.wait(timeout=30) == 0
        held.release()
        assert sorted(inbox(world)) == sorted(messages)
        assert history(world) == []
        assert [r.last_user_text for r in world.llm.requests] == ["first"]  # nothing new began
        world.start_bot()
        world.bots[-1].wait_for_event("reply_sent", count=3)
        for message, text in zip(messages, ("first", "second", "third"), strict=True):
            assert final_card_text(world, message) == f"{DELAYED}\n\necho: {text}"
        assert [r.last_user_text for r in world.llm.requests][1:] == ["first", "second", "third"]
        assert [content for _, content in history(world)] == [
            "first",
            "echo: first",
            "second",
            "echo: second",
            "third",
            "echo: third",
        ]
        assert inbox(world) == []


def sigterm_is_caught(pid: int) -> bool:
    """Whether the process installed a SIGTERM handler (Linux: /proc/PID/status SigCgt)."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_while_starting_exits_cleanly(world: World) -> None:
    process = subprocess.Popen(
        [*BOT_COMMAND, "run", "--config", str(world.settings_path), "--json-logs"],
        cwd=world.workdir,
        env=bot_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The interpreter itself starts first; from the bot's first line on, SIGTERM is a clean
    # stop. Send it as soon as that holds: the bot is still importing, far from ready.
    deadline = time.monotonic() + 20
    while not sigterm_is_caught(process.pid):
        assert time.monotonic() < deadline, "the bot never installed its SIGTERM handler"
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "bot_ready" not in stdout


# ---- 9. bad data is contained ----------------------------------------------------------------


def test_an_unreadable_inbox_row_is_moved_aside_and_the_bot_starts(world: World) -> None:
    bot = world.start_bot()
    assert bot.stop() == 0
    with db(world) as connection:
        connection.execute(
            "INSERT INTO inbox (message_id, conversation_id, payload, received_at)"
            " VALUES ('om_poison', 'p2p:x', '{\"unexpected\": true}', 1)"
        )
    bot = world.start_bot()
    (record,) = bot.events("inbox_entry_unreadable")
    assert record["message_id"] == "om_poison"
    assert inbox(world) == []
    with db(world) as connection:
        (moved,) = connection.execute("SELECT message_id FROM inbox_rejected").fetchall()
    assert moved["message_id"] == "om_poison"
    message = world.send("p2p_text", text="still working?", sender_open_id=USER_A)
    assert world.wait_for_final_reply(message) == "echo: still working?"


def test_a_lone_surrogate_is_cleaned_not_dropped(world: World) -> None:
    world.start_bot()
    event = world.fs.build_event("p2p_text", text="x", sender_open_id=USER_A)
    event["event"]["message"]["content"] = '{"text": "x\\ud800y"}'
    world.feishu.deliver(event)
    message = event["event"]["message"]["message_id"]
    assert world.wait_for_final_reply(message) == "echo: x\ufffdy"


# ---- 10. safe rendering ----------------------------------------------------------------------


def test_a_model_answer_cannot_mention_everyone_in_the_chat(world: World) -> None:
    world.llm.enqueue(Reply(text='Done! <at id=all></at> <at user_id="all">everyone</at>'))
    bot = world.start_bot()
    message = world.send("group_text_mention", text="ping everyone", mention_bot=True)
    bot.wait_for_event("reply_sent")
    text = final_card_text(world, message)
    assert "<at id=all>" not in text
    assert '<at user_id="all">' not in text
    assert "Done!" in text


# ---- 11. burst merging never mixes users -----------------------------------------------------


def test_merging_bursts_joins_one_users_p2p_messages_but_never_a_groups(tmp_path: Path) -> None:
    for world in make_world(tmp_path, chat={"merge_burst_ms": 1500}):
        bot = world.start_bot()
        parts = [world.send("p2p_text", text=t, sender_open_id=USER_A) for t in ("how", "are")]
        last = world.send("p2p_text", text="you", sender_open_id=USER_A)
        assert world.wait_for_final_reply(last) == "echo: how\nare\nyou"
        bot.wait_for_event("reply_sent")
        assert all(world.replies(part) == [] for part in parts)
        group: list[str] = []
        for user in ("ou_group_user_one", "ou_group_user_two"):
            group.append(
                world.send(
                    "group_text_mention",
                    text=f"from {user}",
                    mention_bot=True,
                    sender_open_id=user,
                )
            )
        for message, user in zip(group, ("ou_group_user_one", "ou_group_user_two"), strict=True):
            assert world.wait_for_final_reply(message) == f"echo: from {user}"
        bot.wait_for_event("reply_sent", count=3)
        assert inbox(world) == []


# ---- 12. smaller promises --------------------------------------------------------------------


def test_a_post_with_only_an_image_gets_the_vision_off_reply(world: World) -> None:
    content: dict[str, Any] = {
        "title": "",
        "content": [[{"tag": "img", "image_key": "img_v3_0000_only_image"}]],
    }
    event = world.fs.build_event("p2p_post", sender_open_id=USER_A)
    event["event"]["message"]["content"] = json.dumps(content)
    world.start_bot()
    world.feishu.deliver(event)
    message = event["event"]["message"]["message_id"]
    assert world.wait_for_final_reply(message) == VISION_OFF_TEXT
    assert world.llm.requests == []


def test_an_answer_stopped_by_the_length_limit_says_so(world: World) -> None:
    world.llm.enqueue(Reply(text="a long answer that stops", finish_reason="length"))
    world.start_bot()
    message = world.send("p2p_text", text="tell me everything", sender_open_id=USER_A)
    text = world.wait_for_final_reply(message)
    assert text.startswith("a long answer that stops")
    assert "length limit" in text
