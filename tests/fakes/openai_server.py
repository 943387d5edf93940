"""Protocol-level fake of an OpenAI-compatible HTTP API for tests.

The fake is a real :mod:`aiohttp.web` server bound to ``127.0.0.1`` on an ephemeral port, so
tests drive the *real* ``openai`` SDK over real sockets and nothing inside the SDK is mocked::

    async with FakeOpenAI() as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-a", max_retries=0)
        fake.script("sk-a", reply="hello there", chunk_size=3)
        fake.script("sk-a").enqueue(rate_limit_exceeded(retry_after=7))  # first request -> 429
        ...

For subprocess / end-to-end tests the fake can run on its own event loop in a background
thread (:class:`FakeOpenAIThread` or :meth:`FakeOpenAI.run_in_thread`); every configuration
method, :class:`Gate` and the request log are thread-safe, and :class:`SignalEvent` can be
awaited from any event loop or waited on with a blocking call.

Endpoints: ``POST /v1/chat/completions`` (streaming SSE and non-streaming), ``GET /v1/models``
and ``GET /v1/models/{model}``, ``POST /v1/audio/transcriptions`` (:data:`TRANSCRIPTIONS_PATH`)
and ``POST /v1/images/generations`` (:data:`IMAGES_PATH`). Authorization must be
``Bearer <key>``. Generated images asked for as URLs are served without auth at
``GET /files/<name>.png`` (:data:`FILES_PATH`, on :attr:`FakeOpenAI.url`, not under ``/v1``).

Scripting is per API key with a fallback :attr:`FakeOpenAI.default` script. The order in
which a chat request is processed is:

1. parse + log the request (:attr:`FakeOpenAI.requests`), wake :meth:`wait_for_requests`;
2. missing ``Authorization`` -> 401; key marked ``invalid`` -> 401 ``invalid_api_key``;
3. per-key requests-per-minute limit (``rpm_limit``) -> 429 ``rate_limit_exceeded``;
4. pick the behaviour: the key's one-shot queue, else the default script's one-shot queue,
   else the key's (or default's) ``persistent`` behaviour;
5. hold on a :class:`Gate` from :meth:`FakeOpenAI.hold_next` (``after_chunks=0``) and/or a
   :class:`Hang` behaviour until released (or the server stops: the connection is aborted);
6. :class:`ErrorResponse` behaviours are answered as-is (any status, headers and JSON body,
   e.g. the real provider errors of :data:`OPENAI_ERROR_SAMPLES` via :func:`error_sample`),
   :class:`RawResponse` likewise (HTML or plain text: not an OpenAI API at all);
7. ``reject_stream_options`` + a ``stream_options`` field -> 400;
8. the reply (scripted text, or ``"echo: <last user message>"``), streamed in chunks of
   ``chunk_size`` characters, optionally cut by :class:`ResetAfter`, broken by an SSE error
   event (:class:`StreamError`, before any chunk or after some) or paused by a mid-stream
   :class:`Gate`.

``GET /v1/models`` follows steps 1, 2, 4 (one-shot queue, else ``models_persistent``), 5 and 6,
so a key can answer ``/models`` with a 401, a 404 page and so on while chat works, or the other
way round.

The media endpoints follow the chat order with their own validation in place of step 7 (before
step 3, as for chat's ``messages``), their own rpm window per key and path, their own queue and
``*_persistent`` behaviour; a :class:`StreamError` answers HTTP 500, a :class:`ResetAfter`
aborts before any byte, and :meth:`FakeOpenAI.hold_next` takes their ``path``::

    fake.script("sk-a").enqueue(rate_limit_exceeded(3), path=TRANSCRIPTIONS_PATH)
    fake.script("sk-a", images_persistent=content_policy_violation())
    gate = fake.hold_next("sk-a", path=IMAGES_PATH)

* ``audio/transcriptions`` takes the multipart form the SDK sends (``model``, ``file``, optional
  ``response_format``, ``language``, ``prompt`` …), logged as :attr:`RequestRecord.form` and
  :attr:`RequestRecord.files` (``record.files["file"].data``). It answers 400 like OpenAI for a
  missing ``model`` or ``file``, a file name whose extension is not one of
  :data:`AUDIO_EXTENSIONS` (``voice.opus`` is refused, ``voice.ogg`` accepted), an empty file and
  an unknown ``response_format``; 413 above 25 MiB. The transcript is
  :attr:`FakeOpenAI.transcript` (a string, a function of the record, or ``None`` for
  ``"transcript of <file name>"``), or the ``text`` of a one-shot :class:`Reply`; it is answered
  as ``{"text": ...}`` (``json`` or no format), plain text (``text``), ``verbose_json``, ``srt``
  or ``vtt``.
* ``images/generations`` takes ``{model, prompt, n?, size?, quality?, response_format?}`` and
  answers :attr:`FakeOpenAI.image_png` (default :data:`FAKE_IMAGE_PNG`, a solid
  :data:`FAKE_IMAGE_RGB` square) ``n`` times: as ``b64_json`` with gpt-image usage for
  ``gpt-image-*`` models (which, like OpenAI, refuse a ``response_format`` with 400
  ``unknown_parameter``), as a URL for ``dall-e-*`` models unless ``response_format`` is
  ``b64_json`` (``revised_prompt`` for ``dall-e-3``). A missing or empty prompt or a bad ``n``
  answers 400; :func:`content_policy_violation` is the safety system's refusal.

Usage numbers are deterministic: ``prompt_tokens`` is the sum of :func:`estimate_tokens` over
the text of every message, ``completion_tokens`` is the number of content chunks of the reply
(the same chunking is used for streaming and non-streaming answers).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import math
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeAlias

from aiohttp import web

from tests.fakes._background import (
    LISTEN_BACKLOG,
    FormFile,
    Latch,
    ServerLifecycle,
    ServerThread,
    SignalEvent,
    form_summary,
    read_form,
    wait_any,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "CHAT_PATH",
    "DEFAULT_MODELS",
    "FAKE_IMAGE_PNG",
    "FAKE_IMAGE_RGB",
    "FILES_PATH",
    "IMAGES_PATH",
    "MAX_AUDIO_BYTES",
    "MISSING_API_KEY_ERROR",
    "MODELS_PATH",
    "OPENAI_ERROR_SAMPLES",
    "SAMPLES_FILE",
    "STREAM_OPTIONS_UNSUPPORTED_ERROR",
    "TRANSCRIPTIONS_PATH",
    "TRANSCRIPTION_FORMATS",
    "Behaviour",
    "ErrorResponse",
    "FakeOpenAI",
    "FakeOpenAIThread",
    "FormFile",
    "Gate",
    "Hang",
    "KeyScript",
    "ManualClock",
    "RawResponse",
    "Reply",
    "RequestRecord",
    "ResetAfter",
    "SignalEvent",
    "StreamError",
    "azure_rate_limited",
    "content_policy_violation",
    "context_length_exceeded",
    "echo_reply",
    "error_sample",
    "estimate_tokens",
    "html_page",
    "in_stream_error",
    "in_stream_sample",
    "insufficient_quota",
    "invalid_api_key",
    "not_found_page",
    "rate_limit_exceeded",
    "server_error",
    "solid_png",
    "split_chunks",
]

JSON: TypeAlias = dict[str, Any]

CHAT_PATH: Final = "/v1/chat/completions"
MODELS_PATH: Final = "/v1/models"
TRANSCRIPTIONS_PATH: Final = "/v1/audio/transcriptions"
IMAGES_PATH: Final = "/v1/images/generations"
FILES_PATH: Final = "/files"
"""Where generated images asked for as URLs are served: ``GET /files/<name>.png`` (no auth)."""
AUDIO_EXTENSIONS: Final = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
"""File name extensions ``audio/transcriptions`` accepts (OpenAI's list; it checks the name)."""
MAX_AUDIO_BYTES: Final = 25 * 1024 * 1024
"""OpenAI's upload limit for ``audio/transcriptions`` (larger files answer 413)."""
TRANSCRIPTION_FORMATS: Final = ("json", "text", "srt", "verbose_json", "vtt")
_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
DEFAULT_MODELS: Final[tuple[str, ...]] = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")
RPM_WINDOW_SECONDS: Final = 60.0

SAMPLES_FILE: Final = Path(__file__).with_name("samples") / "openai_errors.json"


def _load_samples() -> dict[str, JSON]:
    samples: dict[str, JSON] = json.loads(SAMPLES_FILE.read_text(encoding="utf-8"))
    for name, sample in samples.items():
        missing = {"status", "headers", "body", "source"} - set(sample)
        if missing:
            raise ValueError(f"{SAMPLES_FILE.name}: sample {name!r} lacks {sorted(missing)}")
    return samples


#: Real error answers of OpenAI-compatible providers, by name (``samples/openai_errors.json``):
#: ``status``, ``headers``, ``body`` (a JSON object, or a list for Gemini), ``source`` (where
#: the body was seen), and for errors sent inside a 200 SSE stream ``in_stream: true`` and
#: optionally ``event`` (the SSE event name). The first five are the project's shared samples.
OPENAI_ERROR_SAMPLES: Final[dict[str, JSON]] = _load_samples()

MISSING_API_KEY_ERROR: Final[JSON] = {
    "error": {
        "message": (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        ),
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
}

STREAM_OPTIONS_UNSUPPORTED_ERROR: Final[JSON] = {
    "error": {
        "message": "Unrecognized request argument supplied: stream_options",
        "type": "invalid_request_error",
        "param": "stream_options",
        "code": None,
    }
}


def solid_png(
    width: int = 16, height: int = 16, rgb: tuple[int, int, int] = (255, 0, 255)
) -> bytes:
    """A valid PNG of one colour (8-bit RGB, no interlace), built with :mod:`zlib` alone."""
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


FAKE_IMAGE_RGB: Final = (255, 0, 255)
"""The colour of :data:`FAKE_IMAGE_PNG`: magenta, so a test can tell the fake's image apart."""
FAKE_IMAGE_PNG: Final = solid_png(16, 16, FAKE_IMAGE_RGB)
"""The default :attr:`FakeOpenAI.image_png`: a 16x16 PNG of :data:`FAKE_IMAGE_RGB`."""


# --------------------------------------------------------------------------------------------
# Hold points
# --------------------------------------------------------------------------------------------


class Gate(Latch):
    """Holds one request until :meth:`release` (created by :meth:`FakeOpenAI.hold_next`).

    With ``after_chunks == 0`` the request is held before any response byte is sent. With
    ``after_chunks == n > 0`` a streaming reply is paused right after the n-th content chunk
    has been written (the role chunk is not counted), so the client can observe partial output
    (if the reply has fewer chunks, it holds before the finish chunk); for a non-streaming
    request such a gate holds before the response instead.
    """

    def __init__(self, key: str | None, path: str, after_chunks: int) -> None:
        super().__init__()
        if after_chunks < 0:
            raise ValueError("after_chunks must be >= 0")
        self.key = key
        self.path = path
        self.after_chunks = after_chunks

    def __repr__(self) -> str:
        return (
            f"<Gate key={self.key!r} path={self.path!r} after_chunks={self.after_chunks} "
            f"arrived={self.arrived.is_set()} released={self.released}>"
        )


# --------------------------------------------------------------------------------------------
# Behaviours
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorResponse:
    """Answer with an HTTP error: ``status``, extra ``headers`` and a JSON ``body``.

    The body is usually an object (``{"error": {...}}``); Gemini's OpenAI-compatible endpoint
    answers with a one-element list (``[{"error": {...}}]``), so any JSON value is accepted.
    """

    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)

    def with_retry_after(self, retry_after: float | str | None) -> ErrorResponse:
        """Copy with the ``retry-after`` header set (``None`` removes retry hints)."""
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("retry-after", "retry-after-ms", "x-ratelimit-reset-requests")
        }
        if retry_after is not None:
            value = _format_seconds(retry_after)
            headers["retry-after"] = value
            headers["x-ratelimit-reset-requests"] = f"{value}s"
        return replace(self, headers=headers)

    def with_headers(self, **headers: str) -> ErrorResponse:
        """Copy with extra headers (underscores in names become dashes)."""
        merged = dict(self.headers)
        merged.update({k.replace("_", "-"): v for k, v in headers.items()})
        return replace(self, headers=merged)

    @property
    def code(self) -> str | None:
        """The ``error.code`` of the body, if any."""
        body = self.body[0] if isinstance(self.body, list) and self.body else self.body
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = error.get("code")
            return None if code is None else str(code)
        return None


class Hang(Latch):
    """Accept the request and answer nothing until :meth:`release` or the server stops.

    Once released the request proceeds normally (scripted reply). When the server stops first
    the connection is aborted. As a ``persistent`` behaviour every request hangs on the same
    latch and one :meth:`release` frees all of them.
    """


@dataclass(frozen=True)
class ResetAfter:
    """Abort the TCP connection after ``chunks`` content chunks of a streaming reply.

    The role chunk is sent first and not counted, so ``ResetAfter(2)`` lets the client see the
    role chunk and two content deltas before the stream breaks. For a non-streaming request the
    connection is aborted before any response is written.
    """

    chunks: int = 0


@dataclass(frozen=True)
class Reply:
    """Override the reply for one request (``None`` fields fall back to the key's script)."""

    text: str | None = None
    chunk_size: int | None = None
    first_token_delay: float | None = None
    chunk_delay: float | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class StreamError:
    """Answer 200 and send ``payload`` (an object with an ``"error"`` field) as an SSE data event.

    ``after_chunks == 0`` sends it as the very first event, before any chunk (not even the role
    chunk); ``after_chunks == n`` sends the role chunk and ``n`` content chunks first, so the
    client has shown text. ``event`` names the SSE event (Zhipu sends ``event: error``). The
    stream then ends without ``[DONE]``. The openai SDK raises :class:`openai.APIError` (no
    status) with ``body == payload["error"]``. A non-streaming request gets HTTP 500 with
    ``payload`` as its body instead.
    """

    payload: JSON
    after_chunks: int = 0
    event: str | None = None


@dataclass(frozen=True)
class RawResponse:
    """Answer something that is not an OpenAI API: any status with a raw text body.

    For a base URL that points at a web page, a proxy or another service (HTML, plain text).
    """

    status: int = 200
    text: str = "<!doctype html><html><head><title>Welcome</title></head><body>Hi</body></html>"
    content_type: str = "text/html"
    headers: Mapping[str, str] = field(default_factory=dict)
    #: sent gzip-compressed (``Content-Encoding: gzip``), as proxies and CDNs do
    compressed: bool = False


Behaviour: TypeAlias = ErrorResponse | Hang | ResetAfter | Reply | StreamError | RawResponse


def _format_seconds(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return str(int(value))
    return str(value)


def error_sample(name: str) -> ErrorResponse:
    """Build an :class:`ErrorResponse` from :data:`OPENAI_ERROR_SAMPLES` (a deep copy)."""
    sample = OPENAI_ERROR_SAMPLES[name]
    if sample.get("in_stream"):
        raise ValueError(f"{name!r} is sent inside a stream: use in_stream_sample({name!r})")
    return ErrorResponse(
        status=int(sample["status"]),
        body=copy.deepcopy(sample["body"]),
        headers=dict(sample["headers"]),
    )


def rate_limit_exceeded(retry_after: float | str | None = 20) -> ErrorResponse:
    """429 ``rate_limit_exceeded`` with ``retry-after`` (default 20 s, ``None`` drops it)."""
    err = error_sample("rate_limit_exceeded").with_retry_after(retry_after)
    if retry_after is not None:
        message = str(err.body["error"]["message"])
        err.body["error"]["message"] = message.replace(
            "try again in 20s.", f"try again in {_format_seconds(retry_after)}s."
        )
    return err


def insufficient_quota() -> ErrorResponse:
    """429 ``insufficient_quota`` (no retry headers)."""
    return error_sample("insufficient_quota")


def invalid_api_key() -> ErrorResponse:
    """401 ``invalid_api_key``."""
    return error_sample("invalid_api_key")


def server_error(retry_after: float | str | None = None) -> ErrorResponse:
    """500 ``server_error`` (``error.code`` is null), optionally with ``retry-after``."""
    err = error_sample("server_error")
    return err if retry_after is None else err.with_retry_after(retry_after)


def context_length_exceeded() -> ErrorResponse:
    """400 ``context_length_exceeded`` with ``param == "messages"``."""
    return error_sample("context_length_exceeded")


def azure_rate_limited(retry_after: float | str = 2) -> ErrorResponse:
    """Azure OpenAI's per-minute 429: body code ``"429"``, wording about "quota", ``Retry-After``.

    Only a rate limit: the key must rest ``retry_after`` seconds, never be disabled.
    """
    err = error_sample("azure_rate_limited")
    value = _format_seconds(retry_after)
    err.body["error"]["message"] = str(err.body["error"]["message"]).replace(
        "retry after 2 seconds", f"retry after {value} seconds"
    )
    return replace(err, headers={"retry-after": value})


def in_stream_sample(name: str, *, after_chunks: int = 0) -> StreamError:
    """A :class:`StreamError` from an ``in_stream`` sample of :data:`OPENAI_ERROR_SAMPLES`."""
    sample = OPENAI_ERROR_SAMPLES[name]
    if not sample.get("in_stream"):
        raise ValueError(f"{name!r} is an HTTP error: use error_sample({name!r})")
    event = sample.get("event")
    return StreamError(
        copy.deepcopy(sample["body"]),
        after_chunks=after_chunks,
        event=event if isinstance(event, str) else None,
    )


def in_stream_error(
    code: str | int | None,
    *,
    message: str = "The stream failed.",
    error_type: str | None = None,
    after_chunks: int = 0,
    event: str | None = None,
) -> StreamError:
    """An SSE ``data: {"error": {...}}`` event with this ``code`` (and ``error_type``).

    ``in_stream_error("insufficient_quota", after_chunks=2)`` breaks a reply after two chunks.
    """
    error: JSON = {"message": message, "type": error_type, "param": None, "code": code}
    return StreamError({"error": error}, after_chunks=after_chunks, event=event)


def content_policy_violation() -> ErrorResponse:
    """400 ``content_policy_violation``: OpenAI's safety system refused an image prompt."""
    return ErrorResponse(
        400,
        {
            "error": {
                "code": "content_policy_violation",
                "message": (
                    "Your request was rejected as a result of our safety system. Your prompt "
                    "may contain text that is not allowed by our safety system."
                ),
                "type": "invalid_request_error",
                "param": None,
            }
        },
    )


def _invalid_request(
    message: str, *, param: str | None = None, code: str | None = None, status: int = 400
) -> ErrorResponse:
    error: JSON = {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": code,
    }
    return ErrorResponse(status, {"error": error})


#: OpenAI's answer to a body that is not JSON
_NOT_JSON: Final = _invalid_request(
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent "
    "was not valid JSON.)"
)


def not_found_page(status: int = 404) -> RawResponse:
    """What a server without this route answers: ``404 page not found`` as plain text.

    Ollama answered ``GET /v1/models`` like this before it had the route (ollama/ollama#3050).
    """
    return RawResponse(status=status, text="404 page not found", content_type="text/plain")


def html_page(status: int = 200) -> RawResponse:
    """An HTML page where an API was expected (a base URL pointing at a website)."""
    return RawResponse(status=status)


# --------------------------------------------------------------------------------------------
# Scripts, records, helpers
# --------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request received by the fake (logged before it is answered).

    For a multipart request (``audio/transcriptions``) :attr:`body` holds the text fields and,
    per file field, ``{"filename", "content_type", "size"}``; the bytes are in :attr:`files`.
    """

    index: int
    time: float
    """Value of the fake's clock when the request arrived."""
    method: str
    path: str
    key: str | None
    headers: dict[str, str]
    body: JSON
    model: str | None = None
    messages: list[JSON] = field(default_factory=list)
    stream: bool = False
    stream_options: JSON | None = None
    form: dict[str, str] = field(default_factory=dict)
    """Text fields of a multipart form (``model``, ``response_format``, ``language`` …)."""
    files: dict[str, FormFile] = field(default_factory=dict)
    """File parts of a multipart form by field name: ``record.files["file"].data``."""

    @property
    def prompt(self) -> str | None:
        """The ``prompt`` of an image or transcription request, if it has one."""
        prompt = self.body.get("prompt")
        return prompt if isinstance(prompt, str) else None

    @property
    def last_user_text(self) -> str:
        """Text of the last ``user`` message ("" if there is none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _content_text(message.get("content"))
        return ""


ReplyFn: TypeAlias = Callable[[RequestRecord], str]
TranscriptFn: TypeAlias = Callable[[RequestRecord], str]


@dataclass
class KeyScript:
    """Behaviour for one API key; ``None`` fields inherit from :attr:`FakeOpenAI.default`.

    ``reply`` is a fixed string or a function of the :class:`RequestRecord`; when unset on both
    the key and the default, the reply is :func:`echo_reply`. ``rpm_limit`` is applied per key
    (a default limit gives every key its own window). ``persistent`` applies to every chat
    request without a one-shot behaviour, ``models_persistent`` likewise to ``GET /v1/models``
    (and ``/v1/models/{id}``), ``transcriptions_persistent`` to ``audio/transcriptions`` and
    ``images_persistent`` to ``images/generations``; ``queue`` holds one-shot behaviours
    consumed in order (each tagged with the path it is for).
    """

    reply: str | ReplyFn | None = None
    chunk_size: int | None = None
    first_token_delay: float | None = None
    chunk_delay: float | None = None
    finish_reason: str | None = None
    rpm_limit: int | None = None
    reject_stream_options: bool | None = None
    invalid: bool | None = None
    persistent: Behaviour | None = None
    models_persistent: Behaviour | None = None
    transcriptions_persistent: Behaviour | None = None
    images_persistent: Behaviour | None = None
    queue: deque[tuple[str, Behaviour]] = field(default_factory=deque)

    def enqueue(self, *behaviours: Behaviour, path: str = CHAT_PATH) -> KeyScript:
        """Append one-shot behaviours consumed by the next requests to ``path``."""
        for behaviour in behaviours:
            self.queue.append((path, behaviour))
        return self

    def _pop(self, path: str) -> Behaviour | None:
        for index, (queued_path, behaviour) in enumerate(self.queue):
            if queued_path == path:
                del self.queue[index]
                return behaviour
        return None


@dataclass(frozen=True)
class _Effective:
    reply: str | ReplyFn | None
    chunk_size: int
    first_token_delay: float
    chunk_delay: float
    finish_reason: str
    rpm_limit: int | None
    reject_stream_options: bool
    invalid: bool
    persistent: Behaviour | None
    models_persistent: Behaviour | None
    transcriptions_persistent: Behaviour | None
    images_persistent: Behaviour | None


class ManualClock:
    """A callable clock for the rpm window that only moves when :meth:`advance` is called."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        with self._lock:
            self._now += seconds


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return ""


def echo_reply(record: RequestRecord) -> str:
    """Default reply: ``"echo: <text of the last user message>"``."""
    return f"echo: {record.last_user_text}"


def estimate_tokens(text: str) -> int:
    """Deterministic token estimate: one token per started group of four characters."""
    return math.ceil(len(text) / 4)


def prompt_tokens_for(messages: Iterable[JSON]) -> int:
    """``prompt_tokens`` the fake reports for ``messages``."""
    return sum(estimate_tokens(_content_text(m.get("content"))) for m in messages)


def split_chunks(text: str, chunk_size: int) -> list[str]:
    """Split ``text`` into content deltas of ``chunk_size`` characters."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [text[i : i + chunk_size] for i in range(0, len(text), chunk_size)]


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _Aborted(Exception):
    """Internal: the connection was aborted (server stopping or a ResetAfter)."""


class FakeOpenAI(ServerLifecycle):
    """A scriptable OpenAI-compatible server on ``127.0.0.1`` (see the module docstring).

    Use ``async with FakeOpenAI() as fake`` (or :meth:`start` / :meth:`stop`), then point a
    client at :attr:`base_url`. ``clock`` drives the rpm window (default :func:`time.monotonic`;
    pass a :class:`ManualClock` for deterministic tests). :attr:`transcript` and
    :attr:`image_png` are what the media endpoints answer; :attr:`image_files` what
    ``GET /files/<name>`` serves.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        models: Iterable[str] = DEFAULT_MODELS,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.clock = clock
        self.models: list[str] = list(models)
        self.host = host
        self._requested_port = port
        self.default = KeyScript(
            chunk_size=4,
            first_token_delay=0.0,
            chunk_delay=0.0,
            finish_reason="stop",
            reject_stream_options=False,
            invalid=False,
        )
        self.transcript: str | TranscriptFn | None = None
        """What ``audio/transcriptions`` answers: a string, a function of the
        :class:`RequestRecord`, or ``None`` for ``"transcript of <file name>"``."""
        self.image_png: bytes = FAKE_IMAGE_PNG
        """The image every ``images/generations`` answer carries (b64 or behind a URL)."""
        self.image_files: dict[str, bytes] = {}
        """``name -> bytes`` served at ``GET /files/<name>`` (URLs of generated images); remove
        an entry to make its URL answer 404, as an expired link does."""
        self.requests: list[RequestRecord] = []
        self._scripts: dict[str, KeyScript] = {}
        self._gates: list[Gate] = []
        self._rpm_windows: dict[str, deque[float]] = {}
        self._request_waiters: list[tuple[Callable[[RequestRecord], bool], int, SignalEvent]] = []
        self._lock = threading.RLock()
        self._counter = itertools.count(1)
        self._closing = SignalEvent()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving (idempotent)."""
        if self._runner is not None:
            return
        self._closing = SignalEvent()
        app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
        app.router.add_post(CHAT_PATH, self._handle_chat)
        app.router.add_get(MODELS_PATH, self._handle_models)
        app.router.add_get(MODELS_PATH + "/{model}", self._handle_model)
        app.router.add_post(TRANSCRIPTIONS_PATH, self._handle_transcription)
        app.router.add_post(IMAGES_PATH, self._handle_images)
        app.router.add_get(FILES_PATH + "/{name}", self._handle_file)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, backlog=LISTEN_BACKLOG)
        await site.start()
        self._runner = runner
        addresses = runner.addresses
        self._port = int(addresses[0][1])

    async def stop(self) -> None:
        """Abort held/hanging requests and shut the server down (idempotent)."""
        runner, self._runner = self._runner, None
        self._closing.set()
        if runner is not None:
            await runner.cleanup()

    def run_in_thread(self) -> FakeOpenAIThread:
        """Start this fake on its own event loop in a daemon thread; ``close()`` it when done."""
        return FakeOpenAIThread(self).start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` without the ``/v1`` suffix."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, suitable for ``openai.AsyncOpenAI(base_url=...)``."""
        return f"{self.url}/v1"

    # -- scripting ---------------------------------------------------------------------------

    def script(
        self,
        key: str,
        *,
        reply: str | ReplyFn | None = None,
        chunk_size: int | None = None,
        first_token_delay: float | None = None,
        chunk_delay: float | None = None,
        finish_reason: str | None = None,
        rpm_limit: int | None = None,
        reject_stream_options: bool | None = None,
        invalid: bool | None = None,
        persistent: Behaviour | None = None,
        models_persistent: Behaviour | None = None,
        transcriptions_persistent: Behaviour | None = None,
        images_persistent: Behaviour | None = None,
    ) -> KeyScript:
        """Return the (created on demand) script of ``key``, setting every non-None argument.

        To reset a field to "inherit from default", assign ``None`` on the returned object.
        """
        with self._lock:
            script = self._scripts.setdefault(key, KeyScript())
            updates: dict[str, object] = {
                "reply": reply,
                "chunk_size": chunk_size,
                "first_token_delay": first_token_delay,
                "chunk_delay": chunk_delay,
                "finish_reason": finish_reason,
                "rpm_limit": rpm_limit,
                "reject_stream_options": reject_stream_options,
                "invalid": invalid,
                "persistent": persistent,
                "models_persistent": models_persistent,
                "transcriptions_persistent": transcriptions_persistent,
                "images_persistent": images_persistent,
            }
            for name, value in updates.items():
                if value is not None:
                    setattr(script, name, value)
            return script

    def enqueue(
        self, *behaviours: Behaviour, key: str | None = None, path: str = CHAT_PATH
    ) -> None:
        """One-shot behaviours for ``key`` (or, with ``key=None``, for any key's next request)."""
        with self._lock:
            target = self.default if key is None else self.script(key)
            target.enqueue(*behaviours, path=path)

    def invalidate(self, *keys: str) -> None:
        """Mark keys invalid: every endpoint answers 401 ``invalid_api_key``."""
        for key in keys:
            self.script(key, invalid=True)

    def hold_next(
        self, key: str | None = None, *, after_chunks: int = 0, path: str = CHAT_PATH
    ) -> Gate:
        """Hold the next request to ``path`` (from ``key``, or any key) until released.

        ``path`` is any endpoint of the fake (:data:`CHAT_PATH`, :data:`MODELS_PATH`,
        :data:`TRANSCRIPTIONS_PATH`, :data:`IMAGES_PATH`, or :data:`FILES_PATH` with ``key=None``
        for image downloads).

        ``await gate.arrived.wait()`` (or ``gate.wait_arrived_blocking()``) tells when the
        request reached the hold point; ``gate.release()`` lets it continue. ``after_chunks=1``
        pauses a streaming reply right after its first content chunk.
        """
        gate = Gate(key, path, after_chunks)
        with self._lock:
            self._gates.append(gate)
        return gate

    # -- request log -------------------------------------------------------------------------

    def requests_for(self, key: str | None, *, path: str | None = None) -> list[RequestRecord]:
        """Logged requests made with ``key`` (optionally only to ``path``)."""
        with self._lock:
            return [r for r in self.requests if r.key == key and (path is None or r.path == path)]

    def clear_requests(self) -> None:
        """Forget the request log (pending waiters keep counting from the new empty log)."""
        with self._lock:
            self.requests.clear()

    @staticmethod
    def _matcher(key: str | None, path: str | None) -> Callable[[RequestRecord], bool]:
        def match(record: RequestRecord) -> bool:
            return (key is None or record.key == key) and (path is None or record.path == path)

        return match

    def _register_request_waiter(
        self, n: int, key: str | None, path: str | None
    ) -> tuple[SignalEvent, Callable[[], list[RequestRecord]]]:
        match = self._matcher(key, path)
        event = SignalEvent()

        def matching() -> list[RequestRecord]:
            with self._lock:
                return [r for r in self.requests if match(r)]

        with self._lock:
            if len(matching()) >= n:
                event.set()
            else:
                self._request_waiters.append((match, n, event))
        return event, matching

    def _drop_request_waiter(self, event: SignalEvent) -> None:
        with self._lock:
            self._request_waiters = [w for w in self._request_waiters if w[2] is not event]

    async def wait_for_requests(
        self, n: int, timeout: float = 5.0, *, key: str | None = None, path: str | None = None
    ) -> list[RequestRecord]:
        """Wait until at least ``n`` matching requests were logged; return the first ``n``.

        Works from any event loop (also when the fake runs in another thread). Raises
        :class:`TimeoutError` after ``timeout`` seconds.
        """
        event, matching = self._register_request_waiter(n, key, path)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            self._drop_request_waiter(event)
        return self._waited_requests(event, matching, n, timeout)

    def wait_for_requests_blocking(
        self, n: int, timeout: float = 5.0, *, key: str | None = None, path: str | None = None
    ) -> list[RequestRecord]:
        """Blocking variant of :meth:`wait_for_requests` for synchronous test code."""
        event, matching = self._register_request_waiter(n, key, path)
        try:
            event.wait_blocking(timeout)
        finally:
            self._drop_request_waiter(event)
        return self._waited_requests(event, matching, n, timeout)

    @staticmethod
    def _waited_requests(
        event: SignalEvent, matching: Callable[[], list[RequestRecord]], n: int, timeout: float
    ) -> list[RequestRecord]:
        if not event.is_set():
            got = len(matching())
            raise TimeoutError(f"expected {n} request(s), got {got} after {timeout}s")
        return matching()[:n]

    # -- internals ---------------------------------------------------------------------------

    def _effective(self, key: str) -> _Effective:
        with self._lock:
            script = self._scripts.get(key)
            d = self.default

            def pick(name: str) -> Any:
                value = getattr(script, name) if script is not None else None
                return getattr(d, name) if value is None else value

            return _Effective(
                reply=pick("reply"),
                chunk_size=int(pick("chunk_size") or 4),
                first_token_delay=float(pick("first_token_delay") or 0.0),
                chunk_delay=float(pick("chunk_delay") or 0.0),
                finish_reason=str(pick("finish_reason") or "stop"),
                rpm_limit=pick("rpm_limit"),
                reject_stream_options=bool(pick("reject_stream_options")),
                invalid=bool(pick("invalid")),
                persistent=pick("persistent"),
                models_persistent=pick("models_persistent"),
                transcriptions_persistent=pick("transcriptions_persistent"),
                images_persistent=pick("images_persistent"),
            )

    def _log(
        self,
        request: web.Request,
        key: str | None,
        body: JSON,
        *,
        form: dict[str, str] | None = None,
        files: dict[str, FormFile] | None = None,
    ) -> RequestRecord:
        raw_messages = body.get("messages")
        messages = [m for m in raw_messages if isinstance(m, dict)] if raw_messages else []
        stream_options = body.get("stream_options")
        model = body.get("model")
        with self._lock:
            record = RequestRecord(
                index=len(self.requests),
                time=self.clock(),
                method=request.method,
                path=request.path,
                key=key,
                headers=dict(request.headers),
                body=body,
                model=model if isinstance(model, str) else None,
                messages=messages,
                stream=bool(body.get("stream")),
                stream_options=stream_options if isinstance(stream_options, dict) else None,
                form=dict(form or {}),
                files=dict(files or {}),
            )
            self.requests.append(record)
            woken = [w for w in self._request_waiters if sum(map(w[0], self.requests)) >= w[1]]
            self._request_waiters = [w for w in self._request_waiters if w not in woken]
        for _, _, event in woken:
            event.set()
        return record

    def _take_gate(self, key: str | None, path: str) -> Gate | None:
        with self._lock:
            for gate in self._gates:
                if gate.path == path and (gate.key is None or gate.key == key):
                    self._gates.remove(gate)
                    return gate
        return None

    def _next_behaviour(
        self, key: str | None, path: str, effective: _Effective | None
    ) -> Behaviour | None:
        with self._lock:
            script = self._scripts.get(key) if key is not None else None
            behaviour = script._pop(path) if script is not None else None
            if behaviour is None:
                behaviour = self.default._pop(path)
        if behaviour is None and effective is not None:
            persistent = {
                CHAT_PATH: effective.persistent,
                MODELS_PATH: effective.models_persistent,
                TRANSCRIPTIONS_PATH: effective.transcriptions_persistent,
                IMAGES_PATH: effective.images_persistent,
            }
            behaviour = persistent.get(path)
        return behaviour

    def _check_rpm(
        self, key: str, limit: int | None, path: str = CHAT_PATH
    ) -> ErrorResponse | None:
        if limit is None:
            return None
        now = self.clock()
        window_key = key if path == CHAT_PATH else f"{path} {key}"
        with self._lock:
            window = self._rpm_windows.setdefault(window_key, deque())
            while window and window[0] <= now - RPM_WINDOW_SECONDS:
                window.popleft()
            if len(window) < limit:
                window.append(now)
                return None
            retry_after = max(1, math.ceil(window[0] + RPM_WINDOW_SECONDS - now))
            used = len(window)
        err = rate_limit_exceeded(retry_after)
        err.body["error"]["message"] = (
            f"Rate limit reached for requests per min (RPM): Limit {limit}, Used {used}, "
            f"Requested 1. Please try again in {retry_after}s."
        )
        return err

    def _request_id(self) -> str:
        return f"req_fake_{next(self._counter)}"

    def _error(self, err: ErrorResponse) -> web.Response:
        headers = {"x-request-id": self._request_id(), **err.headers}
        return web.json_response(err.body, status=err.status, headers=headers)

    @staticmethod
    def _raw(raw: RawResponse) -> web.Response:
        response = web.Response(
            status=raw.status, text=raw.text, content_type=raw.content_type, headers=raw.headers
        )
        if raw.compressed:
            response.enable_compression(web.ContentCoding.gzip)
        return response

    def _auth(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()

    async def _hold(self, latch: Latch, request: web.Request) -> None:
        latch.arrived.set()
        which = await wait_any(latch._released, self._closing)
        if which is self._closing and not latch.released:
            self._abort(request)
            raise _Aborted

    async def _sleep(self, seconds: float, request: web.Request) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        if self._closing.is_set():
            self._abort(request)
            raise _Aborted

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    async def _scripted(
        self, request: web.Request, behaviour: Behaviour | None, gate: Gate | None
    ) -> web.StreamResponse | None:
        """Steps 5 and 6 for an endpoint without a stream: hold, then answer a scripted failure.

        Returns ``None`` when the request should be answered normally; raises ``_Aborted``.
        """
        if gate is not None:
            await self._hold(gate, request)
        if isinstance(behaviour, Hang):
            await self._hold(behaviour, request)
        if isinstance(behaviour, ErrorResponse):
            return self._error(behaviour)
        if isinstance(behaviour, RawResponse):
            return self._raw(behaviour)
        if isinstance(behaviour, StreamError):
            return self._error(ErrorResponse(500, behaviour.payload))
        if isinstance(behaviour, ResetAfter):
            self._abort(request)
            raise _Aborted
        return None

    @staticmethod
    async def _read_json(request: web.Request) -> JSON | None:
        raw = await request.read()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    # -- handlers ----------------------------------------------------------------------------

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        key = self._auth(request)
        self._log(request, key, {})
        return await self._models_common(request, key, None)

    async def _handle_model(self, request: web.Request) -> web.StreamResponse:
        key = self._auth(request)
        self._log(request, key, {})
        return await self._models_common(request, key, request.match_info["model"])

    async def _models_common(
        self, request: web.Request, key: str | None, model: str | None
    ) -> web.StreamResponse:
        if key is None:
            return self._error(ErrorResponse(401, copy.deepcopy(MISSING_API_KEY_ERROR)))
        effective = self._effective(key)
        if effective.invalid:
            return self._error(invalid_api_key())
        try:
            scripted, _ = await self._script(request, key, MODELS_PATH, effective)
            if scripted is not None:
                return scripted
        except _Aborted:
            return web.Response()
        headers = {"x-request-id": self._request_id()}
        if model is not None:
            if model not in self.models:
                return self._error(
                    ErrorResponse(
                        404,
                        {
                            "error": {
                                "message": f"The model '{model}' does not exist",
                                "type": "invalid_request_error",
                                "param": "model",
                                "code": "model_not_found",
                            }
                        },
                    )
                )
            return web.json_response(_model_object(model), headers=headers)
        data = {"object": "list", "data": [_model_object(m) for m in self.models]}
        return web.json_response(data, headers=headers)

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        key = self._auth(request)
        body = await self._read_json(request)
        record = self._log(request, key, body if body is not None else {})
        if key is None:
            return self._error(ErrorResponse(401, copy.deepcopy(MISSING_API_KEY_ERROR)))
        effective = self._effective(key)
        if effective.invalid:
            return self._error(invalid_api_key())
        if body is None or not isinstance(body.get("messages"), list):
            return self._error(
                ErrorResponse(
                    400,
                    {
                        "error": {
                            "message": "'messages' is a required property",
                            "type": "invalid_request_error",
                            "param": "messages",
                            "code": None,
                        }
                    },
                )
            )
        limited = self._check_rpm(key, effective.rpm_limit)
        if limited is not None:
            return self._error(limited)
        behaviour = self._next_behaviour(key, CHAT_PATH, effective)
        gate = self._take_gate(key, CHAT_PATH)
        try:
            if gate is not None and (gate.after_chunks == 0 or not record.stream):
                await self._hold(gate, request)
                gate = None
            if isinstance(behaviour, Hang):
                await self._hold(behaviour, request)
            if isinstance(behaviour, ErrorResponse):
                return self._error(behaviour)
            if isinstance(behaviour, RawResponse):
                return self._raw(behaviour)
            if isinstance(behaviour, StreamError) and not record.stream:
                return self._error(ErrorResponse(500, behaviour.payload))
            if effective.reject_stream_options and "stream_options" in body:
                return self._error(
                    ErrorResponse(400, copy.deepcopy(STREAM_OPTIONS_UNSUPPORTED_ERROR))
                )
            if isinstance(behaviour, ResetAfter) and not record.stream:
                self._abort(request)
                raise _Aborted
            return await self._reply(request, record, effective, behaviour, gate)
        except _Aborted:
            return web.Response()

    async def _admit(
        self, request: web.Request, key: str | None, path: str, invalid: ErrorResponse | None
    ) -> tuple[web.StreamResponse | None, Behaviour | None]:
        """Steps 2 to 6 for an endpoint without a stream: auth, the request's own ``invalid``
        answer, the rpm limit, then the scripted behaviour (held first, answered when it is a
        failure). Returns the answer to send, if any, and the behaviour; raises ``_Aborted``."""
        if key is None:
            return self._error(ErrorResponse(401, copy.deepcopy(MISSING_API_KEY_ERROR))), None
        effective = self._effective(key)
        if effective.invalid:
            return self._error(invalid_api_key()), None
        if invalid is not None:
            return self._error(invalid), None
        limited = self._check_rpm(key, effective.rpm_limit, path)
        if limited is not None:
            return self._error(limited), None
        return await self._script(request, key, path, effective)

    async def _script(
        self, request: web.Request, key: str | None, path: str, effective: _Effective | None
    ) -> tuple[web.StreamResponse | None, Behaviour | None]:
        """Steps 4 to 6 for an endpoint without a stream: pick the behaviour, hold on a gate,
        answer a scripted failure. Returns that answer, if any, and the behaviour."""
        behaviour = self._next_behaviour(key, path, effective)
        gate = self._take_gate(key, path)
        return await self._scripted(request, behaviour, gate), behaviour

    async def _handle_transcription(self, request: web.Request) -> web.StreamResponse:
        key = self._auth(request)
        form, files = await read_form(request)
        body: JSON = form_summary(form, files)
        record = self._log(request, key, body, form=form, files=files)
        try:
            refused, behaviour = await self._admit(
                request, key, TRANSCRIPTIONS_PATH, _check_transcription(record)
            )
            if refused is not None:
                return refused
            override = behaviour if isinstance(behaviour, Reply) else Reply()
            await self._sleep(override.first_token_delay or 0.0, request)
        except _Aborted:
            return web.Response()
        text = override.text if override.text is not None else self._transcript_for(record)
        headers = {"x-request-id": self._request_id()}
        response_format = record.form.get("response_format") or "json"
        if response_format == "json":
            return web.json_response({"text": text}, headers=headers)
        if response_format == "verbose_json":
            verbose = {
                "task": "transcribe",
                "language": record.form.get("language") or "english",
                "duration": 1.0,
                "text": text,
                "segments": [],
            }
            return web.json_response(verbose, headers=headers)
        if response_format == "srt":
            text = f"1\n00:00:00,000 --> 00:00:01,000\n{text}\n\n"
        elif response_format == "vtt":
            text = f"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n\n"
        return web.Response(text=text, content_type="text/plain", headers=headers)

    def _transcript_for(self, record: RequestRecord) -> str:
        transcript = self.transcript
        if transcript is None:
            part = record.files.get("file")
            return f"transcript of {part.filename if part is not None else 'audio'}"
        return transcript if isinstance(transcript, str) else transcript(record)

    async def _handle_images(self, request: web.Request) -> web.StreamResponse:
        key = self._auth(request)
        body = await self._read_json(request)
        self._log(request, key, body if body is not None else {})
        invalid = _NOT_JSON if body is None else _check_image_request(body)
        try:
            refused, behaviour = await self._admit(request, key, IMAGES_PATH, invalid)
            if refused is not None:
                return refused
            assert body is not None  # refused above as _NOT_JSON
            if isinstance(behaviour, Reply):
                await self._sleep(behaviour.first_token_delay or 0.0, request)
        except _Aborted:
            return web.Response()
        return web.json_response(
            self._images_payload(body), headers={"x-request-id": self._request_id()}
        )

    def _images_payload(self, body: JSON) -> JSON:
        model = str(body.get("model") or "dall-e-2")
        prompt = str(body["prompt"])
        n = int(body.get("n") or 1)
        gpt_image = model.startswith("gpt-image")
        response_format = body.get("response_format") or ("b64_json" if gpt_image else "url")
        image = self.image_png
        items: list[JSON] = []
        for _ in range(n):
            item: JSON
            if response_format == "url":
                name = f"img-fake{next(self._counter)}.png"
                with self._lock:
                    self.image_files[name] = image
                item = {"url": f"{self.url}{FILES_PATH}/{name}"}
            else:
                item = {"b64_json": base64.b64encode(image).decode("ascii")}
            if model.startswith("dall-e-3"):
                item["revised_prompt"] = prompt
            items.append(item)
        payload: JSON = {"created": int(time.time()), "data": items}
        if gpt_image:
            size = str(body.get("size") or "auto")
            quality = str(body.get("quality") or "auto")
            prompt_tokens = estimate_tokens(prompt)
            output_tokens = 272 * n  # what gpt-image-1 charges for one low-quality square
            payload.update(
                {
                    "background": "opaque",
                    "output_format": "png",
                    "quality": quality if quality in ("low", "medium", "high") else "high",
                    "size": size if size != "auto" else "1024x1024",
                    "usage": {
                        "input_tokens": prompt_tokens,
                        "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt_tokens},
                        "output_tokens": output_tokens,
                        "total_tokens": prompt_tokens + output_tokens,
                    },
                }
            )
        return payload

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        key = self._auth(request)
        self._log(request, key, {})
        try:
            scripted, _ = await self._script(request, key, FILES_PATH, None)
            if scripted is not None:
                return scripted
        except _Aborted:
            return web.Response()
        with self._lock:
            data = self.image_files.get(request.match_info["name"])
        if data is None:
            return web.Response(
                status=404, text="The specified blob does not exist.", content_type="text/plain"
            )
        return web.Response(body=data, content_type="image/png")

    async def _reply(
        self,
        request: web.Request,
        record: RequestRecord,
        effective: _Effective,
        behaviour: Behaviour | None,
        gate: Gate | None,
    ) -> web.StreamResponse:
        override = behaviour if isinstance(behaviour, Reply) else Reply()
        reply_source: str | ReplyFn | None = (
            override.text if override.text is not None else effective.reply
        )
        if reply_source is None:
            text = echo_reply(record)
        elif isinstance(reply_source, str):
            text = reply_source
        else:
            text = reply_source(record)
        chunk_size = override.chunk_size or effective.chunk_size
        first_delay = (
            override.first_token_delay
            if override.first_token_delay is not None
            else effective.first_token_delay
        )
        chunk_delay = (
            override.chunk_delay if override.chunk_delay is not None else effective.chunk_delay
        )
        finish_reason = override.finish_reason or effective.finish_reason
        chunks = split_chunks(text, chunk_size)
        model = record.model or self.models[0]
        usage = {
            "prompt_tokens": prompt_tokens_for(record.messages),
            "completion_tokens": len(chunks),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        completion_id = f"chatcmpl-fake{record.index}"
        created = int(time.time())

        if not record.stream:
            await self._sleep(first_delay, request)
            payload = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": usage,
            }
            return web.json_response(payload, headers={"x-request-id": self._request_id()})

        include_usage = bool((record.stream_options or {}).get("include_usage"))
        reset_after = behaviour.chunks if isinstance(behaviour, ResetAfter) else None
        stream_error = behaviour if isinstance(behaviour, StreamError) else None

        def chunk(delta: JSON, finish: str | None) -> bytes:
            obj: JSON = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "x-request-id": self._request_id(),
            },
        )
        try:
            await response.prepare(request)
            await self._sleep(first_delay, request)
            if stream_error is not None and stream_error.after_chunks == 0:
                await self._send_stream_error(response, stream_error)
                return response
            await response.write(chunk({"role": "assistant", "content": "", "refusal": None}, None))
            for sent, piece in enumerate(chunks):
                if reset_after is not None and sent >= reset_after:
                    self._abort(request)
                    return response
                if stream_error is not None and sent >= stream_error.after_chunks:
                    await self._send_stream_error(response, stream_error)
                    return response
                if sent > 0:
                    await self._sleep(chunk_delay, request)
                await response.write(chunk({"content": piece}, None))
                if gate is not None and gate.after_chunks == sent + 1:
                    await self._hold(gate, request)
                    gate = None
            if gate is not None:  # the reply has fewer chunks: hold before the finish chunk
                await self._hold(gate, request)
            if reset_after is not None:
                self._abort(request)
                return response
            if stream_error is not None:  # the reply has fewer chunks: fail before the finish
                await self._send_stream_error(response, stream_error)
                return response
            await response.write(chunk({}, finish_reason))
            if include_usage:
                usage_chunk = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [],
                    "usage": usage,
                }
                await response.write(_sse(usage_chunk))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (_Aborted, ConnectionError):
            pass
        return response

    @staticmethod
    async def _send_stream_error(response: web.StreamResponse, error: StreamError) -> None:
        await response.write(_sse(error.payload, event=error.event))
        await response.write_eof()


def _check_transcription(record: RequestRecord) -> ErrorResponse | None:
    """OpenAI's 4xx answers to a transcription request it will not take, else ``None``."""
    if not record.form.get("model"):
        return _invalid_request("you must provide a model parameter")
    part = record.files.get("file")
    if part is None:
        return _invalid_request(
            "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
        )
    extension = (part.filename or "").rpartition(".")[2].lower()
    if extension not in AUDIO_EXTENSIONS:
        supported = ", ".join(repr(e) for e in AUDIO_EXTENSIONS)
        return _invalid_request(f"Invalid file format. Supported formats: [{supported}]")
    if part.size > MAX_AUDIO_BYTES:
        return ErrorResponse(
            413,
            {
                "error": {
                    "message": (
                        f"Maximum content size limit ({MAX_AUDIO_BYTES}) exceeded "
                        f"({part.size} bytes read)"
                    ),
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
        )
    if part.size == 0:
        return _invalid_request(
            "Audio file is too short. Minimum audio length is 0.1 seconds.",
            param="file",
            code="audio_too_short",
        )
    response_format = record.form.get("response_format")
    if response_format is not None and response_format not in TRANSCRIPTION_FORMATS:
        return _invalid_request(
            f"Invalid value: '{response_format}'. Supported values are: 'json', 'text', 'srt', "
            "'verbose_json', and 'vtt'.",
            param="response_format",
            code="invalid_value",
        )
    return None


def _check_image_request(body: JSON) -> ErrorResponse | None:
    """OpenAI's 400 answers to an image request it will not take, else ``None``."""
    model = str(body.get("model") or "dall-e-2")
    prompt = body.get("prompt")
    if prompt is None:
        return _invalid_request(
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    if not isinstance(prompt, str) or not prompt.strip():
        return _invalid_request(
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an "
            "empty string instead.",
            param="prompt",
            code="empty_string",
        )
    response_format = body.get("response_format")
    if response_format is not None and model.startswith("gpt-image"):
        return _invalid_request(
            "Unknown parameter: 'response_format'.",
            param="response_format",
            code="unknown_parameter",
        )
    if response_format not in (None, "url", "b64_json"):
        return _invalid_request(
            f"Invalid value: '{response_format}'. Supported values are: 'url' and 'b64_json'.",
            param="response_format",
            code="invalid_value",
        )
    n = body.get("n")
    most = 1 if model.startswith("dall-e-3") else 10
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= most):
        problem = "below minimum value" if isinstance(n, int) and n < 1 else "above maximum value"
        return _invalid_request(
            f"Invalid 'n': integer {problem}. Expected a value between 1 and {most}, but got "
            f"{n!r} instead.",
            param="n",
            code="integer_below_min_value" if "below" in problem else "integer_above_max_value",
        )
    return None


def _sse(obj: JSON, *, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _model_object(model: str) -> JSON:
    return {"id": model, "object": "model", "created": 1700000000, "owned_by": "openai"}


# --------------------------------------------------------------------------------------------
# Thread runner
# --------------------------------------------------------------------------------------------


class FakeOpenAIThread(ServerThread[FakeOpenAI]):
    """Runs a :class:`FakeOpenAI` on a private event loop in a daemon thread.

    Intended for tests where the code under test runs in a subprocess or uses a synchronous
    client::

        with FakeOpenAIThread() as server:
            env["OPENAI_BASE_URL"] = server.base_url
            server.fake.script("sk-a", reply="hi")
            ...
            server.fake.wait_for_requests_blocking(1)

    :meth:`start` blocks until the port is bound; :meth:`close` stops the server (aborting held
    requests) and joins the thread; :meth:`call` runs a coroutine on the fake's loop.
    """

    def __init__(self, fake: FakeOpenAI | None = None, *, start_timeout: float = 10.0) -> None:
        super().__init__(fake if fake is not None else FakeOpenAI(), start_timeout=start_timeout)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` of the running fake."""
        return self.fake.base_url
