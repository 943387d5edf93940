"""Specs for the protocol-level OpenAI fake, exercised through the real ``openai`` SDK."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx2
import openai
import pytest
from PIL import Image

from tests.fakes.openai_server import (
    CHAT_PATH,
    DEFAULT_MODELS,
    FAKE_IMAGE_PNG,
    FAKE_IMAGE_RGB,
    FILES_PATH,
    IMAGES_PATH,
    MAX_AUDIO_BYTES,
    MODELS_PATH,
    OPENAI_ERROR_SAMPLES,
    TRANSCRIPTIONS_PATH,
    ErrorResponse,
    FakeOpenAI,
    FakeOpenAIThread,
    Hang,
    ManualClock,
    RawResponse,
    Reply,
    ResetAfter,
    StreamError,
    azure_rate_limited,
    content_policy_violation,
    context_length_exceeded,
    error_sample,
    estimate_tokens,
    html_page,
    in_stream_error,
    in_stream_sample,
    insufficient_quota,
    invalid_api_key,
    not_found_page,
    rate_limit_exceeded,
    server_error,
    solid_png,
)

KEY = "sk-test-a"
OTHER_KEY = "sk-test-b"
MODEL = "gpt-4o-mini"
WAIT = 5.0  # upper bound for event waits; never a sleep


def _messages(text: str = "hello world") -> list[Any]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": text},
    ]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as c:
        yield c


async def _stream_text(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[list[str], list[Any]]:
    stream = await client.chat.completions.create(
        model=MODEL, messages=_messages(), stream=True, **kwargs
    )
    deltas: list[str] = []
    chunks: list[Any] = []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
    return deltas, chunks


# --- happy paths ----------------------------------------------------------------------------


async def test_streaming_delivers_scripted_text_in_chunks_then_done(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply="Hello, Feishu!", chunk_size=5)

    deltas, chunks = await _stream_text(client)

    assert deltas == ["Hello", ", Fei", "shu!"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_streaming_wire_format_is_sse_data_lines_ending_with_done(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply="abcdef", chunk_size=3)
    async with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=_messages(), stream=True
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.iter_lines() if line]

    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert len(lines) == 1 + 2 + 1 + 1  # role, two content deltas, finish, [DONE]


async def test_default_reply_echoes_last_user_message(client: openai.AsyncOpenAI) -> None:
    deltas, _ = await _stream_text(client)

    assert "".join(deltas) == "echo: hello world"
    assert deltas[0] == "echo"  # default chunk size is 4 characters


async def test_include_usage_yields_final_usage_chunk_with_empty_choices(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply="one two three", chunk_size=4)

    deltas, chunks = await _stream_text(client, stream_options={"include_usage": True})

    assert "".join(deltas) == "one two three"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    expected_prompt = estimate_tokens("You are terse.") + estimate_tokens("hello world")
    assert last.usage.prompt_tokens == expected_prompt
    assert last.usage.completion_tokens == len(deltas) == 4
    assert last.usage.total_tokens == expected_prompt + 4
    assert all(c.usage is None for c in chunks[:-1])
    assert fake.requests[-1].stream_options == {"include_usage": True}


async def test_non_streaming_completion_returns_message_and_usage(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply="plain answer", chunk_size=6)

    completion = await client.chat.completions.create(model=MODEL, messages=_messages())

    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "plain answer"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2
    assert completion.usage.prompt_tokens == estimate_tokens("You are terse.") + estimate_tokens(
        "hello world"
    )
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 2


async def test_reply_can_be_a_function_of_the_request_and_one_shot_reply_overrides_it(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply=lambda rec: f"{rec.model}:{len(rec.messages)}")
    fake.script(KEY).enqueue(Reply(text="override", finish_reason="length"))

    first = await client.chat.completions.create(model=MODEL, messages=_messages())
    second = await client.chat.completions.create(model=MODEL, messages=_messages())

    assert first.choices[0].message.content == "override"
    assert first.choices[0].finish_reason == "length"
    assert second.choices[0].message.content == f"{MODEL}:2"


async def test_request_log_records_key_model_messages_stream_flag_and_body(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    await _stream_text(client, temperature=0.2)

    [record] = await fake.wait_for_requests(1, timeout=WAIT)
    assert record.path == CHAT_PATH
    assert record.key == KEY
    assert record.model == MODEL
    assert record.messages == _messages()
    assert record.stream is True
    assert record.stream_options is None
    assert record.body["temperature"] == 0.2
    assert record.last_user_text == "hello world"
    assert fake.requests_for(KEY) == [record]
    assert fake.requests_for(OTHER_KEY) == []


async def test_scripts_are_per_key_with_default_fallback(fake: FakeOpenAI) -> None:
    fake.default.reply = "from default"
    fake.script(KEY, reply="from key a")
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as a,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=OTHER_KEY, max_retries=0) as b,
    ):
        ra = await a.chat.completions.create(model=MODEL, messages=_messages())
        rb = await b.chat.completions.create(model=MODEL, messages=_messages())

    assert ra.choices[0].message.content == "from key a"
    assert rb.choices[0].message.content == "from default"


# --- errors ---------------------------------------------------------------------------------


async def test_rate_limit_error_exposes_code_and_retry_after_then_next_request_succeeds(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(rate_limit_exceeded(retry_after=7))

    with pytest.raises(openai.RateLimitError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages())
    ok = await client.chat.completions.create(model=MODEL, messages=_messages())

    err = excinfo.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.type == "requests"
    # The SDK unwraps the top-level "error" object into `body`.
    assert isinstance(err.body, dict)
    assert err.body["code"] == "rate_limit_exceeded"
    assert "try again in 7s" in err.body["message"]
    assert err.response.headers["retry-after"] == "7"
    assert err.response.headers["x-ratelimit-reset-requests"] == "7s"
    assert err.request_id is not None
    assert err.request_id.startswith("req_fake_")
    assert ok.choices[0].message.content == "echo: hello world"


async def test_rate_limit_error_while_streaming_is_raised_by_create(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.enqueue(rate_limit_exceeded())  # default queue: the next request of any key

    with pytest.raises(openai.RateLimitError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)

    assert excinfo.value.response.headers["retry-after"] == "20"


async def test_insufficient_quota_is_a_rate_limit_error_with_its_own_code(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, persistent=insufficient_quota())

    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as excinfo:
            await client.chat.completions.create(model=MODEL, messages=_messages())
        assert excinfo.value.code == "insufficient_quota"
        assert excinfo.value.type == "insufficient_quota"
        assert "retry-after" not in excinfo.value.response.headers


@pytest.mark.parametrize(
    ("name", "make", "exc_type", "status", "code"),
    [
        ("server_error", server_error, openai.InternalServerError, 500, None),
        (
            "context_length_exceeded",
            context_length_exceeded,
            openai.BadRequestError,
            400,
            "context_length_exceeded",
        ),
        ("invalid_api_key", invalid_api_key, openai.AuthenticationError, 401, "invalid_api_key"),
    ],
)
async def test_error_samples_map_to_sdk_exception_types(
    fake: FakeOpenAI,
    client: openai.AsyncOpenAI,
    name: str,
    make: Callable[[], ErrorResponse],
    exc_type: type[openai.APIStatusError],
    status: int,
    code: str | None,
) -> None:
    fake.script(KEY).enqueue(make())

    with pytest.raises(exc_type) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages())

    assert excinfo.value.status_code == status
    assert excinfo.value.code == code
    # `err.body` is the sample's inner "error" object, unwrapped by the SDK.
    assert excinfo.value.body == OPENAI_ERROR_SAMPLES[name]["body"]["error"]
    assert make() == error_sample(name)


async def test_server_error_can_carry_a_retry_after_header(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.enqueue(server_error(retry_after=1.5))

    with pytest.raises(openai.InternalServerError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages())

    assert excinfo.value.response.headers["retry-after"] == "1.5"


async def test_models_list_accepts_valid_key_and_rejects_invalid_key_with_401(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.invalidate(OTHER_KEY)

    page = await client.models.list()
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key=OTHER_KEY, max_retries=0
    ) as bad_client:
        with pytest.raises(openai.AuthenticationError) as excinfo:
            await bad_client.models.list()
        with pytest.raises(openai.AuthenticationError):
            await bad_client.chat.completions.create(model=MODEL, messages=_messages())

    assert [m.id for m in page.data] == list(DEFAULT_MODELS)
    assert excinfo.value.status_code == 401
    assert excinfo.value.code == "invalid_api_key"
    assert [r.path for r in fake.requests_for(OTHER_KEY)] == [MODELS_PATH, CHAT_PATH]


async def test_default_invalid_makes_every_unscripted_key_invalid(fake: FakeOpenAI) -> None:
    fake.default.invalid = True
    fake.script(KEY, invalid=False)
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as good,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=OTHER_KEY, max_retries=0) as bad,
    ):
        await good.models.list()
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()


async def test_missing_authorization_header_gets_openai_shaped_401(fake: FakeOpenAI) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            fake.base_url + "/chat/completions", json={"model": MODEL, "messages": []}
        ) as resp,
    ):
        body = await resp.json()

    assert resp.status == 401
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert fake.requests[-1].key is None


async def test_models_endpoint_can_be_scripted_separately_from_chat(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(server_error(), path=MODELS_PATH)

    await client.chat.completions.create(model=MODEL, messages=_messages())
    with pytest.raises(openai.InternalServerError):
        await client.models.list()
    await client.models.list()


# --- real provider errors, errors inside the stream, pages that are not an API ---------------


HTTP_SAMPLES = sorted(name for name, s in OPENAI_ERROR_SAMPLES.items() if not s.get("in_stream"))
STREAM_SAMPLES = sorted(name for name, s in OPENAI_ERROR_SAMPLES.items() if s.get("in_stream"))


@pytest.mark.parametrize("name", HTTP_SAMPLES)
async def test_every_provider_sample_reaches_the_sdk_with_its_status_headers_and_body(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, name: str
) -> None:
    sample = OPENAI_ERROR_SAMPLES[name]
    fake.script(KEY).enqueue(error_sample(name))

    with pytest.raises(openai.APIStatusError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)

    err = excinfo.value
    assert err.status_code == sample["status"]
    for header, value in sample["headers"].items():
        assert err.response.headers[header] == value
    body = sample["body"]
    # The SDK keeps the inner "error" object of an object body, and a list body as it is.
    assert err.body == (body["error"] if isinstance(body, dict) else body)


async def test_gemini_errors_arrive_as_a_one_element_list(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(error_sample("gemini_rate_limited"))

    with pytest.raises(openai.RateLimitError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages())

    assert isinstance(excinfo.value.body, list)
    assert excinfo.value.body[0]["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert excinfo.value.code is None  # nothing for the SDK to read: the classifier must


async def test_azure_rate_limited_says_quota_in_the_message_and_waits_in_retry_after(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(azure_rate_limited(retry_after=5))

    with pytest.raises(openai.RateLimitError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages())

    err = excinfo.value
    assert err.code == "429"
    assert "pricing tier. Please retry after 5 seconds" in err.message
    assert dict(err.response.headers).get("retry-after") == "5"


async def test_an_error_event_before_any_chunk_is_raised_by_the_first_iteration(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(in_stream_error("insufficient_quota", message="No quota."))
    stream = await client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)
    received: list[Any] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError) as excinfo:
        await consume()

    assert received == []
    assert type(excinfo.value) is openai.APIError
    assert excinfo.value.code == "insufficient_quota"
    assert excinfo.value.message == "No quota."


async def test_an_error_event_after_some_chunks_comes_after_their_text(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply="abcdefghij", chunk_size=2)
    fake.script(KEY).enqueue(in_stream_error("rate_limit_exceeded", after_chunks=2))
    stream = await client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)
    received: list[str] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as excinfo:
        await consume()

    assert received == ["", "ab", "cd"]  # role chunk + two content deltas
    assert excinfo.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize("name", STREAM_SAMPLES)
async def test_every_in_stream_sample_is_raised_with_its_error_object(
    fake: FakeOpenAI, client: openai.AsyncOpenAI, name: str
) -> None:
    fake.script(KEY).enqueue(in_stream_sample(name, after_chunks=1))
    stream = await client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)

    async def consume() -> None:
        async for _ in stream:
            pass

    with pytest.raises(openai.APIError) as excinfo:
        await consume()

    assert excinfo.value.body == OPENAI_ERROR_SAMPLES[name]["body"]["error"]


async def test_an_error_event_can_carry_an_sse_event_name(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(in_stream_sample("stream_zhipu_concurrency"))
    async with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=_messages(), stream=True
    ) as response:
        lines = [line async for line in response.iter_lines() if line]

    assert lines[0] == "event: error"
    assert lines[1].startswith('data: {"error": {"code": "1302"')
    assert "data: [DONE]" not in lines


async def test_a_stream_error_answers_a_non_streaming_request_with_a_500(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(StreamError({"error": {"message": "boom", "code": "server_error"}}))

    with pytest.raises(openai.InternalServerError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages())

    assert excinfo.value.code == "server_error"


def test_samples_are_used_through_the_helper_that_matches_where_they_are_sent() -> None:
    with pytest.raises(ValueError, match="in_stream_sample"):
        error_sample("stream_insufficient_quota")
    with pytest.raises(ValueError, match="error_sample"):
        in_stream_sample("insufficient_quota")


async def test_a_raw_page_is_answered_as_text_and_the_sdk_keeps_it_as_the_body(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(not_found_page(), path=MODELS_PATH)
    fake.script(KEY).enqueue(html_page(status=403))

    with pytest.raises(openai.NotFoundError) as not_found:
        await client.models.list()
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        await client.chat.completions.create(model=MODEL, messages=_messages())

    assert not_found.value.body == "404 page not found"
    assert isinstance(forbidden.value.body, str)
    assert forbidden.value.body.startswith("<!doctype html>")


async def test_a_raw_200_page_reaches_the_client_unparsed(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(RawResponse(text="<html>welcome</html>"), path=MODELS_PATH)

    response = await client.models.with_raw_response.list()

    assert response.headers["content-type"].startswith("text/html")
    assert response.http_response.text == "<html>welcome</html>"


async def test_models_persistent_answers_every_models_request_of_that_key_only(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, models_persistent=invalid_api_key())

    for _ in range(2):
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    completion = await client.chat.completions.create(model=MODEL, messages=_messages())
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key=OTHER_KEY, max_retries=0
    ) as other:
        page = await other.models.list()

    assert completion.choices[0].message.content == "echo: hello world"
    assert [m.id for m in page.data] == list(DEFAULT_MODELS)


# --- hangs, resets and gates -----------------------------------------------------------------


async def test_hang_causes_api_timeout_error_with_short_client_timeout(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    hang = Hang()
    fake.script(KEY).enqueue(hang)

    with pytest.raises(openai.APITimeoutError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages(), timeout=0.5)

    assert hang.arrived.is_set()
    assert isinstance(excinfo.value, openai.APIConnectionError)
    assert isinstance(excinfo.value.__cause__, httpx2.TimeoutException)


async def test_released_hang_answers_normally(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    hang = Hang()
    fake.enqueue(hang)
    task = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=_messages()))

    await hang.wait_arrived(WAIT)
    assert not task.done()
    hang.release()
    completion = await asyncio.wait_for(task, WAIT)

    assert completion.choices[0].message.content == "echo: hello world"


async def test_stopping_the_server_aborts_hanging_requests(fake: FakeOpenAI) -> None:
    hang = Hang()
    fake.enqueue(hang)
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as client:
        task = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=_messages())
        )
        await hang.wait_arrived(WAIT)
        await asyncio.wait_for(fake.stop(), WAIT)

        with pytest.raises(openai.APIConnectionError):
            await asyncio.wait_for(task, WAIT)


async def test_mid_stream_reset_raises_api_connection_error_after_partial_deltas(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply="abcdefghij", chunk_size=2)
    fake.script(KEY).enqueue(ResetAfter(chunks=2))
    stream = await client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)
    received: list[str] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIConnectionError) as excinfo:
        await consume()

    err = excinfo.value
    assert type(err) is openai.APIConnectionError  # not APITimeoutError
    assert isinstance(err.__cause__, httpx2.RemoteProtocolError)
    assert "incomplete chunked read" in str(err.__cause__)
    assert received == ["", "ab", "cd"]  # role chunk + two content deltas


async def test_reset_on_non_streaming_request_raises_api_connection_error(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.enqueue(ResetAfter())

    with pytest.raises(openai.APIConnectionError) as excinfo:
        await client.chat.completions.create(model=MODEL, messages=_messages())

    assert isinstance(excinfo.value.__cause__, httpx2.RemoteProtocolError)
    # The connection pool recovers: the next request succeeds.
    await client.chat.completions.create(model=MODEL, messages=_messages())


async def test_hold_next_gate_holds_request_until_released(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    gate = fake.hold_next(KEY)
    task = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=_messages()))

    await asyncio.wait_for(gate.arrived.wait(), WAIT)
    assert not task.done()
    assert len(fake.requests) == 1
    gate.release()
    completion = await asyncio.wait_for(task, WAIT)

    assert completion.choices[0].message.content == "echo: hello world"
    # A gate is one-shot: the next request is not held.
    await asyncio.wait_for(client.chat.completions.create(model=MODEL, messages=_messages()), WAIT)


async def test_hold_next_for_one_key_does_not_hold_other_keys(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    gate = fake.hold_next(OTHER_KEY)

    await asyncio.wait_for(client.chat.completions.create(model=MODEL, messages=_messages()), WAIT)

    assert not gate.arrived.is_set()


async def test_mid_stream_gate_exposes_partial_output_before_release(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply="Hello world", chunk_size=5)
    gate = fake.hold_next(after_chunks=1)
    stream = await client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)
    iterator = aiter(stream)

    role = await asyncio.wait_for(anext(iterator), WAIT)
    first = await asyncio.wait_for(anext(iterator), WAIT)
    await asyncio.wait_for(gate.arrived.wait(), WAIT)
    assert role.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == "Hello"
    assert not gate.released

    gate.release()
    rest = [c.choices[0].delta.content async for c in iterator if c.choices]
    assert rest == [" worl", "d", None]


async def test_gate_after_more_chunks_than_the_reply_has_holds_before_finish(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reply="short", chunk_size=10)
    gate = fake.hold_next(KEY, after_chunks=5)
    stream = await client.chat.completions.create(model=MODEL, messages=_messages(), stream=True)
    iterator = aiter(stream)

    contents = [(await asyncio.wait_for(anext(iterator), WAIT)).choices[0].delta.content]
    contents.append((await asyncio.wait_for(anext(iterator), WAIT)).choices[0].delta.content)
    await gate.wait_arrived(WAIT)
    gate.release()
    finish = [c.choices[0].finish_reason async for c in iterator]

    assert contents == ["", "short"]
    assert finish == ["stop"]


async def test_models_requests_can_be_held_by_a_gate(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    gate = fake.hold_next(KEY, path=MODELS_PATH)
    await client.chat.completions.create(model=MODEL, messages=_messages())  # not held

    async def list_model_ids() -> list[str]:
        return [m.id for m in (await client.models.list()).data]

    task = asyncio.create_task(list_model_ids())

    await gate.wait_arrived(WAIT)
    gate.release()
    assert await asyncio.wait_for(task, WAIT) == list(DEFAULT_MODELS)


async def test_token_delays_keep_output_intact_and_stop_interrupts_a_long_delay(
    fake: FakeOpenAI,
) -> None:
    fake.script(KEY, reply="delayed text", chunk_size=3, chunk_delay=0.001)
    fake.script(OTHER_KEY, first_token_delay=60.0)
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as quick,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=OTHER_KEY, max_retries=0) as slow,
    ):
        deltas, _ = await _stream_text(quick)
        stream = await slow.chat.completions.create(model=MODEL, messages=_messages(), stream=True)

        # Headers are sent before the first-token delay; the first chunk is pending.
        async def first_chunk() -> Any:
            return await anext(aiter(stream))

        first = asyncio.create_task(first_chunk())
        await fake.wait_for_requests(1, timeout=WAIT, key=OTHER_KEY)
        await asyncio.wait_for(fake.stop(), WAIT)

        with pytest.raises(openai.APIConnectionError):
            await asyncio.wait_for(first, WAIT)

    assert deltas == ["del", "aye", "d t", "ext"]


# --- rpm limit and stream_options ------------------------------------------------------------


async def test_rpm_limit_answers_429_with_retry_after_until_the_window_slides() -> None:
    clock = ManualClock()
    async with (
        FakeOpenAI(clock=clock) as fake,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as client,
    ):
        fake.script(KEY, rpm_limit=2)

        await client.chat.completions.create(model=MODEL, messages=_messages())
        clock.advance(10)
        await client.chat.completions.create(model=MODEL, messages=_messages())
        clock.advance(5)
        with pytest.raises(openai.RateLimitError) as excinfo:
            await client.chat.completions.create(model=MODEL, messages=_messages())
        assert excinfo.value.code == "rate_limit_exceeded"
        assert excinfo.value.response.headers["retry-after"] == "45"

        # Other keys have their own (unlimited) budget.
        async with openai.AsyncOpenAI(
            base_url=fake.base_url, api_key=OTHER_KEY, max_retries=0
        ) as other:
            await other.chat.completions.create(model=MODEL, messages=_messages())

        clock.advance(45)  # the first request leaves the 60 s window
        await client.chat.completions.create(model=MODEL, messages=_messages())
        with pytest.raises(openai.RateLimitError) as excinfo:
            await client.chat.completions.create(model=MODEL, messages=_messages())
        assert excinfo.value.response.headers["retry-after"] == "10"


async def test_reject_stream_options_answers_400_only_when_the_field_is_present(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY, reject_stream_options=True)

    with pytest.raises(openai.BadRequestError) as excinfo:
        await client.chat.completions.create(
            model=MODEL,
            messages=_messages(),
            stream=True,
            stream_options={"include_usage": True},
        )
    deltas, _ = await _stream_text(client)

    assert excinfo.value.param == "stream_options"
    assert "stream_options" in excinfo.value.message
    assert "".join(deltas) == "echo: hello world"


# --- waiting and thread mode -----------------------------------------------------------------


async def test_wait_for_requests_waits_for_the_nth_matching_request(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    waiter = asyncio.create_task(fake.wait_for_requests(2, timeout=WAIT, key=KEY))

    await client.chat.completions.create(model=MODEL, messages=_messages("one"))
    assert not waiter.done()
    await client.chat.completions.create(model=MODEL, messages=_messages("two"))
    records = await asyncio.wait_for(waiter, WAIT)

    assert [r.last_user_text for r in records] == ["one", "two"]


async def test_wait_for_requests_raises_timeout_error_when_too_few_arrive(
    fake: FakeOpenAI,
) -> None:
    with pytest.raises(TimeoutError, match="expected 1 request"):
        await fake.wait_for_requests(1, timeout=0.05)


def test_thread_mode_fake_serves_the_synchronous_client() -> None:
    with FakeOpenAIThread() as server:
        server.fake.script(KEY, reply="sync hello", chunk_size=4)
        server.fake.script(KEY).enqueue(rate_limit_exceeded(retry_after=3))
        with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as excinfo:
                client.chat.completions.create(model=MODEL, messages=_messages())
            stream = client.chat.completions.create(
                model=MODEL,
                messages=_messages(),
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            models = client.models.list()

        records = server.fake.wait_for_requests_blocking(3, timeout=WAIT)

    assert excinfo.value.response.headers["retry-after"] == "3"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "sync hello"
    assert chunks[-1].usage is not None
    assert [m.id for m in models.data] == list(DEFAULT_MODELS)
    assert [r.path for r in records] == [CHAT_PATH, CHAT_PATH, MODELS_PATH]


def test_thread_mode_gate_can_be_awaited_and_released_from_another_thread() -> None:
    server = FakeOpenAI().run_in_thread()
    try:
        gate = server.fake.hold_next()
        with (
            openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client,
            ThreadPoolExecutor(max_workers=1) as pool,
        ):
            future = pool.submit(client.chat.completions.create, model=MODEL, messages=_messages())
            gate.wait_arrived_blocking(WAIT)
            assert not future.done()
            gate.release()
            completion = future.result(WAIT)
    finally:
        server.close()

    assert completion.choices[0].message.content == "echo: hello world"


async def test_thread_mode_fake_is_awaitable_from_the_test_event_loop() -> None:
    server = FakeOpenAIThread().start()
    try:
        gate = server.fake.hold_next(KEY)
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key=KEY, max_retries=0
        ) as client:
            task = asyncio.create_task(
                client.chat.completions.create(model=MODEL, messages=_messages())
            )
            [record] = await server.fake.wait_for_requests(1, timeout=WAIT)
            await asyncio.wait_for(gate.arrived.wait(), WAIT)
            gate.release()
            completion = await asyncio.wait_for(task, WAIT)
    finally:
        server.close()

    assert record.key == KEY
    assert completion.choices[0].message.content == "echo: hello world"


def test_thread_close_aborts_a_hanging_request_and_is_idempotent() -> None:
    server = FakeOpenAIThread().start()
    hang = Hang()
    server.fake.script(KEY, persistent=hang)
    with (
        openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        future = pool.submit(client.chat.completions.create, model=MODEL, messages=_messages())
        hang.wait_arrived_blocking(WAIT)
        server.close()
        server.close()
        with pytest.raises(openai.APIConnectionError):
            future.result(WAIT)


# --- audio transcriptions --------------------------------------------------------------------

OGG = b"OggS\x00\x02" + bytes(range(250))  # what the bot forwards: Opus in Ogg, as Feishu sends


async def test_transcription_answers_the_transcript_and_logs_the_uploaded_file(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.transcript = "what is the weather"

    result = await client.audio.transcriptions.create(
        model="whisper-1",
        file=("voice.ogg", OGG, "audio/ogg"),
        language="zh",
        prompt="天气",
    )

    assert result.text == "what is the weather"
    [record] = fake.requests_for(KEY, path=TRANSCRIPTIONS_PATH)
    assert (record.method, record.key, record.model) == ("POST", KEY, "whisper-1")
    assert record.form == {"model": "whisper-1", "language": "zh", "prompt": "天气"}
    assert record.prompt == "天气"
    upload = record.files["file"]
    assert (upload.filename, upload.content_type, upload.size) == ("voice.ogg", "audio/ogg", 256)
    assert upload.data == OGG
    # The body stays JSON-friendly: the file appears as its metadata only.
    assert record.body["file"] == {
        "filename": "voice.ogg",
        "content_type": "audio/ogg",
        "size": 256,
    }
    assert record.headers["Content-Type"].startswith("multipart/form-data; boundary=")


async def test_transcript_defaults_to_the_file_name_and_answers_in_every_response_format(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    def transcribe(**kwargs: Any) -> Any:
        return client.audio.transcriptions.create(
            model="whisper-1", file=("note.mp3", b"ID3 fake mp3", "audio/mpeg"), **kwargs
        )

    assert (await transcribe()).text == "transcript of note.mp3"
    assert await transcribe(response_format="text") == "transcript of note.mp3"
    verbose = await transcribe(response_format="verbose_json", language="en")
    assert (verbose.text, verbose.language, verbose.duration) == (
        "transcript of note.mp3",
        "en",
        1.0,
    )
    assert await transcribe(response_format="srt") == (
        "1\n00:00:00,000 --> 00:00:01,000\ntranscript of note.mp3\n\n"
    )
    assert (await transcribe(response_format="vtt")).startswith("WEBVTT\n\n")


async def test_transcript_can_be_a_function_and_a_one_shot_reply_overrides_it(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.transcript = lambda record: f"{record.files['file'].size} bytes heard"
    fake.script(KEY).enqueue(Reply(text="once only"), path=TRANSCRIPTIONS_PATH)

    async def transcribe() -> str:
        result = await client.audio.transcriptions.create(
            model="whisper-1", file=("voice.ogg", OGG, "audio/ogg")
        )
        return result.text

    assert await transcribe() == "once only"
    assert await transcribe() == "256 bytes heard"


@pytest.mark.parametrize(
    ("model", "file", "response_format", "status", "param", "message"),
    [
        ("", ("voice.ogg", OGG, "audio/ogg"), None, 400, None, "you must provide a model"),
        (
            "whisper-1",
            ("voice.ogg", b"", "audio/ogg"),
            None,
            400,
            "file",
            "Audio file is too short",
        ),
        (
            "whisper-1",
            ("voice.opus", OGG, "audio/opus"),
            None,
            400,
            None,
            "Invalid file format. Supported formats: ['flac', 'm4a', 'mp3', 'mp4', 'mpeg', "
            "'mpga', 'oga', 'ogg', 'wav', 'webm']",
        ),
        ("whisper-1", ("voice", OGG, "audio/ogg"), None, 400, None, "Invalid file format"),
        (
            "whisper-1",
            ("voice.ogg", OGG, "audio/ogg"),
            "xml",
            400,
            "response_format",
            "Invalid value: 'xml'",
        ),
        (
            "whisper-1",
            ("long.wav", bytes(MAX_AUDIO_BYTES + 1), "audio/wav"),
            None,
            413,
            None,
            f"Maximum content size limit ({MAX_AUDIO_BYTES}) exceeded",
        ),
    ],
    ids=["no-model", "empty-file", "opus-name", "no-extension", "bad-format", "over-25-MiB"],
)
async def test_transcription_requests_openai_refuses_are_answered_like_openai(
    fake: FakeOpenAI,
    client: openai.AsyncOpenAI,
    model: str,
    file: tuple[str, bytes, str],
    response_format: str | None,
    status: int,
    param: str | None,
    message: str,
) -> None:
    extra: dict[str, Any] = {} if response_format is None else {"response_format": response_format}

    with pytest.raises(openai.APIStatusError) as excinfo:
        await client.audio.transcriptions.create(model=model, file=file, **extra)

    err = excinfo.value
    assert err.status_code == status
    assert isinstance(err.body, dict)
    assert err.body["message"].startswith(message)
    assert err.body["param"] == param
    assert len(fake.requests_for(KEY, path=TRANSCRIPTIONS_PATH)) == 1  # logged all the same


async def test_transcription_without_a_file_part_is_a_missing_parameter(fake: FakeOpenAI) -> None:
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            fake.base_url + "/audio/transcriptions",
            data=form,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp,
    ):
        body = await resp.json()

    assert resp.status == 400
    assert body["error"]["code"] == "missing_required_parameter"
    assert body["error"]["param"] == "file"


async def test_scripted_errors_on_the_transcription_path_reach_the_sdk_and_leave_chat_alone(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(
        rate_limit_exceeded(retry_after=3), server_error(), path=TRANSCRIPTIONS_PATH
    )

    async def transcribe(c: openai.AsyncOpenAI = client) -> str:
        result = await c.audio.transcriptions.create(
            model="whisper-1", file=("voice.ogg", OGG, "audio/ogg")
        )
        return result.text

    completion = await client.chat.completions.create(model=MODEL, messages=_messages())
    with pytest.raises(openai.RateLimitError) as limited:
        await transcribe()
    with pytest.raises(openai.InternalServerError):
        await transcribe()
    assert await transcribe() == "transcript of voice.ogg"

    assert completion.choices[0].message.content == "echo: hello world"  # chat was not scripted
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "3"

    fake.script(OTHER_KEY, transcriptions_persistent=insufficient_quota())
    fake.invalidate("sk-revoked")
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=OTHER_KEY, max_retries=0) as broke,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-revoked", max_retries=0) as revoked,
    ):
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as quota:
                await transcribe(broke)
            assert quota.value.code == "insufficient_quota"
        with pytest.raises(openai.AuthenticationError) as rejected:
            await transcribe(revoked)
    assert rejected.value.code == "invalid_api_key"


async def test_transcription_without_authorization_gets_401(fake: FakeOpenAI) -> None:
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", OGG, filename="voice.ogg", content_type="audio/ogg")
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.base_url + "/audio/transcriptions", data=form) as resp,
    ):
        body = await resp.json()

    assert resp.status == 401
    assert body["error"]["type"] == "invalid_request_error"
    assert fake.requests[-1].files["file"].data == OGG


async def test_transcriptions_can_be_held_hung_and_reset(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    def transcribe(**kwargs: Any) -> Any:
        return client.audio.transcriptions.create(
            model="whisper-1", file=("voice.ogg", OGG, "audio/ogg"), **kwargs
        )

    gate = fake.hold_next(KEY, path=TRANSCRIPTIONS_PATH)
    await client.chat.completions.create(model=MODEL, messages=_messages())  # not held
    task = asyncio.create_task(transcribe())
    await gate.wait_arrived(WAIT)
    assert not task.done()
    gate.release()
    assert (await asyncio.wait_for(task, WAIT)).text == "transcript of voice.ogg"

    fake.script(KEY).enqueue(Hang(), ResetAfter(), path=TRANSCRIPTIONS_PATH)
    with pytest.raises(openai.APITimeoutError):
        await transcribe(timeout=0.3)
    with pytest.raises(openai.APIConnectionError) as reset:
        await transcribe()
    assert isinstance(reset.value.__cause__, httpx2.RemoteProtocolError)

    waited = await fake.wait_for_requests(3, timeout=WAIT, key=KEY, path=TRANSCRIPTIONS_PATH)
    assert [r.path for r in waited] == [TRANSCRIPTIONS_PATH] * 3


async def test_transcriptions_have_their_own_rpm_window() -> None:
    clock = ManualClock()
    async with (
        FakeOpenAI(clock=clock) as fake,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0) as client,
    ):
        fake.script(KEY, rpm_limit=1)
        await client.chat.completions.create(model=MODEL, messages=_messages())
        await client.audio.transcriptions.create(
            model="whisper-1", file=("voice.ogg", OGG, "audio/ogg")
        )
        clock.advance(20)
        with pytest.raises(openai.RateLimitError) as excinfo:
            await client.audio.transcriptions.create(
                model="whisper-1", file=("voice.ogg", OGG, "audio/ogg")
            )

    assert excinfo.value.response.headers["retry-after"] == "40"


# --- image generation ------------------------------------------------------------------------


def _pixels(png: bytes) -> tuple[tuple[int, int], Any]:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image.size, image.convert("RGB").getpixel((0, 0))


def test_the_default_image_is_a_valid_png_of_a_colour_of_its_own() -> None:
    assert _pixels(FAKE_IMAGE_PNG) == ((16, 16), FAKE_IMAGE_RGB)
    assert _pixels(solid_png(3, 2, (1, 2, 3))) == ((3, 2), (1, 2, 3))
    with pytest.raises(ValueError, match="positive"):
        solid_png(0, 1)


async def test_gpt_image_answers_the_fake_png_as_b64_json_with_usage(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    result = await client.images.generate(
        model="gpt-image-1", prompt="a red panda drawing a cat", size="1024x1536", quality="low"
    )

    [image] = result.data or []
    assert image.url is None
    assert image.revised_prompt is None  # GPT image models do not revise prompts
    assert image.b64_json is not None
    assert base64.b64decode(image.b64_json) == FAKE_IMAGE_PNG
    assert _pixels(base64.b64decode(image.b64_json))[1] == FAKE_IMAGE_RGB
    assert (result.size, result.quality, result.output_format) == ("1024x1536", "low", "png")
    assert result.usage is not None
    assert result.usage.input_tokens == estimate_tokens("a red panda drawing a cat")
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    [record] = fake.requests_for(KEY, path=IMAGES_PATH)
    assert (record.model, record.prompt) == ("gpt-image-1", "a red panda drawing a cat")
    assert record.body["size"] == "1024x1536"


async def test_dall_e_url_images_are_served_without_auth_until_they_expire(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.image_png = solid_png(4, 4, (0, 128, 255))

    result = await client.images.generate(
        model="dall-e-3", prompt="a lighthouse", response_format="url"
    )
    several = await client.images.generate(model="dall-e-2", prompt="a boat", n=2)  # url: default

    [image] = result.data or []
    assert image.revised_prompt == "a lighthouse"
    assert image.b64_json is None
    assert image.url is not None
    assert image.url.startswith(f"{fake.url}{FILES_PATH}/")
    urls = [i.url for i in several.data or []]
    assert len(set(urls)) == 2
    async with aiohttp.ClientSession() as session:
        async with session.get(image.url) as resp:
            assert resp.status == 200
            assert resp.content_type == "image/png"
            assert await resp.read() == fake.image_png
        fake.image_files.clear()
        async with session.get(image.url) as resp:
            assert resp.status == 404
    downloads = [r for r in fake.requests if r.path.startswith(FILES_PATH)]
    assert [r.key for r in downloads] == [None, None]


async def test_dall_e_can_answer_b64_json_when_asked(client: openai.AsyncOpenAI) -> None:
    result = await client.images.generate(
        model="dall-e-3", prompt="a lighthouse", response_format="b64_json"
    )

    [image] = result.data or []
    assert image.b64_json is not None
    assert base64.b64decode(image.b64_json) == FAKE_IMAGE_PNG


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"model": "gpt-image-1", "prompt": ""}, "prompt", "empty_string"),
        ({"model": "gpt-image-1", "prompt": "   "}, "prompt", "empty_string"),
        (
            {"model": "gpt-image-1", "prompt": "a cat", "response_format": "b64_json"},
            "response_format",
            "unknown_parameter",
        ),
        (
            {"model": "dall-e-3", "prompt": "a cat", "response_format": "png"},
            "response_format",
            "invalid_value",
        ),
        ({"model": "dall-e-3", "prompt": "a cat", "n": 2}, "n", "integer_above_max_value"),
        ({"model": "gpt-image-1", "prompt": "a cat", "n": 11}, "n", "integer_above_max_value"),
        ({"model": "gpt-image-1", "prompt": "a cat", "n": 0}, "n", "integer_below_min_value"),
    ],
    ids=["empty", "blank", "gpt-image-format", "bad-format", "dall-e-3-n", "n-11", "n-0"],
)
async def test_image_requests_openai_refuses_are_answered_with_400(
    client: openai.AsyncOpenAI, kwargs: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        await client.images.generate(**kwargs)

    assert excinfo.value.param == param
    assert excinfo.value.code == code
    assert excinfo.value.type == "invalid_request_error"


async def test_image_request_without_a_prompt_or_json_is_refused(fake: FakeOpenAI) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    url = fake.base_url + "/images/generations"
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(url, json={"model": "gpt-image-1"}) as resp:
            missing = (resp.status, (await resp.json())["error"]["code"])
        async with session.post(
            url, data=b"{not json", headers={"Content-Type": "application/json"}
        ) as resp:
            garbled = (resp.status, (await resp.json())["error"]["message"])

    assert missing == (400, "missing_required_parameter")
    assert garbled[0] == 400
    assert garbled[1].startswith("We could not parse the JSON body")


async def test_scripted_errors_on_the_image_path_reach_the_sdk(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    fake.script(KEY).enqueue(
        content_policy_violation(),
        rate_limit_exceeded(retry_after=5),
        invalid_api_key(),
        server_error(),
        path=IMAGES_PATH,
    )

    def draw() -> Any:
        return client.images.generate(model="gpt-image-1", prompt="something forbidden")

    with pytest.raises(openai.BadRequestError) as refused:
        await draw()
    with pytest.raises(openai.RateLimitError) as limited:
        await draw()
    with pytest.raises(openai.AuthenticationError):
        await draw()
    with pytest.raises(openai.InternalServerError):
        await draw()
    assert (await draw()).data is not None

    assert refused.value.code == "content_policy_violation"
    assert refused.value.message.startswith(
        "Error code: 400 - Your request was rejected as a result of our safety system."
    )
    assert refused.value.body == content_policy_violation().body["error"]
    assert limited.value.response.headers["retry-after"] == "5"

    fake.script(KEY, images_persistent=content_policy_violation())
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            await draw()
    await client.chat.completions.create(model=MODEL, messages=_messages())  # chat unaffected


async def test_image_generation_and_downloads_can_be_held_and_hung(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    gate = fake.hold_next(path=IMAGES_PATH)
    task = asyncio.create_task(
        client.images.generate(model="dall-e-3", prompt="a lighthouse", response_format="url")
    )
    await gate.wait_arrived(WAIT)
    assert not task.done()
    gate.release()
    url = ((await asyncio.wait_for(task, WAIT)).data or [])[0].url
    assert url is not None

    fake.enqueue(Hang(), path=IMAGES_PATH)
    with pytest.raises(openai.APITimeoutError):
        await client.images.generate(model="gpt-image-1", prompt="slow", timeout=0.3)

    # Downloads carry no key: script them on the default queue.
    fake.enqueue(server_error(), path=FILES_PATH)
    download = fake.hold_next(path=FILES_PATH)
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.get(url))
        await download.wait_arrived(WAIT)
        download.release()
        async with await asyncio.wait_for(pending, WAIT) as resp:
            assert resp.status == 500
        async with session.get(url) as resp:
            assert await resp.read() == FAKE_IMAGE_PNG
