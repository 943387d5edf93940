"""Checking a key before it is trusted: one cheap call, through the real SDK, to the fake.

``GET /models`` first; where an endpoint has no ``/models`` a one-token chat completion with the
configured model instead. Each verdict is what the person donating the key (or running
``keys check``) is told; ``unreachable`` means nothing was learnt and nothing is stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.config import LLMSettings
from bot.llm.validation import KeyCheck, KeyVerdict, check_key
from tests.fakes.openai_server import (
    CHAT_PATH,
    MODELS_PATH,
    Behaviour,
    ErrorResponse,
    FakeOpenAI,
    Hang,
    RawResponse,
    ResetAfter,
    error_sample,
    html_page,
    insufficient_quota,
    not_found_page,
    rate_limit_exceeded,
    server_error,
)

KEY = "sk-test-donated-key-0000000000000000000042"
MODEL = "gpt-4o-mini"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def settings_for(fake: FakeOpenAI) -> LLMSettings:
    return LLMSettings(base_url=fake.base_url, model=MODEL)


async def check(fake: FakeOpenAI, *, timeout_s: float = 10.0) -> KeyCheck:
    result = await check_key(settings_for(fake), KEY, timeout_s=timeout_s)
    assert KEY not in result.detail
    assert KEY[-8:] not in result.detail
    return result


def answer_models(fake: FakeOpenAI, behaviour: Behaviour) -> None:
    fake.script(KEY, models_persistent=behaviour)


def answer_chat(fake: FakeOpenAI, behaviour: Behaviour) -> None:
    fake.script(KEY, persistent=behaviour)


# ---- the cheap call ----------------------------------------------------------------------------


async def test_a_working_key_is_valid_after_one_models_request(fake: FakeOpenAI) -> None:
    result = await check(fake)

    assert result == KeyCheck("valid", "GET /models listed 3 models")
    assert result.conclusive
    assert [(r.method, r.path, r.key) for r in fake.requests] == [("GET", MODELS_PATH, KEY)]


async def test_without_a_models_route_one_token_from_the_configured_model_decides(
    fake: FakeOpenAI,
) -> None:
    answer_models(fake, not_found_page())

    result = await check(fake)

    assert result.verdict == "valid"
    models, chat = fake.requests
    assert (models.path, chat.path) == (MODELS_PATH, CHAT_PATH)
    assert chat.model == MODEL
    assert chat.stream is False
    assert chat.body["max_tokens"] == 1


@pytest.mark.parametrize("status", [404, 405])
async def test_a_json_404_or_405_on_models_also_falls_back_to_the_chat_call(
    fake: FakeOpenAI, status: int
) -> None:
    answer_models(fake, ErrorResponse(status, {"error": {"message": "Not Found", "code": None}}))
    answer_chat(fake, error_sample("invalid_api_key"))  # the chat call decides

    result = await check(fake)

    assert result.verdict == "invalid"
    assert [r.path for r in fake.requests] == [MODELS_PATH, CHAT_PATH]


# ---- verdicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_models", "verdict"),
    [
        (error_sample("invalid_api_key"), "invalid"),
        (error_sample("deepseek_auth_fails"), "invalid"),
        (error_sample("gemini_invalid_key"), "invalid"),  # a 400 with reason API_KEY_INVALID
        (error_sample("gemini_key_leaked"), "invalid"),
        (insufficient_quota(), "no_quota"),
        (error_sample("deepseek_insufficient_balance"), "no_quota"),  # 402
        (error_sample("openrouter_no_credits"), "no_quota"),  # 402
        (error_sample("zhipu_arrears"), "no_quota"),  # 429 with 1113
        (error_sample("moonshot_no_balance"), "no_quota"),
        (error_sample("dashscope_arrearage"), "no_quota"),  # 400 Arrearage
        (rate_limit_exceeded(retry_after=20), "valid"),  # limited, so the key was accepted
        (error_sample("azure_rate_limited"), "valid"),
        (server_error(), "unreachable"),
        (error_sample("ollama_runner_crashed"), "unreachable"),
        (error_sample("openai_unsupported_region"), "unreachable"),  # says nothing of the key
        (error_sample("azure_firewall"), "unreachable"),
        (html_page(), "wrong_endpoint"),  # 200, but a web page
        (RawResponse(status=401, text="<html>Sign in</html>"), "wrong_endpoint"),
        (RawResponse(status=502, text="<html>Bad Gateway</html>"), "unreachable"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_the_models_answer_gives_the_verdict(
    fake: FakeOpenAI, on_models: Behaviour, verdict: KeyVerdict
) -> None:
    answer_models(fake, on_models)

    result = await check(fake)

    assert result.verdict == verdict
    assert result.detail
    assert result.conclusive is (verdict != "unreachable")


async def test_the_key_is_invalid_when_the_endpoint_refuses_it_on_every_route(
    fake: FakeOpenAI,
) -> None:
    fake.invalidate(KEY)

    result = await check(fake)

    assert result == KeyCheck("invalid", "401 invalid_api_key")
    assert len(fake.requests) == 1


async def test_404_on_both_routes_is_the_wrong_endpoint(fake: FakeOpenAI) -> None:
    answer_models(fake, not_found_page())
    answer_chat(fake, not_found_page())

    result = await check(fake)

    assert result.verdict == "wrong_endpoint"
    assert [r.path for r in fake.requests] == [MODELS_PATH, CHAT_PATH]


async def test_an_unknown_model_on_the_chat_call_is_the_wrong_endpoint_and_says_which(
    fake: FakeOpenAI,
) -> None:
    answer_models(fake, not_found_page())
    answer_chat(
        fake,
        ErrorResponse(
            404,
            {"error": {"message": "The model does not exist", "code": "model_not_found"}},
        ),
    )

    result = await check(fake)

    assert result == KeyCheck("wrong_endpoint", f"the endpoint does not know the model {MODEL}")


async def test_a_chat_call_refused_for_its_parameters_still_proves_the_key(
    fake: FakeOpenAI,
) -> None:
    answer_models(fake, not_found_page())
    answer_chat(fake, error_sample("context_length_exceeded"))

    result = await check(fake)

    assert result.verdict == "valid"


@pytest.mark.parametrize(
    ("on_chat", "verdict"),
    [
        (insufficient_quota(), "no_quota"),
        (error_sample("zhipu_invalid_token"), "invalid"),
        (html_page(), "wrong_endpoint"),
        (server_error(), "unreachable"),
    ],
    ids=["no_quota", "invalid", "html", "5xx"],
)
async def test_the_chat_fallback_answer_gives_the_verdict(
    fake: FakeOpenAI, on_chat: Behaviour, verdict: KeyVerdict
) -> None:
    answer_models(fake, not_found_page())
    answer_chat(fake, on_chat)

    result = await check(fake)

    assert result.verdict == verdict


async def test_a_json_answer_that_is_not_a_model_list_is_the_wrong_endpoint(
    fake: FakeOpenAI,
) -> None:
    answer_models(fake, RawResponse(text='{"status": "ok"}', content_type="application/json"))

    result = await check(fake)

    assert result.verdict == "wrong_endpoint"


# ---- nothing can be concluded ------------------------------------------------------------------


async def test_a_dropped_connection_is_unreachable(fake: FakeOpenAI) -> None:
    answer_models(fake, ResetAfter())

    result = await check(fake)

    assert result.verdict == "unreachable"
    assert not result.conclusive


async def test_a_server_that_does_not_answer_in_time_is_unreachable(fake: FakeOpenAI) -> None:
    hang = Hang()
    answer_models(fake, hang)

    result = await check(fake, timeout_s=0.2)
    hang.release()

    assert result == KeyCheck("unreachable", "GET /models: timeout")


async def test_nothing_listening_is_unreachable(fake: FakeOpenAI) -> None:
    settings = settings_for(fake)
    await fake.stop()

    result = await check_key(settings, KEY, timeout_s=2.0)

    assert result == KeyCheck("unreachable", "GET /models: connection error")
