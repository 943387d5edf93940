"""Conversation features end to end: `python -m bot run` ↔ fake Feishu ↔ fake OpenAI.

Commands and personas, per-user models, the allow list's once-a-day refusal, quotas, quoted
context (fetched through the message API, or the bot's own answer from the store), welcomes.
Slow suite (`make test-all`): each test starts the real bot process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.chat.access import REFUSAL_TEXT
from bot.chat.history import QUOTE_HEADER
from bot.chat.personas import BUILT_IN_PERSONAS
from bot.feishu.welcome import welcome_text
from tests.e2e_harness import USER_A, USER_B, World, make_world

pytestmark = pytest.mark.slow

P2P_CHAT = "oc_5ce6d572455d361153b7cb51da133945"  # the chat of the p2p samples
GROUP = "oc_group_for_e2e_tests_000000000001"
DONATED = "sk-proj-e2eDonatedKey0000000000000000000000000001"


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    settings: dict[str, Any] = getattr(request, "param", {})
    yield from make_world(tmp_path, **settings)


def with_settings(**sections: Any) -> pytest.MarkDecorator:
    """Run the test in a world with these settings sections."""
    return pytest.mark.parametrize("world", [sections], indirect=True, ids=["settings"])


def last_prompt(world: World) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in world.llm.requests[-1].messages]


def ask(world: World, text: str, *, user: str = USER_A, **kwargs: Any) -> str:
    message = world.send("p2p_text", text=text, sender_open_id=user, **kwargs)
    return world.wait_for_final_reply(message)


@with_settings(llm={"models": ["gpt-4o"]})
def test_commands_switch_persona_and_model_and_reach_the_llm(world: World) -> None:
    world.start_bot()
    ask(world, "remember banana")
    assert "translator" in ask(world, "/角色 translator")
    ask(world, "你好")
    translator = BUILT_IN_PERSONAS["translator"]
    prompt = last_prompt(world)
    assert prompt[0] == ("system", translator.system)
    assert prompt[1:5] == [
        ("user", translator.examples[0][0]),
        ("assistant", translator.examples[0][1]),
        ("user", translator.examples[1][0]),
        ("assistant", translator.examples[1][1]),
    ]
    assert prompt[-1] == ("user", "你好")
    assert "banana" not in str(prompt)
    assert "gpt-4o" in ask(world, "/MODEL gpt-4o")
    ask(world, "again")
    assert world.llm.requests[-1].model == "gpt-4o"
    ask(world, "someone else", user=USER_B)
    assert world.llm.requests[-1].model == "gpt-4o-mini"
    assert "I keep" in ask(world, "/history")
    assert "Your use today: 3 requests" in ask(world, "/usage")
    unknown = ask(world, "/frobnicate")
    assert unknown.startswith("Unknown command: /frobnicate.")
    assert len(world.llm.requests) == 4  # commands never reach the model


@with_settings(access={"admins": [USER_B]})
def test_every_command_and_its_error_paths_answer_in_chat_without_the_model(
    world: World,
) -> None:
    world.start_bot()
    expectations = {
        "/help": "/role",
        "/帮助": "/model",
        "/role": "- translator:",
        "/role wizard": "There is no persona called 'wizard'.",
        "/role custom": "Usage: /role custom <system prompt>",
        "/role custom You are terse.": "your own system prompt",
        "/role default": "Done: I am default",
        "/model": "I use gpt-4o-mini",
        "/model gpt-9": "gpt-9 is not one of the models I may use",
        "/history": "Our conversation is empty",
        "/usage": "Your use today: 0 requests, 0 tokens.",
        "/keys": "only the bot's admins",
        "/key": "Usage: /key add <key>",
        "/reset": "I forgot our conversation",
        "/重置": "I forgot our conversation",
        "/nonsense": "Unknown command: /nonsense.",
    }
    for command, expected in expectations.items():
        assert expected in ask(world, command), command
    assert "For admins" not in ask(world, "/help")
    assert "For admins" in ask(world, "/help", user=USER_B)
    assert "By user" in ask(world, "/usage", user=USER_B)
    assert world.llm.requests == []


@with_settings(access={"allow": [USER_A]})
def test_someone_not_allowed_is_told_once_a_day_and_the_model_never_called(
    world: World,
) -> None:
    bot = world.start_bot()
    first = world.send("p2p_text", text="hello?", sender_open_id=USER_B)
    assert world.wait_for_final_reply(first) == REFUSAL_TEXT
    second = world.send("p2p_text", text="hello again?", sender_open_id=USER_B)
    donation = world.send("p2p_text", text=DONATED, sender_open_id=USER_B)
    bot.wait_for_event("message_refused_quietly", count=2)
    assert world.replies(second) == []
    assert world.replies(donation) == []
    assert world.llm.requests == []
    assert bot.events("key_donation_checked") == []
    assert ask(world, "I am allowed") == "echo: I am allowed"


@with_settings(access={"daily_requests_per_user": 1})
def test_a_reached_quota_is_answered_with_when_it_resets(world: World) -> None:
    world.start_bot()
    ask(world, "one")
    refused = ask(world, "two")
    assert "You have used your 1 requests for today." in refused
    assert "resets at midnight" in refused
    assert len(world.llm.requests) == 1


def test_a_quoted_message_is_fetched_and_given_to_the_model(world: World) -> None:
    world.start_bot()
    quoted = world.fs.add_message(
        text="The offsite is on 12 May in Hangzhou.", chat_id=P2P_CHAT, sender_open_id=USER_B
    )
    ask(world, "what date was that?", parent_id=quoted, root_id=quoted)
    assert world.llm.requests[-1].last_user_text == (
        f"{QUOTE_HEADER}\n> The offsite is on 12 May in Hangzhou.\n\nwhat date was that?"
    )
    assert len(world.fs.calls_to("message_get")) == 1


def test_in_a_group_the_quoted_message_of_another_member_is_read(world: World) -> None:
    world.start_bot()
    quoted = world.fs.add_message(
        text="Deploys are frozen until Monday.", chat_id=GROUP, sender_open_id=USER_B
    )
    message = world.send(
        "group_text_mention",
        text="can I ship today?",
        chat_id=GROUP,
        sender_open_id=USER_A,
        mention_bot=True,
        parent_id=quoted,
        root_id=quoted,
    )
    world.wait_for_final_reply(message)
    assert world.llm.requests[-1].last_user_text == (
        f"{QUOTE_HEADER}\n> Deploys are frozen until Monday.\n\ncan I ship today?"
    )
    # the follow-up in the same thread does not repeat the thread's first message
    follow_up = world.send(
        "group_text_mention",
        text="and tomorrow?",
        chat_id=GROUP,
        sender_open_id=USER_A,
        mention_bot=True,
        parent_id=quoted,
        root_id=quoted,
    )
    world.wait_for_final_reply(follow_up)
    assert world.llm.requests[-1].last_user_text == "and tomorrow?"
    assert len(world.fs.calls_to("message_get")) == 1


def test_quoting_the_bots_own_answer_needs_no_api_call(world: World) -> None:
    world.start_bot()
    question = world.send("p2p_text", text="first question", sender_open_id=USER_A)
    world.wait_for_final_reply(question)
    (answer,) = world.replies(question)
    ask(world, "/reset")
    ask(world, "explain that", parent_id=answer.message_id, root_id=answer.message_id)
    assert world.llm.requests[-1].last_user_text == (
        f"{QUOTE_HEADER}\n> echo: first question\n\nexplain that"
    )
    assert world.fs.calls_to("message_get") == []


def test_a_quote_feishu_will_not_return_still_gets_an_answer(world: World) -> None:
    bot = world.start_bot()
    quoted = world.fs.add_message(text="gone soon", chat_id=P2P_CHAT)
    world.fs.fail("message_get", 230011, "The message was withdrawn.", 400)
    reply = ask(world, "what did it say?", parent_id=quoted, root_id=quoted)
    assert "echo: what did it say?" in reply
    assert "could not read the message you replied to" in reply
    assert world.llm.requests[-1].last_user_text == "what did it say?"
    bot.wait_for_event("quote_unavailable")
    assert "I keep 2 messages" in ask(world, "/history")  # the exchange was saved


def test_welcome_once_per_user_and_once_per_group(world: World) -> None:
    bot = world.start_bot()
    for _ in range(2):
        frame = world.feishu.deliver(
            "p2p_chat_entered", chat_id="oc_p2p_alice", operator_open_id=USER_A
        )
        world.fs.wait_for_ack_blocking(frame)
        frame = world.feishu.deliver("bot_added", chat_id=GROUP, operator_open_id=USER_A)
        world.fs.wait_for_ack_blocking(frame)
    bot.wait_for_event("welcome_sent", count=2)
    (to_user,) = world.fs.sent_messages("oc_p2p_alice")
    assert world.fs.message_text(to_user.message_id) == welcome_text(in_group=False, donations=True)
    (to_group,) = world.fs.sent_messages(GROUP)
    assert world.fs.message_text(to_group.message_id) == welcome_text(in_group=True, donations=True)
    # every event was acknowledged as handled (an event without a handler gets code 500)
    assert {ack.code for ack in world.fs.acks} == {200}
