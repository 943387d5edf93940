"""Metrics: what the bot counts, as a Prometheus scrape shows it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.llm.keypool import key_id_of
from bot.ops.metrics import ANSWER_OUTCOMES, Metrics
from tests.chat_harness import KEY_A, KEY_B, ChatHarness, FakeTime, make_settings
from tests.fakes.openai_server import (
    FakeOpenAI,
    context_length_exceeded,
    insufficient_quota,
    invalid_api_key,
    rate_limit_exceeded,
    server_error,
)

PREFIX = "feishu_gpt_bot_"


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(PREFIX + name, labels)
    return 0.0 if found is None else found


def scraped(metrics: Metrics) -> dict[str, str]:
    """Metric family name -> type, from the text a scrape returns (without the ``_created``
    timestamps prometheus-client adds to counters and histograms)."""
    text = metrics.render().decode()
    families = text_string_to_metric_families(text)
    return {f.name: f.type for f in families if not f.name.endswith("_created")}


def test_a_scrape_lists_every_metric_under_the_bots_prefix() -> None:
    assert scraped(Metrics()) == {
        PREFIX + "messages_received": "counter",
        PREFIX + "messages_answered": "counter",
        PREFIX + "answer_seconds": "histogram",
        PREFIX + "first_text_seconds": "histogram",
        PREFIX + "llm_calls": "counter",
        PREFIX + "keys": "gauge",
        PREFIX + "inbox_messages": "gauge",
        PREFIX + "feishu_reconnects": "counter",
        PREFIX + "feishu_connected": "gauge",
    }


def test_each_metrics_object_counts_on_its_own() -> None:
    one, other = Metrics(), Metrics()
    one.message_received()
    assert value(one, "messages_received_total") == 1
    assert value(other, "messages_received_total") == 0


def test_every_answer_outcome_and_key_state_is_scraped_from_the_start_at_zero() -> None:
    text = Metrics().render().decode()
    for outcome in ANSWER_OUTCOMES:
        assert f'{PREFIX}messages_answered_total{{outcome="{outcome}"}} 0.0' in text
    for state in ("active", "cooling", "disabled"):
        assert f'{PREFIX}keys{{state="{state}"}} 0.0' in text


def test_answers_of_the_model_are_counted_and_timed_other_outcomes_only_counted() -> None:
    metrics = Metrics()
    metrics.message_answered("complete", seconds=1.5)
    metrics.message_answered("interrupted", seconds=30.0)
    metrics.message_answered("command")
    metrics.message_answered("refused", messages=2)
    assert value(metrics, "messages_answered_total", outcome="complete") == 1
    assert value(metrics, "messages_answered_total", outcome="refused") == 2
    assert value(metrics, "answer_seconds_count") == 2
    assert value(metrics, "answer_seconds_sum") == 31.5
    assert value(metrics, "answer_seconds_bucket", le="2.0") == 1


def test_key_states_are_counted_with_the_missing_states_at_zero() -> None:
    metrics = Metrics()
    metrics.set_key_states(["active", "cooling", "active"])
    assert value(metrics, "keys", state="active") == 2
    assert value(metrics, "keys", state="cooling") == 1
    assert value(metrics, "keys", state="disabled") == 0
    metrics.set_key_states([])
    assert value(metrics, "keys", state="active") == 0


def test_a_lost_connection_counts_a_reconnect_and_clears_connected_until_it_is_back() -> None:
    metrics = Metrics()
    metrics.connection_up(True)
    assert value(metrics, "feishu_connected") == 1
    metrics.connection_lost()
    assert value(metrics, "feishu_connected") == 0
    assert value(metrics, "feishu_reconnects_total") == 1
    metrics.connection_up(True)
    assert value(metrics, "feishu_connected") == 1


# ---- every LLM call, by key and outcome (through the real client and SDK) --------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[ChatHarness]:
    settings = make_settings(fake.base_url, [KEY_A, KEY_B])
    harness = await ChatHarness(settings, tmp_path / "bot.db", FakeTime()).start()
    yield harness
    await harness.close()


def calls(bot: ChatHarness, key: str, outcome: str) -> float:
    return value(bot.metrics, "llm_calls_total", key_id=key_id_of(key), outcome=outcome)


async def test_a_rate_limited_call_and_the_retry_on_the_next_key_are_both_counted(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.enqueue(rate_limit_exceeded(retry_after=20))
    assert (await bot.ask("hello")).text == "echo: hello"
    first, second = (request.key for request in fake.requests)
    assert calls(bot, first, "rate_limited") == 1
    assert calls(bot, second, "ok") == 1
    assert calls(bot, first, "ok") == 0


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (invalid_api_key(), "auth"),
        (insufficient_quota(), "quota"),
        (server_error(), "server_error"),
    ],
    ids=["auth", "quota", "server_error"],
)
async def test_a_failed_call_is_counted_by_what_the_failure_means_for_the_key(
    bot: ChatHarness, fake: FakeOpenAI, error: object, outcome: str
) -> None:
    fake.enqueue(error)  # type: ignore[arg-type]
    await bot.ask("hello")
    failed_key = fake.requests[0].key
    assert calls(bot, failed_key, outcome) == 1
    assert sum(calls(bot, key, "ok") for key in (KEY_A, KEY_B)) == 1


async def test_a_request_the_provider_refuses_is_counted_as_rejected(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.enqueue(context_length_exceeded())
    answer = await bot.ask("hello")
    assert answer.failed is not None
    assert calls(bot, fake.requests[0].key, "rejected") == 1
    assert len(fake.requests) == 1
