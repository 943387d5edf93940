"""Streaming chat completions from any OpenAI-compatible endpoint, with retries across keys.

One ``openai.AsyncOpenAI`` (``max_retries=0``: retries are ours) serves every key: a chat
request is sent as that client would send it, with its leased key in its own ``Authorization``
header, over a lean aiohttp pool of its own (:class:`bot.llm.sse.ChatStreams`); the media calls
go through the SDK itself, ``with_options(api_key=…)``, which shares the SDK's pool.
``tenacity`` retries the part of a request that comes *before* the first token: lease a key,
send, read until text arrives. Each failure is classified (:mod:`bot.llm.classifier`): a
rate-limited key cools and the next attempt starts at once on another key; a dead key is
disabled, likewise; a 5xx, timeout or connection error backs off with jitter; a rejected request
(400/422) is not retried. Once text has reached the caller the request is never retried on
another key: a broken stream ends with :class:`ReplyInterrupted`, and the failure still counts
against the key as classified (an error event saying ``insufficient_quota`` mid-answer disables
the key, a rate-limit event cools it).

Every attempt that got a key ends in exactly one :data:`CallOutcome`, reported to ``on_call``
(the metrics count it): ``ok`` when its answer ended normally, else the failure's class.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from bot.config import LLMSettings
from bot.errors import LLMError, ReplyInterrupted, RequestRejected
from bot.llm.classifier import Classified, Outcome, classify
from bot.llm.events import (
    ChatMessage,
    Completed,
    DrawnImage,
    Emit,
    RequestSent,
    StreamEvent,
    TextDelta,
    TokenUsage,
    WaitingForKey,
    bridge,
)
from bot.llm.keypool import KeyPool, Lease
from bot.llm.sse import ChatStreams, Chunk, RawChunkStream, parse_chunk
from bot.logging import get_logger
from bot.timing import Sleep

log = get_logger(__name__)

T = TypeVar("T")

#: how one attempt at the endpoint ended, for the metrics
CallOutcome = Literal[
    "ok",
    "rate_limited",
    "auth",  # the key was refused (401, an auth code): disabled
    "quota",  # the key's account has no quota or balance: disabled
    "server_error",  # 5xx, 408, 409, an invalid response, an error event inside the stream
    "timeout",
    "connection_error",
    "rejected",  # the request itself was refused (400, 404, 422): not retried
]
#: told the key id and outcome of every attempt that got a key
CallObserver = Callable[[str, CallOutcome], None]


class _Retryable(Exception):
    """An attempt failed in a way another attempt may fix; ``switch`` means wait 0 (new key)."""

    def __init__(self, classified: Classified, *, switch: bool, key: str) -> None:
        super().__init__(classified.reason)
        self.classified = classified
        self.switch = switch
        self.key = key  # masked


@dataclass
class _OpenStream:
    """A request that produced its first text (or ended) and still holds its key."""

    lease: Lease
    stream: RawChunkStream
    chunks: AsyncIterator[Chunk]
    first_text: str = ""
    usage: TokenUsage | None = None
    finish_reason: str | None = None
    exhausted: bool = False

    def absorb(self, chunk: Chunk) -> str:
        """Take a chunk's usage and finish reason; return its text."""
        text, usage, finish_reason = parse_chunk(chunk)
        self.usage = usage or self.usage
        self.finish_reason = finish_reason or self.finish_reason
        return text


class LLMClient:
    """Streams answers; see the module docstring for the retry rules."""

    def __init__(
        self,
        settings: LLMSettings,
        pool: KeyPool,
        *,
        sleep: Sleep = asyncio.sleep,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 8.0,
        on_call: CallObserver | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._sleep = sleep
        self._on_call = on_call
        timeout = openai.Timeout(settings.request_timeout_s, connect=5.0)
        self._client = openai.AsyncOpenAI(
            base_url=settings.base_url,
            api_key="unused",  # every request sets its leased key
            max_retries=0,
            timeout=timeout,
            # The SDK's own aiohttp transport (for the media calls): at 200 concurrent streams
            # httpx's pool cost a fifth more CPU per answer (bench/RESULTS.md).
            http_client=openai.DefaultAioHttpClient(timeout=timeout),
        )
        self._chats = ChatStreams(self._client)
        self._backoff = wait_exponential_jitter(
            multiplier=backoff_initial_s, max=backoff_max_s, jitter=backoff_initial_s
        )
        self._backoff_max_s = backoff_max_s
        # Servers that reject ``stream_options`` are remembered; one client per base_url.
        self.include_usage = True

    async def aclose(self) -> None:
        """Close the HTTP connection pools."""
        await self._chats.aclose()
        await self._client.close()

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        user_id: str,
        model: str | None = None,
        temperature: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Stream the answer to ``messages`` as :class:`TextDelta` events ending in
        :class:`Completed`; :class:`WaitingForKey` when every key is cooling,
        :class:`RequestSent` as each attempt's request goes out.

        Raises :class:`~bot.errors.AllKeysUnavailable`, :class:`~bot.errors.RequestRejected`,
        :class:`~bot.errors.ReplyInterrupted` (text was already streamed) or
        :class:`~bot.errors.LLMError` (attempts exhausted).
        """
        request: dict[str, Any] = {
            "model": model or self._settings.model,
            "messages": [{"role": m.role, "content": _content(m)} for m in messages],
        }
        if temperature is not None:
            request["temperature"] = temperature

        async def produce(emit: Emit) -> None:
            await self._produce(emit, request, user_id)

        return bridge(produce)

    async def transcribe(self, audio: bytes, *, file_name: str, model: str, user_id: str) -> str:
        """The text of a voice recording (``audio/transcriptions``), with the same key and retry
        rules as answers; raise like :meth:`stream` (never :class:`ReplyInterrupted`)."""

        async def call(client: openai.AsyncOpenAI) -> str:
            result = await client.audio.transcriptions.create(
                model=model, file=(file_name, audio, _audio_type(file_name))
            )
            return str(getattr(result, "text", "") or "")

        text, _ = await self._with_key(call, user_id)
        return text

    async def draw(self, prompt: str, *, model: str, user_id: str) -> DrawnImage:
        """One image drawn for ``prompt`` (``images/generations``), as bytes; the same key and
        retry rules as answers. Raise like :meth:`transcribe`."""

        async def call(client: openai.AsyncOpenAI) -> tuple[bytes, str]:
            options: dict[str, Any] = {"model": model, "prompt": prompt, "n": 1}
            if model.startswith("dall-e"):
                options["response_format"] = "b64_json"  # gpt-image models always answer so
            timeout = max(self._settings.request_timeout_s, DRAW_TIMEOUT_S)
            result = await client.with_options(timeout=timeout).images.generate(**options)
            image = (result.data or [None])[0]
            if image is None:
                raise LLMError("the endpoint answered without an image")
            if image.b64_json:
                return base64.b64decode(image.b64_json), str(image.revised_prompt or "")
            if image.url:
                return await _fetch_image(image.url, timeout), str(image.revised_prompt or "")
            raise LLMError("the endpoint answered without an image")

        (data, revised), key_id = await self._with_key(call, user_id)
        return DrawnImage(data, key_id, revised)

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self._settings.max_attempts)
            | stop_after_delay(self._settings.request_timeout_s * self._settings.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            before_sleep=self._log_retry,
            sleep=self._sleep,
            reraise=True,
        )

    def _exhausted(self, exc: _Retryable) -> LLMError:
        return LLMError(
            f"the model endpoint failed {self._settings.max_attempts} times, "
            f"last: {exc.classified.reason}"
        )

    async def _with_key(
        self, call: Callable[[openai.AsyncOpenAI], Awaitable[T]], user_id: str
    ) -> tuple[T, str]:
        """``call`` with a leased key's client, retried across keys; its result and key id."""

        async def attempt() -> tuple[T, str]:
            lease = await self._pool.acquire(user_id)
            try:
                result = await call(self._client.with_options(api_key=lease.secret))
            except BaseException as exc:
                lease.release()
                if isinstance(exc, LLMError):
                    self._report(lease, "server_error")
                    raise _Retryable(
                        Classified(Outcome.TRANSIENT, str(exc)), switch=False, key=lease.masked
                    ) from None
                if isinstance(exc, Exception):
                    raise await self._penalize(lease, exc) from None
                raise
            lease.release()
            self._report(lease, "ok")
            await self._pool.report_success(lease.key_id)
            return result, lease.key_id

        try:
            return await self._retrying()(attempt)
        except _Retryable as exc:
            raise self._exhausted(exc) from None

    async def _produce(self, emit: Emit, request: dict[str, Any], user_id: str) -> None:
        try:
            opened: _OpenStream = await self._retrying()(self._attempt, emit, request, user_id)
        except _Retryable as exc:
            raise self._exhausted(exc) from None
        await self._finish(emit, opened)

    async def _attempt(self, emit: Emit, request: dict[str, Any], user_id: str) -> _OpenStream:
        async def on_wait(seconds: float) -> None:
            emit(WaitingForKey(seconds))

        lease = await self._pool.acquire(user_id, on_wait=on_wait)
        stream: RawChunkStream | None = None
        try:
            body = {**request, "stream": True}
            if self.include_usage:
                body["stream_options"] = {"include_usage": True}
            emit(RequestSent())
            stream = await self._chats.open(body, api_key=lease.secret)
            return await self._read_until_text(lease, stream)
        except BaseException as exc:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()
            lease.release()
            if isinstance(exc, Exception):
                raise await self._penalize(lease, exc) from None
            raise

    async def _read_until_text(self, lease: Lease, stream: RawChunkStream) -> _OpenStream:
        opened = _OpenStream(lease, stream, stream.__aiter__())
        async for chunk in opened.chunks:
            opened.first_text = opened.absorb(chunk)
            if opened.first_text:
                return opened
        opened.exhausted = True
        return opened

    async def _penalize(self, lease: Lease, exc: Exception) -> Exception:
        """Apply an attempt's failure to its key; return what to raise (retryable or final)."""
        classified = await self._settle(lease, exc)
        if classified.outcome in (Outcome.RATE_LIMIT, Outcome.KEY_DEAD):
            return _Retryable(classified, switch=True, key=lease.masked)
        if classified.outcome is Outcome.TRANSIENT:
            return _Retryable(classified, switch=False, key=lease.masked)
        if self.include_usage and _mentions_stream_options(exc):
            log.info("stream_options_unsupported", base_url=self._settings.base_url)
            self.include_usage = False
            return _Retryable(classified, switch=True, key=lease.masked)
        return RequestRejected(classified.reason, code=classified.code)

    async def _settle(self, lease: Lease, exc: Exception) -> Classified:
        """An attempt failed: classify it, report it and apply it to its key."""
        classified = classify(exc)
        self._report(lease, _call_outcome(exc, classified))
        await self._apply(lease, classified)
        return classified

    def _report(self, lease: Lease, outcome: CallOutcome) -> None:
        if self._on_call is not None:
            self._on_call(lease.key_id, outcome)

    async def _apply(self, lease: Lease, classified: Classified) -> None:
        """What a failure does to the key: cool it, disable it, count it, or nothing (rejected)."""
        if classified.outcome is Outcome.RATE_LIMIT:
            await self._pool.cool(lease.key_id, classified.retry_after_s, classified.reason)
        elif classified.outcome is Outcome.KEY_DEAD:
            await self._pool.disable(lease.key_id, classified.reason)
        elif classified.outcome is Outcome.TRANSIENT:
            await self._pool.report_transient_failure(lease.key_id, classified.reason)

    def _wait(self, state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, _Retryable) and failure.switch:
            return 0.0
        if isinstance(failure, _Retryable) and failure.classified.retry_after_s is not None:
            return min(failure.classified.retry_after_s, self._backoff_max_s)
        return float(self._backoff(state))

    def _log_retry(self, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        if not isinstance(failure, _Retryable):
            return
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "llm_retry",
            attempt=state.attempt_number,
            key=failure.key,
            reason=failure.classified.reason,
            wait_s=round(wait, 3),
        )

    async def _finish(self, emit: Emit, opened: _OpenStream) -> None:
        lease, text_so_far = opened.lease, opened.first_text
        try:
            if text_so_far:
                emit(TextDelta(text_so_far))
            if not opened.exhausted:
                async for chunk in opened.chunks:
                    text = opened.absorb(chunk)
                    if text:
                        text_so_far += text
                        emit(TextDelta(text))
        except Exception as exc:
            # Text was shown: the answer is never retried, but the key still pays for the failure
            # (an in-stream insufficient_quota disables it, a rate-limit event cools it).
            classified = await self._settle(lease, exc)
            log.warning(
                "llm_stream_broken",
                key=lease.masked,
                chars=len(text_so_far),
                outcome=classified.outcome.value,
                reason=classified.reason,
            )
            raise ReplyInterrupted(text_so_far) from None
        finally:
            with contextlib.suppress(Exception):
                await opened.stream.close()
            lease.release()
        self._report(lease, "ok")
        emit(Completed(usage=opened.usage, key_id=lease.key_id, finish_reason=opened.finish_reason))
        await self._pool.report_success(lease.key_id)


#: seconds an image may take to draw at the least (drawing is slower than answering)
DRAW_TIMEOUT_S = 180.0
#: the largest image the bot fetches when an endpoint answers with a URL
MAX_DRAWN_IMAGE_BYTES = 20 * 1024 * 1024


def _content(message: ChatMessage) -> str | list[dict[str, Any]]:
    """A message's content as the chat API takes it: text, or text and image parts."""
    if not message.images:
        return message.content
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in message.images]
    return parts


def _audio_type(file_name: str) -> str:
    suffix = file_name.rsplit(".", 1)[-1].lower()
    return {"ogg": "audio/ogg", "opus": "audio/ogg", "mp3": "audio/mpeg", "wav": "audio/wav"}.get(
        suffix, "application/octet-stream"
    )


async def _fetch_image(url: str, wait_s: float) -> bytes:
    """An image an endpoint answered with as a URL (without the API key: it is someone
    else's host), at most :data:`MAX_DRAWN_IMAGE_BYTES`."""
    try:
        async with (
            httpx.AsyncClient(timeout=wait_s, follow_redirects=True) as http,
            http.stream("GET", url) as response,
        ):
            response.raise_for_status()
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_DRAWN_IMAGE_BYTES:
                    raise LLMError("the drawn image is too large to fetch")
            return bytes(data)
    except httpx.HTTPError as exc:
        raise LLMError(f"could not fetch the drawn image: {type(exc).__name__}") from None


def _call_outcome(exc: Exception, classified: Classified) -> CallOutcome:
    if isinstance(exc, openai.APITimeoutError):  # a subclass of APIConnectionError
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    if classified.outcome is Outcome.RATE_LIMIT:
        return "rate_limited"
    if classified.outcome is Outcome.KEY_DEAD:
        return "quota" if classified.key_problem == "quota" else "auth"
    if classified.outcome is Outcome.TRANSIENT:
        return "server_error"
    return "rejected"


def _mentions_stream_options(exc: Exception) -> bool:
    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in (400, 422):
        return False
    return "stream_options" in f"{exc.param} {exc.message}"
