"""The bot end to end: `python -m bot run` ↔ fake Feishu (real lark-oapi) ↔ fake OpenAI (real SDK).

Slow suite (`make test-all`): each test starts the real bot process.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bot.chat.media import VISION_OFF_TEXT
from bot.feishu.answerer import UNSUPPORTED_TEXT
from tests.e2e_harness import LLM_KEY, USER_A, USER_B, World, make_world
from tests.fakes.openai_server import server_error
from tests.helpers import run_bot, write_settings

pytestmark = pytest.mark.slow


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def llm_prompts(world: World) -> list[list[str]]:
    return [[m["content"] for m in r.messages] for r in world.llm.requests]


# ---- p2p ------------------------------------------------------------------------------------


def test_p2p_text_gets_one_streamed_card_whose_final_text_is_the_llms(world: World) -> None:
    world.llm.default.reply = "Hello! I am a helpful bot with a fairly long answer to stream."
    world.llm.default.chunk_size = 5
    world.start_bot()
    message = world.send("p2p_text", text="hi there", sender_open_id=USER_A)
    text = world.wait_for_final_reply(message)
    assert text == "Hello! I am a helpful bot with a fairly long answer to stream."
    (reply,) = world.replies(message)
    card = world.fs.card(reply.card_id or "")
    assert card.closed
    assert len(card.content_updates) >= 1
    assert card.sequences == sorted(set(card.sequences))
    assert len(world.llm.requests) == 1
    # the SDK's REST calls of one answer travel over one kept-alive connection
    card_calls = world.fs.calls_to("card_element_content") + world.fs.calls_to("message_reply")
    assert len({call.peer for call in card_calls}) == 1


def test_an_answer_too_long_for_one_card_continues_in_a_follow_up_card(world: World) -> None:
    answer = "".join(f"第{index}段：长长的答案。\n" for index in range(3000))  # ~60 KB
    world.llm.default.reply = answer
    world.llm.default.chunk_size = 2000
    world.start_bot()
    message = world.send("p2p_text", text="write a lot")
    bot = world.bots[0]
    bot.wait_for_event("reply_sent")
    replies = world.replies(message)
    assert len(replies) >= 3
    cards = [world.fs.card(reply.card_id or "") for reply in replies]
    assert all(card.closed for card in cards)
    assert all(len(card.text.encode()) < 30 * 1024 for card in cards)
    parts = [card.text.removesuffix("\n\n_(continued below)_") for card in cards]
    assert all(card.text.endswith("_(continued below)_") for card in cards[:-1])
    assert "".join(parts) == answer


def test_the_long_connection_is_made_without_compression(world: World) -> None:
    world.start_bot()
    (connection,) = world.fs.open_connections()
    offered = {name.lower(): value for name, value in connection.headers.items()}
    assert "sec-websocket-extensions" not in offered  # no permessage-deflate per frame
    message = world.send("p2p_text", text="plain frames")
    assert world.wait_for_final_reply(message) == "echo: plain frames"


def test_multi_turn_context_is_kept_across_messages(world: World) -> None:
    world.start_bot()
    first = world.send("p2p_text", text="my name is Ada", sender_open_id=USER_A)
    world.wait_for_final_reply(first)
    second = world.send("p2p_text", text="what is my name?", sender_open_id=USER_A)
    assert world.wait_for_final_reply(second) == "echo: what is my name?"
    assert llm_prompts(world)[-1][1:] == [
        "my name is Ada",
        "echo: my name is Ada",
        "what is my name?",
    ]


def test_redelivered_event_and_same_message_under_new_event_id_are_answered_once(
    world: World,
) -> None:
    world.start_bot()
    event = world.fs.build_event("p2p_text", text="only once please")
    message_id = event["event"]["message"]["message_id"]
    for _ in range(3):
        world.feishu.deliver(event)
    renamed = world.fs.build_event("p2p_text", text="only once please", message_id=message_id)
    world.feishu.deliver(renamed)
    world.wait_for_final_reply(message_id)
    frames = [f for f, d in world.fs.deliveries.items() if d.message_id == message_id]
    for frame in frames:
        world.fs.wait_for_ack_blocking(frame)
    # a later message in the same chat is a barrier: the duplicates were handled before it
    barrier = world.send("p2p_text", text="barrier")
    world.wait_for_final_reply(barrier)
    assert len(world.replies(message_id)) == 1
    assert [r.last_user_text for r in world.llm.requests] == ["only once please", "barrier"]


def test_the_ack_is_sent_before_the_llm_answers(world: World) -> None:
    world.start_bot()
    held = world.llm.hold_next()
    message = world.send("p2p_text", text="take your time")
    world.fs.wait_for_ack_blocking(world.frame_of(message))
    held.wait_arrived_blocking(10)
    assert not held.released
    assert world.fs.delivery(world.frame_of(message)).acked
    held.release()
    assert world.wait_for_final_reply(message) == "echo: take your time"


def test_two_users_are_answered_at_the_same_time(world: World) -> None:
    world.start_bot()
    held = world.llm.hold_next()
    slow = world.send("p2p_text", text="slow question", sender_open_id=USER_A)
    held.wait_arrived_blocking(10)
    fast = world.send("p2p_text", text="fast question", sender_open_id=USER_B, chat_id="oc_b")
    assert world.wait_for_final_reply(fast) == "echo: fast question"
    assert not held.released
    held.release()
    assert world.wait_for_final_reply(slow) == "echo: slow question"


def test_one_users_quick_messages_are_answered_in_order(world: World) -> None:
    world.start_bot()
    held = world.llm.hold_next()
    messages = [
        world.send("p2p_text", text=text, sender_open_id=USER_A)
        for text in ("first", "second", "third")
    ]
    held.wait_arrived_blocking(10)
    held.release()
    for message, text in zip(messages, ("first", "second", "third"), strict=True):
        assert world.wait_for_final_reply(message) == f"echo: {text}"
    assert [r.last_user_text for r in world.llm.requests] == ["first", "second", "third"]
    assert llm_prompts(world)[-1][1:] == [
        "first",
        "echo: first",
        "second",
        "echo: second",
        "third",
    ]


# ---- groups ---------------------------------------------------------------------------------


def test_group_message_without_mention_is_ignored(world: World) -> None:
    bot = world.start_bot()
    ignored = world.send("group_text_mention", text="just chatting", mention_bot=False)
    world.fs.wait_for_ack_blocking(world.frame_of(ignored))
    answered = world.send("group_text_mention", text="hello bot", mention_bot=True)
    world.wait_for_final_reply(answered)
    assert world.replies(ignored) == []
    assert [r.last_user_text for r in world.llm.requests] == ["hello bot"]
    assert [e["message_id"] for e in bot.events("message_ignored")] == [ignored]


def test_group_mention_is_answered_in_thread_with_the_mention_stripped_and_context_kept(
    world: World,
) -> None:
    world.start_bot()
    root = world.send("group_text_mention", text="summarise the thread please", mention_bot=True)
    assert world.wait_for_final_reply(root) == "echo: summarise the thread please"
    (reply,) = world.replies(root)
    assert reply.reply_in_thread is True
    follow_up = world.send(
        "group_thread_reply", text="and shorter?", mention_bot=True, root_id=root, parent_id=root
    )
    assert world.wait_for_final_reply(follow_up) == "echo: and shorter?"
    assert llm_prompts(world)[-1][1:] == [
        "summarise the thread please",
        "echo: summarise the thread please",
        "and shorter?",
    ]
    other_thread = world.send("group_text_mention", text="new topic", mention_bot=True)
    world.wait_for_final_reply(other_thread)
    assert llm_prompts(world)[-1][1:] == ["new topic"]


# ---- message types --------------------------------------------------------------------------


def test_post_message_is_answered_from_its_text(world: World) -> None:
    world.start_bot()
    message = world.send("p2p_post")
    world.wait_for_final_reply(message)
    (request,) = world.llm.requests
    assert request.last_user_text.startswith("# ")  # the post's title, flattened to markdown
    assert "print(1)" in request.last_user_text


def test_a_sticker_gets_a_polite_reply_saying_what_the_bot_reads_without_an_llm_call(
    world: World,
) -> None:
    world.start_bot()
    message = world.send("p2p_sticker")
    text = world.wait_for_final_reply(message)
    assert text == UNSUPPORTED_TEXT.format(what="a sticker")
    assert world.llm.requests == []


def test_an_image_without_vision_gets_the_reply_naming_the_setting(world: World) -> None:
    world.start_bot()
    message = world.send("p2p_image")
    assert world.wait_for_final_reply(message) == VISION_OFF_TEXT
    assert world.llm.requests == []
    assert world.fs.calls_to("message_resource") == []  # nothing downloaded in vain


def test_an_empty_mention_gets_a_short_help(world: World) -> None:
    world.start_bot()
    message = world.send("group_text_mention", text="@_user_1", mention_bot=True)
    assert "/reset" in world.wait_for_final_reply(message)
    assert world.llm.requests == []


# ---- connection and process faults ----------------------------------------------------------


def test_connection_dropped_mid_stream_still_completes_the_reply_and_the_next_is_answered(
    world: World,
) -> None:
    world.start_bot()
    held = world.llm.hold_next(after_chunks=1)
    message = world.send("p2p_text", text="a long story")
    held.wait_arrived_blocking(10)
    world.feishu.drop_connections()
    world.fs.wait_for_connections_blocking(1, timeout=20)
    held.release()
    assert world.wait_for_final_reply(message) == "echo: a long story"
    after = world.send("p2p_text", text="after the reconnect")
    assert world.wait_for_final_reply(after) == "echo: after the reconnect"


def test_killed_mid_answer_then_restarted_answers_once_with_a_delayed_note(world: World) -> None:
    first_run = world.start_bot()
    held = world.llm.hold_next()
    message = world.send("p2p_text", text="are you there?")
    held.wait_arrived_blocking(10)
    first_run.kill()  # kill -9: no chance to clean up
    held.release()
    world.start_bot()
    final = world.wait_for_final_reply(message, containing="echo: are you there?")
    assert final.startswith("_(Sorry for the delay: I was restarting when you sent this.)_")
    answers = [t for t in world.fs.reply_texts(message) if "echo: are you there?" in t]
    assert len(answers) == 1


def test_a_message_left_too_long_ago_gets_a_short_apology_instead(tmp_path: Path) -> None:
    for world in make_world(tmp_path):
        first_run = world.start_bot()
        held = world.llm.hold_next()
        message = world.send("p2p_text", text="are you there?")
        held.wait_arrived_blocking(10)
        first_run.kill()
        held.release()
        settings = yaml.safe_load(world.settings_path.read_text(encoding="utf-8"))
        settings["chat"]["resume_within_minutes"] = 0
        write_settings(world.settings_path, settings)
        world.start_bot()
        text = world.wait_for_final_reply(message, containing="offline")
        assert text.startswith("Sorry, I was offline when you sent this")
        assert len(world.llm.requests) == 1  # only the killed attempt


def test_a_failing_model_gets_a_short_apology_in_the_card(world: World) -> None:
    world.llm.default.persistent = server_error()
    world.start_bot()
    message = world.send("p2p_text", text="hello?")
    text = world.wait_for_final_reply(message)
    assert text == "Sorry, the model is not answering right now. Please try again in a minute."


def test_sigterm_exits_0_after_finishing_the_answer_in_progress(world: World) -> None:
    bot = world.start_bot()
    held = world.llm.hold_next()
    message = world.send("p2p_text", text="finish me")
    held.wait_arrived_blocking(10)
    bot.signal(signal.SIGTERM)
    bot.wait_for_event("shutdown_waiting")
    held.release()
    assert bot.wait(timeout=30) == 0
    assert world.wait_for_final_reply(message) == "echo: finish me"


def test_an_answer_longer_than_the_grace_period_is_cut_short_with_a_note_and_kept(
    tmp_path: Path,
) -> None:
    for world in make_world(tmp_path, feishu={"shutdown_grace_s": 0}):
        bot = world.start_bot()
        held = world.llm.hold_next(after_chunks=1)
        message = world.send("p2p_text", text="never finishing")
        held.wait_arrived_blocking(10)
        bot.signal(signal.SIGTERM)
        assert bot.wait(timeout=30) == 0
        final = world.wait_for_final_reply(message)
        assert "will be finished in this card when the bot is back" in final
        held.release()
        world.start_bot()
        assert world.wait_for_final_reply(message, containing="echo: never finishing")
        assert len(world.replies(message)) == 1


def test_wrong_app_secret_is_one_clear_error_and_exit_1(world: World, tmp_path: Path) -> None:
    write_settings(
        tmp_path / "bad.yaml",
        {
            "feishu": {
                "app_id": world.fs.app_id,
                "app_secret": "wrong-secret-0123456789abcdef",
                "domain": world.feishu.domain,
            },
            "llm": {"base_url": world.openai.base_url, "keys": [{"key": LLM_KEY}]},
        },
    )
    result = run_bot("run", "--config", "bad.yaml", cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: Feishu rejected app_id/app_secret:")
    assert "Traceback" not in result.stderr
    assert "wrong-secret-0123456789abcdef" not in result.stdout + result.stderr


def test_an_unreachable_feishu_is_one_clear_error_and_exit_1(tmp_path: Path) -> None:
    write_settings(
        tmp_path / "settings.yaml",
        {
            "feishu": {"app_id": "cli_x", "app_secret": "s" * 32, "domain": "http://127.0.0.1:9"},
            "llm": {"keys": [{"key": LLM_KEY}]},
        },
    )
    result = run_bot("run", cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]]
    assert errors[0].startswith("error: cannot reach Feishu at http://127.0.0.1:9")
    assert "Traceback" not in result.stderr


def test_a_refused_long_connection_is_one_clear_error_and_exit_1(world: World) -> None:
    world.fs.fail("ws_endpoint", 1000040351, "the app does not use the long connection", 200)
    result = run_bot("run", "--config", str(world.settings_path), cwd=world.workdir, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: Feishu refused the long connection")
    assert "Traceback" not in result.stderr


def test_a_connection_that_cannot_be_restored_ends_the_bot_with_a_clear_error(
    tmp_path: Path,
) -> None:
    for world in make_world(tmp_path, feishu={"reconnect_timeout_s": 1}):
        bot = world.start_bot()
        # Feishu refuses the reconnect for good (403 is fatal for the SDK: it stops retrying).
        world.fs.fail("ws_connect", http_status=403, times=None)
        world.feishu.drop_connections()
        assert bot.wait(timeout=30) == 1
        bot.wait_for_event("feishu_connection_lost")
        assert "error: lost the connection to Feishu and could not reconnect within 1 s" in (
            bot.output
        )


def test_a_short_outage_is_survived(tmp_path: Path) -> None:
    for world in make_world(tmp_path, feishu={"reconnect_timeout_s": 30}):
        bot = world.start_bot()
        world.feishu.drop_connections()
        bot.wait_for_event("feishu_reconnected")
        message = world.send("p2p_text", text="still there?")
        assert world.wait_for_final_reply(message) == "echo: still there?"
        assert not bot.exited()


def test_no_secret_appears_in_the_bots_output(world: World) -> None:
    bot = world.start_bot()
    message = world.send("p2p_text", text="hello")
    world.wait_for_final_reply(message)
    assert bot.stop() == 0
    output = bot.output
    assert "feishu_connected" in output
    for secret in (LLM_KEY, world.fs.app_secret):
        assert secret not in output
    assert "ticket=" not in output or "ticket=***" in output
