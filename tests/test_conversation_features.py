"""Conversation features through the service, the real openai SDK and the fake LLM server:
personas with few-shot examples, per-user models, /history, /usage, quotas, quoted context,
long input, help and Chinese aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.chat.access import until_midnight
from bot.chat.history import QUOTE_HEADER
from bot.chat.personas import BUILT_IN_PERSONAS
from bot.chat.service import QuoteUnavailable
from bot.store import SQLiteStore
from tests.chat_harness import KEY_A, ChatHarness, FakeTime, make_settings
from tests.fakes.openai_server import FakeOpenAI, RequestRecord

ADMIN = "ou_admin"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def harnesses(
    fake: FakeOpenAI, tmp_path: Path, time: FakeTime
) -> AsyncIterator[list[ChatHarness]]:
    started: list[ChatHarness] = []
    yield started
    for harness in started:
        await harness.close()


@pytest.fixture
def start(fake: FakeOpenAI, tmp_path: Path, time: FakeTime, harnesses: list[ChatHarness]) -> Any:
    async def start(**sections: Any) -> ChatHarness:
        sections.setdefault("access", {}).setdefault("admins", [ADMIN])
        settings = make_settings(fake.base_url, [KEY_A], **sections)
        harness = await ChatHarness(settings, tmp_path / "bot.db", time).start()
        harnesses.append(harness)
        return harness

    return start


def roles(request: RequestRecord) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request.messages]


# ---- personas -------------------------------------------------------------------------------


async def test_role_lists_the_personas_with_descriptions_and_marks_the_current(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    listing = (await bot.ask("/role")).text
    for name, persona in BUILT_IN_PERSONAS.items():
        assert f"- {name}: {persona.description}" in listing
    assert "- default: the bot's usual self ← current" in listing
    assert fake.requests == []


async def test_switching_persona_clears_history_and_sends_its_examples_as_turns_in_order(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    await bot.ask("remember the word banana")
    switched = (await bot.ask("/role translator")).text
    assert "translator" in switched
    assert "forgot" in switched
    assert await bot.store.load_turns("c1") == []
    await bot.ask("你好世界")
    request = fake.requests[-1]
    translator = BUILT_IN_PERSONAS["translator"]
    expected = [("system", translator.system)]
    for question, answer in translator.examples:
        expected += [("user", question), ("assistant", answer)]
    assert roles(request) == [*expected, ("user", "你好世界")]
    assert request.body["temperature"] == translator.temperature
    assert "banana" not in str(request.messages)


async def test_persona_examples_survive_trimming_and_real_history_goes_first(
    start: Any, fake: FakeOpenAI
) -> None:
    examples = [["ex question one", "ex answer one"], ["ex question two", "ex answer two"]]
    bot = await start(
        chat={
            "max_history_tokens": 150,
            "personas": {"tutor": {"system": "Be a tutor.", "examples": examples}},
        }
    )
    await bot.ask("/role tutor")
    for index in range(8):
        await bot.ask(f"question number {index} with some words to take room")
    contents = [content for _, content in roles(fake.requests[-1])]
    assert contents[:5] == ["Be a tutor.", *examples[0], *examples[1]]
    assert contents[-1] == "question number 7 with some words to take room"
    assert not any("question number 0" in content for content in contents)


async def test_examples_go_last_pair_first_when_even_they_do_not_fit(
    start: Any, fake: FakeOpenAI
) -> None:
    examples = [["short one", "fine"], ["a much longer example " * 20, "answer " * 20]]
    bot = await start(
        chat={
            "max_history_tokens": 100,
            "personas": {"tutor": {"system": "Be a tutor.", "examples": examples}},
        }
    )
    await bot.ask("/role tutor")
    await bot.ask("now")
    assert [content for _, content in roles(fake.requests[-1])] == [
        "Be a tutor.",
        "short one",
        "fine",
        "now",
    ]


async def test_custom_role_and_back_to_default(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(chat={"system_prompt": "You are the default."})
    assert "own system prompt" in (await bot.ask("/role custom You are a pirate. Say arr.")).text
    await bot.ask("hello")
    assert roles(fake.requests[-1])[0] == ("system", "You are a pirate. Say arr.")
    assert "← current" in (await bot.ask("/role")).text.split("custom:")[1]
    assert "default" in (await bot.ask("/role default")).text
    await bot.ask("hello again")
    assert roles(fake.requests[-1]) == [("system", "You are the default."), ("user", "hello again")]
    assert "Usage: /role custom" in (await bot.ask("/role custom")).text


async def test_a_persona_choice_survives_a_restart(start: Any, fake: FakeOpenAI) -> None:
    first = await start()
    await first.ask("/role engineer")
    second = await start()
    await second.ask("hi")
    assert roles(fake.requests[-1])[0] == ("system", BUILT_IN_PERSONAS["engineer"].system)


async def test_an_unknown_persona_is_refused_with_the_list(start: Any, fake: FakeOpenAI) -> None:
    bot = await start()
    text = (await bot.ask("/role wizard")).text
    assert text.startswith("There is no persona called 'wizard'.")
    assert "- teacher:" in text
    assert fake.requests == []


async def test_settings_override_and_disable_built_ins(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(
        chat={
            "personas": {
                "friend": None,
                "Engineer": {"description": "our house style", "system": "House rules."},
            }
        }
    )
    listing = (await bot.ask("/role")).text
    assert "friend" not in listing
    assert "- Engineer: our house style" in listing
    assert "no persona" in (await bot.ask("/role friend")).text
    await bot.ask("/role ENGINEER")
    await bot.ask("hi")
    assert roles(fake.requests[-1])[0] == ("system", "House rules.")


async def test_a_group_gets_its_default_persona(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(chat={"group_personas": {"oc_school": "teacher"}})
    await bot.ask("hi", conversation="g1", chat_id="oc_school", in_group=True)
    assert roles(fake.requests[-1])[0] == ("system", BUILT_IN_PERSONAS["teacher"].system)
    await bot.ask("hi", conversation="g2", chat_id="oc_other", in_group=True)
    assert roles(fake.requests[-1])[0] == ("system", "You are a helpful assistant.")
    # /role default in the group goes back to the group's default, not the global one
    await bot.ask("/role engineer", conversation="g1", chat_id="oc_school", in_group=True)
    back = await bot.ask("/role default", conversation="g1", chat_id="oc_school", in_group=True)
    assert "teacher" in back.text


async def test_a_personas_model_and_temperature_reach_the_llm(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(
        chat={"personas": {"poet": {"system": "Rhyme.", "model": "poet-1", "temperature": 1.5}}}
    )
    await bot.ask("/role poet")
    await bot.ask("a line about rain")
    assert fake.requests[-1].model == "poet-1"
    assert fake.requests[-1].body["temperature"] == 1.5


# ---- models ---------------------------------------------------------------------------------


async def test_model_lists_the_choices_and_a_users_choice_reaches_the_llm(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start(llm={"model": "gpt-4o-mini", "models": ["gpt-4o", "deepseek-chat"]})
    listing = (await bot.ask("/model")).text
    assert "- gpt-4o-mini (default) ← yours" in listing
    assert "- deepseek-chat" in listing
    assert "gpt-4o" in (await bot.ask("/model GPT-4o")).text
    await bot.ask("hi")
    assert fake.requests[-1].model == "gpt-4o"
    await bot.ask("hi", user="u2", conversation="c2")
    assert fake.requests[-1].model == "gpt-4o-mini"  # per user
    assert "- gpt-4o ← yours" in (await bot.ask("/model")).text
    refused = (await bot.ask("/model gpt-5-ultra")).text
    assert "not one of the models" in refused
    assert "deepseek-chat" in refused
    again = await start(llm={"model": "gpt-4o-mini", "models": ["gpt-4o"]})
    await again.ask("still there?")
    assert fake.requests[-1].model == "gpt-4o"  # persisted


async def test_a_user_choice_beats_the_personas_model(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(
        llm={"models": ["big-1"]},
        chat={"personas": {"poet": {"system": "Rhyme.", "model": "poet-1"}}},
    )
    await bot.ask("/role poet")
    await bot.ask("/model big-1")
    await bot.ask("rain")
    assert fake.requests[-1].model == "big-1"


async def test_model_with_a_single_model_says_so(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(llm={"model": "only-one"})
    assert "I use only-one" in (await bot.ask("/模型")).text


# ---- history and usage ----------------------------------------------------------------------


async def test_history_counts_turns_and_tokens(start: Any, fake: FakeOpenAI) -> None:
    bot = await start()
    assert "empty" in (await bot.ask("/history")).text
    await bot.ask("one")
    await bot.ask("two")
    text = (await bot.ask("/历史")).text
    assert text.startswith("I keep 4 messages of our conversation")
    assert "The model sees the newest 4" in text


async def test_usage_shows_a_users_own_figures_and_admins_see_everyone(
    start: Any, fake: FakeOpenAI, time: FakeTime
) -> None:
    bot = await start()
    await bot.ask("hi", user="u1")
    await bot.ask("hello", user="u2", conversation="c2")
    mine = (await bot.ask("/usage", user="u1")).text
    assert mine.startswith("Your use today: 1 requests,")
    assert "This month" in mine
    assert "Everyone" not in mine
    admin = (await bot.ask("/用量", user=ADMIN, conversation="c3")).text
    assert "Everyone this month: 2 requests" in admin
    assert "By key:" in admin
    assert "By user (2):" in admin
    assert "- u2:" in admin


# ---- quotas ---------------------------------------------------------------------------------


async def test_daily_request_quota_refuses_until_midnight_and_spares_admins(
    start: Any, fake: FakeOpenAI, time: FakeTime
) -> None:
    bot = await start(access={"daily_requests_per_user": 2})
    await bot.ask("one")
    await bot.ask("two")
    refused = await bot.ask("three")
    assert refused.failed is not None
    assert refused.text.startswith("You have used your 2 requests for today.")
    assert "resets at midnight" in refused.text
    assert len(fake.requests) == 2  # the model was not called
    assert "/reset" in (await bot.ask("/help")).text  # commands still work
    for _ in range(3):
        assert (await bot.ask("admin question", user=ADMIN, conversation="a")).finished
    time.advance(until_midnight(time.now) + 1)
    assert (await bot.ask("next day")).finished is not None
    assert len(fake.requests) == 6


async def test_daily_token_quota(start: Any, fake: FakeOpenAI, time: FakeTime) -> None:
    bot = await start(access={"daily_tokens_per_user": 30})
    fake.default.reply = "a fairly long answer " * 10
    await bot.ask("tell me a lot")
    refused = await bot.ask("more")
    assert refused.text.startswith("You have used your 30 tokens for today")
    time.advance(until_midnight(time.now) + 1)
    assert (await bot.ask("more")).finished is not None


# ---- input limits, help, aliases ------------------------------------------------------------


async def test_input_over_max_input_chars_is_refused_with_the_limit(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start(chat={"max_input_chars": 50})
    refused = await bot.ask("x" * 51)
    assert refused.failed is not None
    assert "51 characters, and I take at most 50" in refused.text
    assert fake.requests == []
    assert (await bot.ask("x" * 50)).finished is not None


async def test_help_shows_admin_commands_only_to_admins(start: Any) -> None:
    bot = await start()
    user_help = (await bot.ask("/HELP")).text
    assert "/role" in user_help
    assert "/model" in user_help
    assert "/usage" in user_help
    assert "For admins" not in user_help
    assert "/keys" not in user_help
    admin_help = (await bot.ask("/帮助", user=ADMIN)).text
    assert "For admins" in admin_help
    assert "/keys" in admin_help
    no_donations = await start(keys={"accept_donations": False})
    assert "/key add" not in (await no_donations.ask("/help")).text


async def test_an_empty_mention_gets_the_help(start: Any, fake: FakeOpenAI) -> None:
    bot = await start()
    assert "Commands:" in (await bot.ask("   ")).text
    assert fake.requests == []


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("/重置", "I forgot our conversation"),
        ("/清空", "I forgot our conversation"),
        ("/角色", "Personas"),
        ("/角色 翻译", "no persona called '翻译'"),
        ("/模型", "I use"),
        ("/历史", "empty"),
        ("/用量", "Your use today"),
        ("/帮助", "Commands:"),
        ("/Role", "Personas"),
    ],
)
async def test_chinese_aliases_and_any_case(
    start: Any, fake: FakeOpenAI, alias: str, expected: str
) -> None:
    bot = await start()
    assert expected in (await bot.ask(alias)).text
    assert fake.requests == []


async def test_an_unknown_command_never_reaches_the_model(start: Any, fake: FakeOpenAI) -> None:
    bot = await start()
    text = (await bot.ask("/translate this please")).text
    assert text.startswith("Unknown command: /translate.")
    assert "/role" in text
    assert fake.requests == []


# ---- quoted context -------------------------------------------------------------------------


class Quotes:
    """Quoted messages by id; a missing id is unreadable."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts
        self.asked: list[str] = []

    async def quoted_text(self, message_id: str) -> str:
        self.asked.append(message_id)
        if message_id not in self.texts:
            raise QuoteUnavailable("(I could not read the message you replied to.)")
        return self.texts[message_id]


async def test_a_quoted_message_is_given_to_the_model_with_the_question(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    bot.service.quotes = Quotes({"om_q": "The meeting moved to Friday 3 pm.\nBring slides."})
    answer = await bot.ask("when is it?", quoted_message_id="om_q")
    assert answer.finished is not None
    assert fake.requests[-1].last_user_text == (
        f"{QUOTE_HEADER}\n> The meeting moved to Friday 3 pm.\n> Bring slides.\n\nwhen is it?"
    )
    (question, _) = await bot.store.load_turns("c1")
    assert question.content.endswith("when is it?")
    assert "Friday" in question.content


async def test_an_unreadable_quote_is_said_and_the_question_still_answered(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    bot.service.quotes = Quotes({})
    answer = await bot.ask("what about this?", quoted_message_id="om_gone")
    assert answer.finished is not None
    assert answer.finished.note == "(I could not read the message you replied to.)"
    assert fake.requests[-1].last_user_text == "what about this?"


async def test_a_long_quote_is_cut_to_the_budget_with_a_note(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(chat={"max_history_tokens": 300})
    bot.service.quotes = Quotes({"om_long": "word " * 2000})
    answer = await bot.ask("summarise", quoted_message_id="om_long")
    assert answer.finished is not None
    assert answer.finished.note is not None
    assert "only its beginning" in answer.finished.note
    sent = fake.requests[-1].last_user_text
    assert sent.endswith("…\n\nsummarise")
    assert len(sent) < 1500


async def test_a_quote_the_history_already_holds_is_not_repeated(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    fake.default.reply = "Paris is the capital."
    await bot.ask("capital of France?")
    quotes = bot.service.quotes = Quotes({"om_answer": "Paris is the capital."})
    await bot.ask("and its population?", quoted_message_id="om_answer")
    assert fake.requests[-1].last_user_text == "and its population?"
    await bot.ask("more", quoted_message_id="om_root", quoted_is_root=True, in_group=True)
    assert quotes.asked == ["om_answer"]  # a thread's root is in the history: not fetched


async def test_a_delivered_answer_is_recorded_under_its_message_ids(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    fake.default.reply = "Forty-two."
    reply = bot.service.handle(bot.message("the answer?"))
    async for _ in reply:
        pass
    await reply.commit(["om_question"], ["om_card_1", "om_card_2"])
    store: SQLiteStore = bot.store
    for card in ("om_card_1", "om_card_2"):
        sent = await store.find_sent(card)
        assert sent is not None
        assert sent.content == "Forty-two."
        assert sent.conversation_id == "c1"
    assert await store.find_sent("om_question") is None


async def test_commands_are_never_recorded_as_sent_answers(start: Any) -> None:
    bot = await start()
    reply = bot.service.handle(bot.message("/help"))
    async for _ in reply:
        pass
    await reply.commit(["om_help"], ["om_help_reply"])
    assert await bot.store.find_sent("om_help_reply") is None


async def test_a_quote_holding_an_api_key_is_never_sent_to_the_model(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    key = "sk-proj-QuotedKey000000000000000000000000000000001"
    bot.service.quotes = Quotes({"om_key": key, "om_text": f"my key is {key}, keep it"})
    for quoted in ("om_key", "om_text"):
        answer = await bot.ask("what is this?", quoted_message_id=quoted)
        assert answer.finished is not None
        assert answer.finished.note is not None
        assert "holds an API key" in answer.finished.note
        assert key not in str(fake.requests[-1].messages)
    assert key not in str(await bot.store.load_turns("c1"))


async def test_an_admin_listed_by_user_id_is_an_admin_for_every_command(start: Any) -> None:
    bot = await start(access={"admins": ["e_admin_1"]})
    as_admin = {"user": "ou_someone", "user_ids": ("e_admin_1",)}
    assert (await bot.ask("/keys", **as_admin)).text.startswith("Keys in the pool")
    assert "For admins" in (await bot.ask("/help", **as_admin)).text
    assert "By user" in (await bot.ask("/usage", **as_admin)).text
    assert "only the bot's admins" in (await bot.ask("/keys", user="ou_someone")).text
