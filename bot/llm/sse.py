"""A streamed chat completion read as raw server-sent events, without a model object per chunk.

The ``openai`` SDK builds a pydantic ``ChatCompletionChunk`` for every chunk of a stream; with a
few hundred answers streaming at once that is a large share of the bot's CPU (``bench/``). The
request still goes through the SDK (``with_streaming_response``: auth, base URL, timeouts, and
the SDK's own status errors that the key pool classifies); only the body is read here, line by
line, and each ``data:`` event decoded with ``orjson`` into a plain dict. An error the provider
sends inside the stream (``{"error": {…}}``) is raised as the same ``openai.APIError`` the SDK
would raise, and broken or slow connections as ``openai.APITimeoutError`` /
``openai.APIConnectionError``, so the classification of failures does not change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import openai
import orjson

from bot.llm.events import TokenUsage

Chunk = Mapping[str, Any]


class RawChunkStream:
    """The chunks of one streaming request, as dicts; ``close()`` releases the connection."""

    def __init__(self, manager: Any) -> None:
        self._manager = manager  # the SDK's async streaming-response context manager
        self._response: Any = None

    async def open(self) -> RawChunkStream:
        """Send the request; raises the SDK's errors for an error status."""
        self._response = await self._manager.__aenter__()
        return self

    async def close(self) -> None:
        """Close the response (an unfinished stream is cut)."""
        if self._response is not None:
            self._response = None
            await self._manager.__aexit__(None, None, None)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        http: Any = self._response.http_response  # the SDK's httpx (or httpx2) response
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
