"""A streamed chat completion read as raw server-sent events, without a model object per chunk.

The ``openai`` SDK builds a pydantic ``ChatCompletionChunk`` for every chunk of a stream, and
``chat.completions.create`` walks its typed parameters once more before sending; with a few
hundred answers streaming at once both are a large share of the bot's CPU (``bench/``). The
request still goes through the SDK, by its documented low-level ``AsyncOpenAI.post`` (auth
headers, base URL, timeouts, and the SDK's own status errors that the key pool classifies):
:func:`open_chat_stream` sends a body already serialised with ``orjson`` and keeps the
response unread. The body is read here, line by line, and each ``data:`` event decoded with
``orjson`` into a plain dict. An error the provider sends inside the stream (``{"error": {…}}``)
is raised as the same ``openai.APIError`` the SDK would raise, and broken or slow connections
as ``openai.APITimeoutError`` / ``openai.APIConnectionError``, so the classification of
failures does not change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx2
import openai
import orjson

from bot.llm.events import TokenUsage

Chunk = Mapping[str, Any]


async def open_chat_stream(
    client: openai.AsyncOpenAI, body: Mapping[str, Any], *, api_key: str
) -> RawChunkStream:
    """Send a streaming ``chat/completions`` request with ``api_key``; raises the SDK's errors
    for an error status, a timeout or a failed connection.

    The key goes in the request's own ``Authorization`` header, which the SDK keeps over its
    client-wide one, so one client serves every key without a copy per request.
    """
    response = await client.post(
        "/chat/completions",
        cast_to=httpx2.Response,  # the SDK hands back its HTTP response, body unread
        content=orjson.dumps(body),
        options={"headers": {"Authorization": f"Bearer {api_key}"}},
        stream=True,
    )
    return RawChunkStream(response)


class RawChunkStream:
    """The chunks of one streaming response, as dicts; ``close()`` releases the connection."""

    def __init__(self, response: httpx2.Response) -> None:
        self._response: httpx2.Response | None = response

    async def close(self) -> None:
        """Close the response (an unfinished stream is cut)."""
        if self._response is not None:
            response, self._response = self._response, None
            await response.aclose()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        http = self._response
        if http is None:
            return
        data: list[str] = []
        try:
            async for line in http.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[6:] if line.startswith("data: ") else line[5:])
                elif not line and data:
                    event, data = "\n".join(data), []
                    if event.startswith("[DONE]"):
                        return
                    yield _decode(event, http.request)
                # other fields (event:, id:, retry:) and ": keep-alive" comments are ignored
            if data and not data[0].startswith("[DONE]"):
                yield _decode("\n".join(data), http.request)
        except openai.APIError:
            raise
        except Exception as exc:
            failure = _transport_failure(exc, http.request)
            if failure is None:
                raise
            raise failure from exc


#: the packages whose exceptions mean "the connection failed", whichever HTTP client the SDK uses
_TRANSPORT_PACKAGES = frozenset(
    {"httpx", "httpx2", "httpcore", "httpcore2", "anyio", "h11", "aiohttp"}
)


def _transport_failure(exc: Exception, request: Any) -> openai.APIError | None:
    """The SDK's error for a connection that broke or stalled while the stream was read."""
    package = type(exc).__module__.split(".")[0]
    if package not in _TRANSPORT_PACKAGES and not isinstance(exc, OSError):
        return None
    if "Timeout" in type(exc).__name__ or isinstance(exc, TimeoutError):
        return openai.APITimeoutError(request=request)
    return openai.APIConnectionError(request=request)


def _decode(event: str, request: Any) -> Chunk:
    try:
        chunk = orjson.loads(event)
    except orjson.JSONDecodeError:
        raise openai.APIError(
            "the model endpoint sent an unreadable stream event", request=request, body=None
        ) from None
    if not isinstance(chunk, dict):
        raise openai.APIError(
            "the model endpoint sent a stream event that is not an object",
            request=request,
            body=None,
        )
    error = chunk.get("error")
    if error:  # what the SDK raises for an error event inside the stream
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = "An error occurred during streaming"
        raise openai.APIError(message, request=request, body=error)
    return chunk


def parse_chunk(chunk: Chunk) -> tuple[str, TokenUsage | None, str | None]:
    """A chunk's text, its usage (when reported) and its finish reason."""
    text = ""
    finish_reason: str | None = None
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            text += content
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            finish_reason = reason
    usage = None
    raw_usage = chunk.get("usage")
    if isinstance(raw_usage, dict):
        usage = TokenUsage(
            prompt_tokens=_count(raw_usage.get("prompt_tokens")),
            completion_tokens=_count(raw_usage.get("completion_tokens")),
        )
    return text, usage, finish_reason


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
