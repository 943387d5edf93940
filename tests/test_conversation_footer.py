"""The footer under an answer: what the service says about how an answer was made, and the line
a transport shows for it in each ``chat.footer`` mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.chat.replies import AnswerInfo, footer_text
from bot.llm.events import TokenUsage
from bot.llm.keypool import key_id_of
from tests.chat_harness import KEY_A, ChatHarness, FakeTime, make_settings
from tests.fakes.openai_server import FakeOpenAI, ResetAfter, server_error

INFO = AnswerInfo("gpt-4o-mini", "1a2b3c4d5e6f", TokenUsage(640, 172))


@pytest.mark.parametrize(
    ("mode", "info", "line"),
    [
        ("short", INFO, "gpt-4o-mini · 3.2 s"),
        ("full", INFO, "gpt-4o-mini · 3.2 s · 812 tokens (640 in, 172 out) · key 1a2b3c4d5e6f"),
        (
            "full",
            AnswerInfo("gpt-4o-mini", "1a2b3c4d5e6f"),
            "gpt-4o-mini · 3.2 s · key 1a2b3c4d5e6f",
        ),
        ("full", AnswerInfo("gpt-4o-mini", ""), "gpt-4o-mini · 3.2 s"),
        ("short", AnswerInfo("", "1a2b3c4d5e6f"), "3.2 s"),
        ("off", INFO, ""),
    ],
    ids=["short", "full", "full-unreported-usage", "full-unknown-key", "no-model", "off"],
)
def test_the_footer_line_in_each_mode(mode: Any, info: AnswerInfo, line: str) -> None:
    assert footer_text(info, mode, 3.24) == line


def test_large_token_counts_are_grouped_and_seconds_never_negative() -> None:
    info = AnswerInfo("m", "k", TokenUsage(12_000, 3_456))
    assert footer_text(info, "full", -0.01) == (
        "m · 0.0 s · 15,456 tokens (12,000 in, 3,456 out) · key k"
    )


# ---- what the service puts on the final event ------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def start(fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[Any]:
    harnesses: list[ChatHarness] = []

    async def started(**sections: Any) -> ChatHarness:
        settings = make_settings(fake.base_url, [KEY_A], **sections)
        harness = await ChatHarness(settings, tmp_path / "bot.db", FakeTime()).start()
        harnesses.append(harness)
        return harness

    yield started
    for harness in harnesses:
        await harness.close()


async def test_an_answer_says_its_model_key_and_the_usage_the_provider_reported(
    start: Any,
) -> None:
    bot = await start()
    answer = await bot.ask("hello")
    assert answer.finished is not None
    usage = answer.finished.exchange.usage
    assert usage is not None
    reported = TokenUsage(usage.prompt_tokens, usage.completion_tokens)
    assert answer.finished.info == AnswerInfo("gpt-4o-mini", key_id_of(KEY_A), reported)


async def test_the_model_is_the_one_the_user_chose(start: Any) -> None:
    bot = await start(llm={"models": ["gpt-4o"]})
    await bot.ask("/model gpt-4o")
    answer = await bot.ask("hello")
    assert answer.finished is not None
    assert answer.finished.info is not None
    assert answer.finished.info.model == "gpt-4o"


async def test_usage_a_provider_did_not_report_is_not_shown_as_if_it_had(start: Any) -> None:
    bot = await start()
    bot.llm.include_usage = False  # as after a server refused stream_options
    answer = await bot.ask("hello")
    assert answer.finished is not None
    assert answer.finished.exchange.usage is not None  # estimated, for quotas and /usage
    assert answer.finished.info == AnswerInfo("gpt-4o-mini", key_id_of(KEY_A), None)


async def test_an_answer_cut_off_midway_still_has_its_model(start: Any, fake: FakeOpenAI) -> None:
    bot = await start()
    fake.enqueue(ResetAfter(chunks=2))
    answer = await bot.ask("tell me the alphabet")
    assert answer.finished is not None
    assert answer.finished.complete is False
    assert answer.finished.info is not None
    assert answer.finished.info.model == "gpt-4o-mini"
    assert answer.finished.info.usage is None


async def test_commands_refusals_and_apologies_carry_nothing_for_a_footer(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start(access={"daily_requests_per_user": 1})
    for command in ("/help", "/reset", "/model", "/history"):
        finished = (await bot.ask(command)).finished
        assert finished is not None
        assert finished.info is None, command
    fake.enqueue(*[server_error()] * 4)
    apology = await bot.ask("hello")
    assert apology.failed is not None
    await bot.ask("hello again")
    quota = await bot.ask("and again")
    assert quota.failed is not None  # the daily quota: a refusal, not an answer
