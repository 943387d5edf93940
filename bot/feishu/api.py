"""The Feishu REST calls on the answer path, each with a bounded retry and a typed error.

The channel's helpers either swallow failures (its CardKit update queue only logs them), retry
codes that are final, or report an unsent card as an empty message id. The answer path needs to
know exactly what happened, so it makes the calls itself, over a kept-alive aiohttp pool with the
SDK's tenant token (:mod:`bot.feishu.transport`), and reads every answer itself:

- transient failures (5xx, timeouts, connection errors, unreadable bodies, HTTP 429 or code
  99991400 honouring Feishu's reset hint, an expired tenant token) are retried with jittered
  exponential backoff (tenacity), a bounded number of times;
- everything else is final and raised at once as :class:`FeishuApiError`, which says whether a
  scope is missing (``99991672``: the scope is named in the message) so the caller can fall back
  and remember it.

Reply requests carry a ``uuid``: Feishu answers a repeated uuid (within an hour) with the message
it already created, so a retry after a lost response never posts a second reply.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from bot.feishu.transport import AnswerTooLarge, Transport, TransportError, Upload
from bot.logging import get_logger
from bot.timing import Sleep

log = get_logger(__name__)


#: Feishu's "request trigger frequency limit"
CODE_RATE_LIMITED = 99991400
#: "Access denied. One of the following scopes is required: [...]"
CODE_SCOPE_MISSING = 99991672
#: the app's tenant token is missing, invalid or expired
CODES_TOKEN_INVALID = frozenset({99991661, 99991663, 99991664, 99991668})
#: the message was recalled / is too old to edit / the card is too large / bad sequence
CODE_RECALLED = 230011
CODE_EDIT_WINDOW_PASSED = 230031
CODE_CARD_TOO_LARGE = 230025
CODE_SEQUENCE_NOT_INCREASING = 300317

#: the bot's own code for a download over the size it allows (Feishu has no such code)
CODE_TOO_LARGE = -2

T = TypeVar("T")
#: turns a raw answer (what, status, headers, body) into a result, or raises FeishuApiError
Reader = Callable[[str, int, Mapping[str, str], bytes], T]
ResourceType = Literal["image", "file"]


@dataclass(frozen=True)
class _Request:
    what: str
    method: str
    uri: str
    paths: Mapping[str, str]
    queries: Sequence[tuple[str, str]]
    body: Any
    upload: Upload | None
    max_bytes: int | None


_SCOPE_IN_MESSAGE = re.compile(r"\[([A-Za-z0-9_:.\-, ]+)\]")
_MAX_RESET_HINT_S = 60.0


class FeishuApiError(Exception):
    """A Feishu REST call that failed for good (after retries, if it was worth retrying)."""

    def __init__(
        self,
        what: str,
        *,
        code: int,
        msg: str,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{what} failed: {msg} (code {code}, HTTP {status or '-'})")
        self.what = what
        self.code = code
        self.msg = msg
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    @property
    def missing_scope(self) -> str | None:
        """The scope Feishu says is missing (``cardkit:card:write``), if that is the error."""
        if self.code != CODE_SCOPE_MISSING:
            return None
        match = _SCOPE_IN_MESSAGE.search(self.msg)
        return match.group(1).split(",")[0].strip() if match else "(see the message)"

    @property
    def rate_limited(self) -> bool:
        """Whether Feishu refused the call for its rate limit."""
        return self.code == CODE_RATE_LIMITED or self.status == 429


class FeishuApi:
    """The answer path's REST calls, over a :class:`bot.feishu.transport.Transport`."""

    def __init__(
        self,
        transport: Transport,
        *,
        attempts: int = 4,
        max_backoff_s: float = 8.0,
        sleep: Sleep = asyncio.sleep,
        on_token_invalid: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._transport = transport
        self._attempts = attempts
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._on_token_invalid = on_token_invalid

    # ---- the calls ---------------------------------------------------------------------------

    async def create_card(self, card: Mapping[str, Any]) -> str:
        """Create a CardKit card entity; return its card id."""
        body = {"type": "card_json", "data": _json_text(card)}
        data = await self.call("card_create", "POST", "/open-apis/cardkit/v1/cards", body=body)
        card_id = str(data.get("card_id") or "")
        if not card_id:
            raise FeishuApiError("card_create", code=-1, msg="no card_id in the answer")
        return card_id

    async def reply(
        self,
        message_id: str,
        msg_type: str,
        content: Mapping[str, Any],
        *,
        in_thread: bool,
        uuid: str,
    ) -> str:
        """Reply to ``message_id``; return the new message's id. Idempotent per ``uuid``."""
        body: dict[str, Any] = {
            "msg_type": msg_type,
            "content": _json_text(content),
            "uuid": uuid,
        }
        if in_thread:
            body["reply_in_thread"] = True
        data = await self.call(
            "message_reply",
            "POST",
            "/open-apis/im/v1/messages/:message_id/reply",
            paths={"message_id": message_id},
            body=body,
        )
        sent = str(data.get("message_id") or "")
        if not sent:
            raise FeishuApiError("message_reply", code=-1, msg="no message_id in the answer")
        return sent

    async def send_to_user(self, open_id: str, text: str, *, uuid: str) -> str:
        """Send a text message to a user's private chat with the bot; return its id."""
        return await self._send_text("open_id", open_id, text, uuid=uuid)

    async def send_to_chat(self, chat_id: str, text: str, *, uuid: str) -> str:
        """Send a text message to a chat (group or private) by its chat id; return its id."""
        return await self._send_text("chat_id", chat_id, text, uuid=uuid)

    async def _send_text(self, id_type: str, receiver: str, text: str, *, uuid: str) -> str:
        body = {
            "receive_id": receiver,
            "msg_type": "text",
            "content": _json_text({"text": text}),
            "uuid": uuid,
        }
        data = await self.call(
            "message_create",
            "POST",
            "/open-apis/im/v1/messages",
            queries=[("receive_id_type", id_type)],
            body=body,
        )
        return str(data.get("message_id") or "")

    async def get_message(self, message_id: str) -> dict[str, Any]:
        """One message as ``GET im/v1/messages/:id`` returns it (``msg_type``, ``body.content``,
        ``sender``, ``mentions`` …); a message that is gone is a :class:`FeishuApiError`.

        A card's content is asked for as the card JSON itself (``user_card_content``): without
        it Feishu returns a schema 2.0 card as a stub asking to upgrade the client.
        """
        data = await self.call(
            "message_get",
            "GET",
            "/open-apis/im/v1/messages/:message_id",
            paths={"message_id": message_id},
            queries=[("card_msg_content_type", "user_card_content")],
        )
        items = data.get("items")
        if not isinstance(items, list) or not items or not isinstance(items[0], dict):
            raise FeishuApiError("message_get", code=-1, msg="no message in the answer")
        item: dict[str, Any] = items[0]
        return item

    async def set_card_text(
        self, card_id: str, element_id: str, text: str, sequence: int, *, retry: bool = True
    ) -> None:
        """Replace the text of a card's markdown element (``sequence`` must increase)."""
        await self.call(
            "card_text",
            "PUT",
            "/open-apis/cardkit/v1/cards/:card_id/elements/:element_id/content",
            paths={"card_id": card_id, "element_id": element_id},
            body={"content": text, "sequence": sequence},
            retry=retry,
        )

    async def set_card_streaming(self, card_id: str, streaming: bool, sequence: int) -> None:
        """Switch a card's streaming mode on or off (off shows it as finished)."""
        settings = _json_text({"config": {"streaming_mode": streaming}})
        await self.call(
            "card_settings",
            "PATCH",
            "/open-apis/cardkit/v1/cards/:card_id/settings",
            paths={"card_id": card_id},
            body={"settings": settings, "sequence": sequence},
        )

    async def end_card(self, card_id: str, element_id: str, text: str, sequence: int) -> None:
        """In one call, put ``text`` in a card's markdown element and switch streaming mode off.

        CardKit's batch update applies its actions in order and as one sequenced operation, so
        the final text and the end of streaming land together or not at all.
        """
        actions = [
            {
                "action": "partial_update_element",
                "params": {"element_id": element_id, "partial_element": {"content": text}},
            },
            {
                "action": "partial_update_setting",
                "params": {"settings": {"config": {"streaming_mode": False}}},
            },
        ]
        await self.call(
            "card_end",
            "POST",
            "/open-apis/cardkit/v1/cards/:card_id/batch_update",
            paths={"card_id": card_id},
            body={"actions": _json_text(actions), "sequence": sequence},
        )

    async def patch_card_message(
        self, message_id: str, card: Mapping[str, Any], *, retry: bool = True
    ) -> None:
        """Replace the card of an ``interactive`` message (Feishu allows about 2 per second)."""
        await self.call(
            "message_patch",
            "PATCH",
            "/open-apis/im/v1/messages/:message_id",
            paths={"message_id": message_id},
            body={"content": _json_text(card)},
            retry=retry,
        )

    async def download_resource(
        self, message_id: str, key: str, kind: ResourceType, *, max_bytes: int
    ) -> bytes:
        """The bytes of an image, file or voice message a user sent (``kind`` ``image`` for
        images, ``file`` for files and voice); a resource over ``max_bytes`` raises
        :class:`FeishuApiError` with code :data:`CODE_TOO_LARGE` before it is read whole."""
        request = _Request(
            "resource_download",
            "GET",
            "/open-apis/im/v1/messages/:message_id/resources/:file_key",
            {"message_id": message_id, "file_key": key},
            [("type", kind)],
            None,
            None,
            max_bytes,
        )
        return await self._retried(request, read_bytes)

    async def upload_image(self, data: bytes, *, content_type: str = "image/png") -> str:
        """Upload an image to show in messages and cards (Feishu takes up to 10 MB); return its
        ``image_key``."""
        upload = Upload(
            fields={"image_type": "message"},
            file_field="image",
            file_name="image.png" if content_type == "image/png" else "image.jpg",
            data=data,
            content_type=content_type,
        )
        answer = await self.call("image_upload", "POST", "/open-apis/im/v1/images", upload=upload)
        image_key = str(answer.get("image_key") or "")
        if not image_key:
            raise FeishuApiError("image_upload", code=-1, msg="no image_key in the answer")
        return image_key

    async def recognize_speech(self, pcm: bytes, *, file_id: str) -> str:
        """Feishu's speech-to-text of at most 60 s of 16 kHz mono 16-bit PCM; ``file_id`` is
        16 characters naming this recording. Return the text ("" when nothing was heard)."""
        body = {
            "speech": {"speech": base64.b64encode(pcm).decode("ascii")},
            "config": {"file_id": file_id, "format": "pcm", "engine_type": "16k_auto"},
        }
        data = await self.call(
            "speech_recognize",
            "POST",
            "/open-apis/speech_to_text/v1/speech/file_recognize",
            body=body,
        )
        return str(data.get("recognition_text") or "")

    # ---- the machinery -----------------------------------------------------------------------

    async def call(
        self,
        what: str,
        method: str,
        uri: str,
        *,
        paths: Mapping[str, str] | None = None,
        queries: Sequence[tuple[str, str]] = (),
        body: Any = None,
        upload: Upload | None = None,
        retry: bool = True,
    ) -> dict[str, Any]:
        """Make the call (retrying transient failures unless ``retry`` is False); return its
        ``data`` or raise :class:`FeishuApiError`."""
        request = _Request(what, method, uri, paths or {}, queries, body, upload, None)
        return await self._retried(request, read_answer, retry=retry)

    async def _retried(self, request: _Request, read: Reader[T], *, retry: bool = True) -> T:
        """``request`` made (retried while transient), its answer made a result by ``read``."""
        # The first attempt runs outside tenacity: nearly every call succeeds at once, and
        # starting an AsyncRetrying (≈35 µs, mostly its coroutine checks of the callbacks) on
        # each of a streamed answer's ten calls adds up at 200 answers. A first failure worth
        # retrying enters tenacity as its attempt 1: the waits, logs and stop rule are the
        # same as if it had run there.
        try:
            return await self._call_once(request, read)
        except FeishuApiError as exc:
            if not (retry and exc.retryable and self._attempts > 1):
                raise
            first_failure: FeishuApiError | None = exc
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            retry=retry_if_exception(lambda exc: isinstance(exc, FeishuApiError) and exc.retryable),
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
                return await self._call_once(request, read)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, FeishuApiError) and error.retry_after is not None:
            return error.retry_after
        backoff = wait_random_exponential(multiplier=0.5, max=self._max_backoff_s)
        return float(backoff(state))

    async def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        if not isinstance(error, FeishuApiError):
            return
        log.warning(
            "feishu_call_retried",
            call=error.what,
            code=error.code,
            status=error.status,
            attempt=state.attempt_number,
            reason=error.msg[:200],
        )
        if error.code in CODES_TOKEN_INVALID and self._on_token_invalid is not None:
            await self._on_token_invalid()

    async def _call_once(self, request: _Request, read: Reader[T]) -> T:
        what = request.what
        try:
            status, headers, content = await self._transport.request(
                request.method,
                request.uri,
                request.paths,
                request.queries,
                request.body,
                upload=request.upload,
                max_bytes=request.max_bytes,
            )
        except AnswerTooLarge as exc:
            raise FeishuApiError(what, code=CODE_TOO_LARGE, msg=str(exc), status=200) from None
        except TransportError as exc:
            raise FeishuApiError(what, code=-1, msg=str(exc), retryable=True) from None
        return read(what, status, headers, content)

    async def aclose(self) -> None:
        """Release the transport's connections."""
        await self._transport.aclose()


def read_answer(
    what: str, status: int, headers: Mapping[str, str], content: bytes
) -> dict[str, Any]:
    """The ``data`` of a successful answer; else :class:`FeishuApiError`, retryable or not."""
    try:
        answer = orjson.loads(content) if content else {}
    except ValueError:  # orjson.JSONDecodeError, also for bytes that are not UTF-8
        answer = None
    if not isinstance(answer, dict):
        raise FeishuApiError(
            what,
            code=-1,
            msg=f"unreadable answer: {content[:120]!r}",
            status=status,
            retryable=status >= 500 or status == 429 or status == 0,
        )
    code = _as_int(answer.get("code"), default=0 if status < 400 else -1)
    if code == 0 and 200 <= status < 300:
        data = answer.get("data")
        return data if isinstance(data, dict) else {}
    msg = str(answer.get("msg") or f"HTTP {status}")
    rate_limited = status == 429 or code == CODE_RATE_LIMITED
    raise FeishuApiError(
        what,
        code=code,
        msg=msg,
        status=status,
        retryable=rate_limited or status >= 500 or code in CODES_TOKEN_INVALID,
        retry_after=_reset_hint(headers) if rate_limited else None,
    )


def read_bytes(what: str, status: int, headers: Mapping[str, str], content: bytes) -> bytes:
    """The body of a successful download; Feishu's JSON error answer raised as usual."""
    if 200 <= status < 300 and "json" not in headers.get("content-type", ""):
        return content
    read_answer(what, status, headers, content)  # raises for every error answer
    raise FeishuApiError(what, code=-1, msg="a JSON answer instead of the file", status=status)


def _json_text(value: Any) -> str:
    """``value`` as compact JSON text (non-ASCII kept), for a JSON string inside a body."""
    return orjson.dumps(value).decode("utf-8")


def _reset_hint(headers: Mapping[str, str]) -> float | None:
    """Seconds until Feishu lifts a rate limit, from its headers (capped), if it says."""
    for name in ("x-ogw-ratelimit-reset", "retry-after"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue
        return min(max(seconds, 0.0), _MAX_RESET_HINT_S)
    return None


def _as_int(value: Any, *, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
