"""Raw SSE reading of a streamed completion: the request is sent as the real openai SDK client
would send it (its URL, headers and, for failures, its errors) to the fake server, which answers
with hand-written event streams; the chunks come back as dicts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from bot.llm.events import TokenUsage
from bot.llm.sse import ChatStreams, Chunk, parse_chunk, sse_lines
from tests.fakes.openai_server import FakeOpenAI, RawResponse, ResetAfter

KEY = "sk-test-sse-000000000000000000000000000001"
CLIENT_KEY = "sk-test-sse-client-wide-00000000000000000002"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def read(fake: FakeOpenAI, body: dict[str, Any] = BODY) -> list[Chunk]:
    client = openai.AsyncOpenAI(base_url=fake.base_url, api_key=CLIENT_KEY, max_retries=0)
    streams = ChatStreams(client)
    try:
        stream = await streams.open(body, api_key=KEY)
        try:
            return [chunk async for chunk in stream]
        finally:
            await stream.close()
    finally:
        await streams.aclose()
        await client.close()


def event_stream(*events: Any, done: bool = True, separator: str = "\n\n") -> RawResponse:
    body = "".join(f"data: {json.dumps(e)}{separator}" for e in events)
    if done:
        body += "data: [DONE]\n\n"
    return RawResponse(status=200, text=body, content_type="text/event-stream")


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


async def test_the_fakes_own_stream_reads_as_text_usage_and_finish_reason(
    fake: FakeOpenAI,
) -> None:
    fake.default.reply = "Hello there, streamed."
    chunks = await read(fake)
    parsed = [parse_chunk(chunk) for chunk in chunks]
    assert "".join(text for text, _, _ in parsed) == "Hello there, streamed."
    assert any(reason == "stop" for _, _, reason in parsed)


async def test_the_request_carries_its_own_key_and_the_body_as_given(fake: FakeOpenAI) -> None:
    body = {**BODY, "temperature": 0.5, "stream_options": {"include_usage": True}}
    body["messages"] = [{"role": "user", "content": "non-ASCII: 你好 ✓"}]
    await read(fake, body)
    [request] = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.key == KEY  # not the client-wide key
    assert request.body == body
    assert request.headers["Content-Type"] == "application/json"


async def test_the_request_has_the_sdk_clients_url_and_headers(fake: FakeOpenAI) -> None:
    await read(fake)
    [request] = fake.requests
    client = openai.AsyncOpenAI(base_url=fake.base_url, api_key=CLIENT_KEY, max_retries=0)
    try:
        sdk_headers = client.default_headers
    finally:
        await client.close()
    assert request.headers["User-Agent"] == sdk_headers["User-Agent"]
    assert request.headers["X-Stainless-Lang"] == sdk_headers["X-Stainless-Lang"]
    assert CLIENT_KEY not in str(request.headers)


async def test_an_error_status_is_the_sdks_own_error_with_body_and_headers(
    fake: FakeOpenAI,
) -> None:
    body = {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}
    fake.enqueue(RawResponse(status=429, text=json.dumps(body), headers={"Retry-After": "7"}))
    with pytest.raises(openai.RateLimitError) as raised:
        await read(fake)
    assert raised.value.status_code == 429
    assert raised.value.body == body["error"]
    assert raised.value.response.headers["retry-after"] == "7"
    assert str(raised.value) == "Error code: 429 - Rate limit reached"


async def test_crlf_line_ends_and_long_events_are_read(fake: FakeOpenAI) -> None:
    long_text = "x" * 200_000  # longer than aiohttp's line limit
    body = f"data: {json.dumps(delta(long_text))}\r\n\r\ndata: [DONE]\r\n\r\n"
    fake.enqueue(RawResponse(status=200, text=body, content_type="text/event-stream"))
    chunks = await read(fake)
    assert [parse_chunk(chunk)[0] for chunk in chunks] == [long_text]


async def test_lines_cut_anywhere_by_the_network_come_out_whole() -> None:
    async def blocks(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    cut = [b'data: {"a"', b": 1}\r", b"\n\r\nda", b"ta: \xe4\xbd", b"\xa0\n", b"\rlast"]
    lines = [line async for line in sse_lines(blocks(*cut))]
    assert lines == ['data: {"a": 1}', "", "data: 你", "", "last"]


async def test_comments_other_fields_and_multi_line_data_are_handled(fake: FakeOpenAI) -> None:
    body = (
        ": keep-alive\n\n"
        "event: message\nid: 1\n"
        f"data: {json.dumps(delta('a'))}\n\n"
        'data: {"choices": [{"index": 0,\n'
        'data:  "delta": {"content": "b"}}]}\n\n'
        "data: [DONE]\n\n"
        f"data: {json.dumps(delta('never'))}\n\n"
    )
    fake.enqueue(RawResponse(status=200, text=body, content_type="text/event-stream"))
    chunks = await read(fake)
    assert [parse_chunk(chunk)[0] for chunk in chunks] == ["a", "b"]


async def test_a_stream_without_done_or_final_blank_line_still_ends(fake: FakeOpenAI) -> None:
    body = f"data: {json.dumps(delta('x'))}\n\ndata: {json.dumps(delta('y', 'stop'))}"
    fake.enqueue(RawResponse(status=200, text=body, content_type="text/event-stream"))
    chunks = await read(fake)
    assert [parse_chunk(chunk) for chunk in chunks] == [("x", None, None), ("y", None, "stop")]


async def test_usage_is_read_from_the_last_chunk(fake: FakeOpenAI) -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
    fake.enqueue(event_stream(delta("hi", "stop"), usage))
    chunks = await read(fake)
    assert parse_chunk(chunks[-1]) == ("", TokenUsage(12, 3), None)


async def test_an_error_event_is_the_sdks_api_error_with_its_body(fake: FakeOpenAI) -> None:
    error = {"message": "You exceeded your current quota", "type": "insufficient_quota"}
    fake.enqueue(event_stream(delta("partial"), {"error": error}))
    with pytest.raises(openai.APIError) as raised:
        await read(fake)
    assert raised.value.body == error
    assert str(raised.value) == "You exceeded your current quota"


@pytest.mark.parametrize("event", ["not json at all", "[1, 2, 3]"])
async def test_an_unreadable_event_is_an_api_error(fake: FakeOpenAI, event: str) -> None:
    body = f"data: {json.dumps(delta('a'))}\n\ndata: {event}\n\n"
    fake.enqueue(RawResponse(status=200, text=body, content_type="text/event-stream"))
    with pytest.raises(openai.APIError, match="the model endpoint sent"):
        await read(fake)


async def test_an_error_status_is_raised_by_the_sdk_before_any_chunk(fake: FakeOpenAI) -> None:
    fake.enqueue(RawResponse(status=401, text='{"error": {"message": "bad key"}}'))
    with pytest.raises(openai.AuthenticationError):
        await read(fake)


async def test_a_refused_connection_is_the_sdks_connection_error() -> None:
    async with FakeOpenAI() as server:
        base_url = server.base_url  # nothing listens there once the fake has stopped
    client = openai.AsyncOpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0)
    streams = ChatStreams(client)
    try:
        with pytest.raises(openai.APIConnectionError):
            await streams.open(BODY, api_key=KEY)
    finally:
        await streams.aclose()
        await client.close()


async def test_a_connection_cut_mid_stream_is_a_connection_error(fake: FakeOpenAI) -> None:
    fake.default.reply = "a long answer " * 50
    fake.default.chunk_size = 5
    fake.enqueue(ResetAfter(3))
    with pytest.raises(openai.APIConnectionError):
        await read(fake)


def test_odd_chunks_parse_to_nothing_rather_than_failing() -> None:
    assert parse_chunk({}) == ("", None, None)
    assert parse_chunk({"choices": "nope", "usage": "nope"}) == ("", None, None)
    assert parse_chunk({"choices": [None, {"delta": None, "finish_reason": ""}]}) == (
        "",
        None,
        None,
    )
    assert parse_chunk({"usage": {"prompt_tokens": True, "completion_tokens": -5}}) == (
        "",
        TokenUsage(0, 0),
        None,
    )


async def test_the_proxy_the_environment_names_is_used(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", fake.base_url.removesuffix("/v1"))  # the fake as the proxy
    client = openai.AsyncOpenAI(base_url="http://llm.invalid/v1", api_key=CLIENT_KEY, max_retries=0)
    streams = ChatStreams(client)
    try:
        stream = await streams.open(BODY, api_key=KEY)
        chunks = [chunk async for chunk in stream]
        await stream.close()
    finally:
        await streams.aclose()
        await client.close()
    assert chunks
    [request] = fake.requests
    assert request.headers["Host"] == "llm.invalid"
    assert request.key == KEY


async def test_a_compressed_error_body_is_read_into_the_sdks_error(fake: FakeOpenAI) -> None:
    body = {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}
    fake.enqueue(
        RawResponse(
            status=401,
            text=json.dumps(body),
            content_type="application/json",
            compressed=True,
        )
    )
    with pytest.raises(openai.AuthenticationError) as raised:
        await read(fake)
    assert raised.value.body == body["error"]


async def test_a_stream_closed_early_leaves_no_half_read_connection_for_the_next(
    fake: FakeOpenAI,
) -> None:
    fake.default.reply = "a long answer " * 40
    fake.default.chunk_size = 5
    fake.default.chunk_delay = 0.01
    client = openai.AsyncOpenAI(base_url=fake.base_url, api_key=CLIENT_KEY, max_retries=0)
    streams = ChatStreams(client)
    try:
        for _ in range(3):
            stream = await streams.open(BODY, api_key=KEY)
            async for chunk in stream:
                if parse_chunk(chunk)[0]:
                    break  # the rest of the answer is still on its way
            await stream.close()
        fake.default.chunk_delay = 0.0
        stream = await streams.open(BODY, api_key=KEY)
        text = "".join([parse_chunk(chunk)[0] async for chunk in stream])
        await stream.close()
    finally:
        await streams.aclose()
        await client.close()
    assert text == "a long answer " * 40


async def test_a_host_the_environment_exempts_from_the_proxy_is_reached_directly(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing answers there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    chunks = await read(fake)
    assert chunks
    assert len(fake.requests) == 1
