"""Failure classes by code, not by wording: real provider errors, raised by the real SDK.

Every named sample of ``tests/fakes/samples/openai_errors.json`` is a body a provider really
sent (its ``source`` says where it was seen). The fake answers it; the openai SDK raises what it
raises for it (a status error from ``create``, or :class:`openai.APIError` while iterating a
stream); :func:`classify` decides what that means for the key and how long it rests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from bot.llm.classifier import (
    MIN_REST_S,
    Classified,
    KeyProblem,
    Outcome,
    ProviderError,
    classify,
    parse_duration,
    rest_seconds,
)
from tests.chat_harness import KEY_A, KEY_B, ChatHarness, FakeTime, make_settings
from tests.fakes.openai_server import (
    OPENAI_ERROR_SAMPLES,
    Behaviour,
    FakeOpenAI,
    ResetAfter,
    azure_rate_limited,
    error_sample,
    in_stream_error,
    in_stream_sample,
)

KEY = "sk-test-classifier-000000000000000000001"
MODEL = "gpt-4o-mini"
NOW = 1_795_600_800.0  # 2026-11-25 10:00:00 GMT

RATE = Outcome.RATE_LIMIT
DEAD = Outcome.KEY_DEAD
TRANSIENT = Outcome.TRANSIENT
REJECTED = Outcome.REJECTED


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as c:
        yield c


async def raised_by(fake: FakeOpenAI, client: openai.AsyncOpenAI, answer: Behaviour) -> Exception:
    """What the SDK raises when a streaming chat request is answered with ``answer``."""
    fake.script(KEY).enqueue(answer)
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for _ in stream:
            pass
    except openai.OpenAIError as exc:
        return exc
    raise AssertionError(f"{answer!r} raised nothing")


def sample_answer(name: str) -> Behaviour:
    if OPENAI_ERROR_SAMPLES[name].get("in_stream"):
        return in_stream_sample(name)
    return error_sample(name)


# (sample, outcome, why the key is dead, rest in seconds). The sources are in the samples file;
# the short note after each row says what the row pins.
TABLE: list[tuple[str, Outcome, KeyProblem | None, float | None]] = [
    # --- OpenAI (developers.openai.com/docs/guides/error-codes) ---
    ("rate_limit_exceeded", RATE, None, 20.0),  # Retry-After: 20 wins over the reset header
    ("openai_rate_limit_requests", RATE, None, MIN_REST_S),  # a 120ms reset rests 1 s, not 0.12
    ("openai_rate_limit_tokens", RATE, None, 18.642),  # the tokens window, not requests' "6ms"
    ("insufficient_quota", DEAD, "quota", None),
    ("openai_insufficient_quota_legacy", DEAD, "quota", None),  # only the type says it
    ("invalid_api_key", DEAD, "auth", None),
    ("openai_unsupported_region", REJECTED, None, None),  # a 403 that is not about the key
    ("server_error", TRANSIENT, None, None),
    ("context_length_exceeded", REJECTED, None, None),
    # --- Azure OpenAI ---
    ("azure_rate_limited", RATE, None, 2.0),  # says "quota", is a per-minute limit
    ("azure_invalid_key", DEAD, "auth", None),
    ("azure_content_filter", REJECTED, None, None),
    ("azure_firewall", REJECTED, None, None),  # a 403 from the network rules, key unharmed
    # --- DeepSeek (api-docs.deepseek.com/quick_start/error_codes) ---
    ("deepseek_insufficient_balance", DEAD, "quota", None),  # 402
    ("deepseek_rate_limited", RATE, None, None),
    ("deepseek_auth_fails", DEAD, "auth", None),
    # --- DashScope / Qwen, compatible mode (help.aliyun.com/en/model-studio/error-code-start) ---
    ("dashscope_rate_limited", RATE, None, None),
    ("dashscope_tpm_limited", RATE, None, None),  # code insufficient_quota, yet per-minute
    ("dashscope_free_quota_exhausted", DEAD, "quota", None),
    ("dashscope_arrearage", DEAD, "quota", None),  # a 400
    ("dashscope_invalid_key", DEAD, "auth", None),
    # --- Moonshot / Kimi ---
    ("moonshot_rate_limited", RATE, None, None),
    ("moonshot_no_balance", DEAD, "quota", None),
    ("moonshot_invalid_key", DEAD, "auth", None),
    # --- Zhipu / GLM (docs.bigmodel.cn/cn/api/api-code) ---
    ("zhipu_concurrency", RATE, None, None),  # 1302
    ("zhipu_frequency", RATE, None, None),  # 1303
    ("zhipu_arrears", DEAD, "quota", None),  # 1113, also a 429
    ("zhipu_auth_failed", DEAD, "auth", None),  # 1000
    ("zhipu_no_auth_header", DEAD, "auth", None),  # 1001
    ("zhipu_invalid_token", DEAD, "auth", None),  # 1002
    # --- Gemini, OpenAI-compatible endpoint (bodies are one-element lists) ---
    ("gemini_rate_limited", RATE, None, None),
    ("gemini_quota_per_minute", RATE, None, 26.0),  # "exceeded your current quota" + RetryInfo
    ("gemini_invalid_key", DEAD, "auth", None),  # a 400 with reason API_KEY_INVALID
    ("gemini_key_leaked", DEAD, "auth", None),  # PERMISSION_DENIED about the API key
    ("gemini_consumer_suspended", DEAD, "auth", None),  # reason CONSUMER_SUSPENDED
    ("gemini_permission_denied", REJECTED, None, None),  # PERMISSION_DENIED, not about the key
    # --- OpenRouter (openrouter.ai/docs/api/errors) ---
    ("openrouter_no_credits", DEAD, "quota", None),  # 402
    ("openrouter_in_flight_budget", RATE, None, 3.0),  # the one 402 that asks to wait
    ("openrouter_rate_limited", RATE, None, None),
    ("openrouter_no_auth", DEAD, "auth", None),
    ("openrouter_user_not_found", DEAD, "auth", None),
    # --- Ollama ---
    ("ollama_model_not_found", REJECTED, None, None),
    ("ollama_runner_crashed", TRANSIENT, None, None),
    # --- errors sent as an event inside a 200 stream ---
    ("stream_insufficient_quota", DEAD, "quota", None),
    ("stream_rate_limited", RATE, None, None),
    ("stream_server_error", TRANSIENT, None, None),  # OpenRouter's mid-stream error chunk
    ("stream_zhipu_concurrency", RATE, None, None),  # "event: error" with code 1302
]


@pytest.mark.parametrize(
    ("sample", "outcome", "problem", "rest"), TABLE, ids=[row[0] for row in TABLE]
)
async def test_each_real_provider_error_is_classified_by_its_code(
    fake: FakeOpenAI,
    client: openai.AsyncOpenAI,
    sample: str,
    outcome: Outcome,
    problem: KeyProblem | None,
    rest: float | None,
) -> None:
    exc = await raised_by(fake, client, sample_answer(sample))
    classified = classify(exc, now=NOW)

    if OPENAI_ERROR_SAMPLES[sample].get("in_stream"):
        assert type(exc) is openai.APIError  # an event inside a 200 stream: no status
    else:
        assert isinstance(exc, openai.APIStatusError)
        assert exc.status_code == OPENAI_ERROR_SAMPLES[sample]["status"]
    assert (classified.outcome, classified.key_problem) == (outcome, problem)
    if rest is None:
        assert classified.retry_after_s is None
    else:
        assert classified.retry_after_s == pytest.approx(rest)


def test_every_sample_has_a_row_in_the_table() -> None:
    assert {row[0] for row in TABLE} == set(OPENAI_ERROR_SAMPLES)
    assert all(sample["source"] for sample in OPENAI_ERROR_SAMPLES.values())


# ---- the bugs this classifier fixes ---------------------------------------------------------


async def test_azure_per_minute_429_that_mentions_quota_rests_the_key_instead_of_disabling_it(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    classified = classify(await raised_by(fake, client, azure_rate_limited(retry_after=7)))

    assert classified.outcome is Outcome.RATE_LIMIT
    assert classified.retry_after_s == 7.0


async def test_a_tokens_rate_limit_rests_for_the_tokens_window_not_the_6ms_requests_reset(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    answer = error_sample("openai_rate_limit_tokens")
    assert answer.headers["x-ratelimit-reset-requests"] == "6ms"

    classified = classify(await raised_by(fake, client, answer))

    assert classified.retry_after_s == pytest.approx(18.642)


async def test_a_403_without_an_auth_code_is_rejected_and_leaves_the_key_alone(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    classified = classify(await raised_by(fake, client, error_sample("openai_unsupported_region")))

    assert classified.outcome is Outcome.REJECTED
    assert classified.code == "unsupported_country_region_territory"


@pytest.mark.parametrize("after_chunks", [0, 2], ids=["before-any-chunk", "after-two-chunks"])
async def test_insufficient_quota_inside_the_stream_kills_the_key_instead_of_retrying(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, after_chunks: int
) -> None:
    answer = in_stream_error(
        "insufficient_quota", error_type="insufficient_quota", after_chunks=after_chunks
    )

    exc = await raised_by(fake, client, answer)
    classified = classify(exc)

    assert type(exc) is openai.APIError  # no status: it came inside a 200 stream
    assert (classified.outcome, classified.key_problem) == (Outcome.KEY_DEAD, "quota")


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(429, RATE), ("402", DEAD), (502, TRANSIENT), ("some_new_code", TRANSIENT)],
)
async def test_a_numeric_code_inside_the_stream_stands_for_the_http_status(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, code: int | str, outcome: Outcome
) -> None:
    classified = classify(await raised_by(fake, client, in_stream_error(code)))

    assert classified.outcome is outcome


async def test_a_broken_connection_is_transient(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    classified = classify(await raised_by(fake, client, ResetAfter(chunks=1)))

    assert classified == Classified(Outcome.TRANSIENT, "connection error")


async def test_reasons_name_the_status_and_code_but_never_the_message(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    classified = classify(await raised_by(fake, client, error_sample("deepseek_auth_fails")))

    assert classified.reason == "401 invalid_request_error: key refused"
    assert "****" not in classified.reason


# ---- how long a key rests -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "error_type", "seconds"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, None, 1.5),
        ({"retry-after": "20", "x-ratelimit-reset-requests": "5s"}, None, 20.0),
        ({"Retry-After": "Wed, 25 Nov 2026 10:00:30 GMT"}, None, 30.0),
        ({"x-ratelimit-reset-requests": "1m30s"}, "requests", 90.0),
        ({"x-ratelimit-reset-requests": "6ms", "x-ratelimit-reset-tokens": "4s"}, "tokens", 4.0),
        ({"x-ratelimit-reset-requests": "9s", "x-ratelimit-reset-tokens": "4s"}, "tokens", 4.0),
        ({"x-ratelimit-reset-requests": "9s", "x-ratelimit-reset-tokens": "4s"}, None, 9.0),
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "12s",
                "x-ratelimit-reset-tokens": "4s",
            },
            "tokens",
            12.0,  # both windows are exhausted: the longer one decides
        ),
        ({"x-ratelimit-reset-requests": "6ms"}, None, MIN_REST_S),
        ({"retry-after": "0"}, None, MIN_REST_S),
        ({"retry-after": "Wed, 25 Nov 2026 09:59:00 GMT"}, None, MIN_REST_S),  # in the past
        ({"retry-after": "soon"}, None, None),
        ({}, None, None),
    ],
)
def test_rest_comes_from_the_most_specific_header_and_is_never_below_one_second(
    headers: dict[str, str], error_type: str | None, seconds: float | None
) -> None:
    rest = rest_seconds(headers, ProviderError(type=error_type), now=NOW)

    assert rest == (pytest.approx(seconds) if seconds is not None else None)


def test_google_retry_info_is_the_rest_when_no_header_says() -> None:
    body: Any = error_sample("gemini_quota_per_minute").body

    error = ProviderError.from_body(body)

    assert error.retry_delay_s == 26.0
    assert rest_seconds({}, error) == 26.0
    assert rest_seconds({"retry-after": "5"}, error) == 5.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h2m", 3720.0),
        ("1m30s", 90.0),
        ("20s", 20.0),
        ("18.642s", 18.642),
        ("6ms", 0.006),
        ("20 seconds", None),
        ("", None),
    ],
)
def test_durations_must_parse_whole(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


# ---- what the client does with each class --------------------------------------------------


@pytest.fixture
async def bot(fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[ChatHarness]:
    settings = make_settings(fake.base_url, [KEY_A, KEY_B])
    harness = await ChatHarness(settings, tmp_path / "bot.db", FakeTime()).start()
    yield harness
    await harness.close()


async def test_quota_event_after_text_disables_the_key_and_the_shown_answer_is_cut_not_retried(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.default.reply = "abcdefghijklmnop"
    fake.enqueue(in_stream_error("insufficient_quota", after_chunks=2))

    answer = await bot.ask("tell me")

    assert answer.finished is not None
    assert (answer.finished.text, answer.finished.complete) == ("abcdefgh", False)
    assert len(fake.requests) == 1
    assert bot.key_state(str(fake.requests[0].key)) == "disabled"


async def test_rate_limit_event_after_text_cools_the_key_and_the_shown_answer_is_cut(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.default.reply = "abcdefghijklmnop"
    fake.enqueue(in_stream_error("rate_limit_exceeded", after_chunks=1))

    answer = await bot.ask("tell me")

    assert answer.finished is not None
    assert (answer.finished.text, answer.finished.complete) == ("abcd", False)
    assert bot.key_state(str(fake.requests[0].key)) == "cooling"


async def test_quota_event_before_any_text_disables_the_key_and_the_answer_comes_from_another(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.enqueue(in_stream_sample("stream_insufficient_quota"))

    answer = await bot.ask("hello")

    assert answer.text == "echo: hello"
    first, second = fake.requests
    assert first.key != second.key
    assert bot.key_state(str(first.key)) == "disabled"
    assert bot.key_state(str(second.key)) == "active"


async def test_azure_rate_limit_cools_the_key_for_its_retry_after_and_never_disables_it(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.enqueue(azure_rate_limited(retry_after=2))

    answer = await bot.ask("hello")

    assert answer.text == "echo: hello"
    limited = str(fake.requests[0].key)
    assert bot.key_state(limited) == "cooling"
    bot.time.advance(2)
    assert bot.key_state(limited) == "active"


async def test_a_refused_region_fails_the_request_and_leaves_both_keys_in_service(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.enqueue(error_sample("openai_unsupported_region"))

    answer = await bot.ask("hello")

    assert answer.failed is not None
    assert len(fake.requests) == 1
    assert {bot.key_state(KEY_A), bot.key_state(KEY_B)} == {"active"}
