"""Protocol-level fake of the Feishu / Lark open platform for tests.

The fake is a real :mod:`aiohttp.web` server on ``127.0.0.1`` (ephemeral port). The *real*
``lark-oapi`` SDK talks to it over real sockets when built with ``domain=fake.domain``
(``http://127.0.0.1:PORT``); nothing inside the SDK is patched::

    async with FakeFeishu() as fs:                      # or FakeFeishu().run_in_thread()
        ...start FeishuChannel(app_id=fs.app_id, app_secret=fs.app_secret, domain=fs.domain)
        await fs.wait_for_connections(1)
        frame_id = await fs.deliver("p2p_text", text="hello")
        await fs.wait_for_ack(frame_id)
        ...
        assert fs.reply_texts(fs.delivery(frame_id).message_id) == ["echo: hello"]

What it speaks (as read from lark-oapi 1.7.5, ``lark_oapi/ws/client.py`` and ``core/``):

* ``POST /callback/ws/endpoint`` ``{"AppID", "AppSecret"}`` -> ``{code, msg, data: {URL,
  ClientConfig: {ReconnectCount, ReconnectInterval, ReconnectNonce, PingInterval}}}``. The URL
  is ``ws://127.0.0.1:PORT/ws?device_id=..&service_id=..&ticket=..``. The SDK treats code
  ``0`` as success, ``1`` and ``1000040343`` (and any non-200 HTTP status) as retryable server
  errors and every other code as a fatal client error (``ws/client.py:295-303``).
* ``GET /ws``: a WebSocket of binary ``pbbp2.Frame`` protobufs. ``method`` 0 = control
  (``type: ping`` from the client is answered with ``type: pong`` whose payload is the
  ClientConfig JSON), ``method`` 1 = data (``type: event`` frames carrying the event JSON, headers
  ``message_id / trace_id / sum / seq / type``; ``sum > 1`` splits the payload into fragments).
  The client answers every data frame with the same frame whose payload is ``{"code": 200}``
  (``500`` when its handler raised) plus a ``biz_rt`` header: that is the ACK, recorded in
  :attr:`FakeFeishu.acks`. Events that are not ACKed can be redelivered after a deadline and are
  replayed on the next connection when their connection drops. With several clients connected,
  each event goes to exactly one of them (round robin).
* Setup checks (what ``python -m bot doctor`` asks): an unknown ``app_id`` answers
  :attr:`FakeFeishu.unknown_app_error` (default ``10003``; real Feishu answers ``10014`` "app id
  not exists" for a well-formed id it does not know and ``10003`` "invalid param" for a malformed
  one), a wrong secret ``10014`` "app secret invalid". ``bot/v3/info`` answers ``11205`` "app do
  not have bot" when :attr:`FakeFeishu.bot_enabled` is false, else the bot with
  :attr:`FakeFeishu.bot_activate_status` (``2``: enabled in the tenant). ``GET
  /open-apis/application/v6/scopes`` lists :attr:`FakeFeishu.scopes` (``scope_name ->
  grant_status``, ``1`` granted, ``2`` not granted; default: every scope of
  :data:`DEFAULT_SCOPES` granted). :attr:`FakeFeishu.ws_url` replaces the WebSocket URL the
  endpoint discovery hands out (e.g. a closed port).
* REST under ``/open-apis``: tenant/app access tokens, ``bot/v3/info``, contact ``users/batch``,
  IM messages (create / reply / patch / update / delete / get / resources / reactions / forward),
  images and files, chats, and CardKit cards (create / update / settings / batch_update /
  elements / element ``content``) with card-wide strictly increasing ``sequence`` (else
  ``300317``). Every call is recorded (:attr:`FakeFeishu.calls`) in arrival order. Unknown paths
  answer ``404`` and are recorded as endpoint ``"unknown"``.
* ``GET /open-apis/im/v1/messages/:message_id`` answers ``data.items[0]`` in the ``im.v1``
  message shape (``msg_type``, ``body.content``, ``sender{id, id_type, sender_type,
  tenant_key}``, ``mentions`` …) for messages the bot sent, messages delivered as events and
  messages added with :meth:`FakeFeishu.add_message`. Interactive cards are not returned as
  sent: like Feishu, the API answers a flattened ``{"title", "elements": [[{"tag": "text",
  "text"}]]}`` JSON (one paragraph per text-bearing element) unless the request asks for
  ``card_msg_content_type=user_card_content`` (then the card JSON itself). Real Feishu goes
  further for schema 2.0 (CardKit) cards and answers only a "please upgrade your client" stub
  without the card's text; ``FakeFeishu(degrade_v2_cards=True)`` reproduces that. An id the
  fake does not know answers HTTP 400 with ``230011`` "The message was withdrawn." (what
  Feishu answers for a recalled message; a malformed id gets ``230001`` "invalid message_id"
  and a chat the bot left ``230002``: inject those with :meth:`FakeFeishu.fail`).
* Media. ``POST /open-apis/im/v1/images`` (``image_upload``) keeps the uploaded bytes under the
  new ``image_key`` in :attr:`FakeFeishu.resources` and lists them in
  :meth:`FakeFeishu.uploaded_images`; it wants ``image_type`` ``message`` or ``avatar`` (else
  ``99992402``) and refuses an empty file (``234010``), one over 10 MB (``234006``) and bytes
  that are no PNG/JPEG/GIF/WEBP/BMP/TIFF/ICO (``234011``). ``GET
  /open-apis/im/v1/messages/:message_id/resources/:file_key`` (``message_resource``) wants
  ``type`` ``image`` or ``file`` (else ``99992402``), answers ``234001`` when the type does not
  match the ``kind`` given to :meth:`FakeFeishu.add_resource`, and serves made-up bytes for a key
  it does not know unless :attr:`FakeFeishu.strict_resources` (then ``234003`` "File not in
  msg."). ``POST /open-apis/speech_to_text/v1/speech/file_recognize``
  (``speech_file_recognize``) takes base64 16 kHz mono s16le PCM with ``config.format`` ``pcm``,
  ``engine_type`` ``16k_auto`` and a 16-character ``file_id`` (else ``99992402``), refuses more
  than 60 s of audio with the fake-chosen :data:`CODE_SPEECH_TOO_LONG`, records every decoded
  request in :attr:`FakeFeishu.speech_requests` and answers :attr:`FakeFeishu.speech_text`.
  When :attr:`FakeFeishu.scopes` lists ``im:resource`` (image, file and resource endpoints) or
  ``speech_to_text:speech`` as *not granted* (``grant_status`` 2, e.g. ``set_scopes(...,
  not_granted=["im:resource"])``), those calls answer ``99991672`` naming the scope, as Feishu
  does; a scope that is not listed at all is not checked. Multipart file parts are recorded in
  :attr:`RestCall.files` (bytes), and in :attr:`RestCall.json` as ``{"filename", "size",
  "content_type"}``.

Events: :func:`build_message_event` (``im.message.receive_v1`` from the message samples),
:func:`build_p2p_chat_entered_event` (``im.chat.access_event.bot_p2p_chat_entered_v1``: a user
opened the one-to-one chat with the bot) and :func:`build_bot_added_event`
(``im.chat.member.bot.added_v1``: the bot was added to a group). :meth:`FakeFeishu.deliver`
takes any of them as a dict, or a sample name.

Controls: :meth:`FakeFeishu.fail` (error bodies from ``samples/feishu_errors.json``),
:meth:`FakeFeishu.delay`, :meth:`FakeFeishu.hold` (a deterministic :class:`Gate`),
:meth:`FakeFeishu.drop_connections`, :meth:`FakeFeishu.revoke_tokens`. A model of the messages
and cards the bot produced answers "what does the user see" (:meth:`FakeFeishu.card_text`,
:meth:`FakeFeishu.reply_texts`, :class:`FakeCard`).

Threads and loops: :meth:`deliver` and :meth:`drop_connections` run on the fake's own loop
(``*_blocking`` variants submit them from another thread). Configuration, queries, waits and
:class:`Gate` are thread-safe: ``wait_*`` coroutines can be awaited from any loop and
``wait_*_blocking`` work from plain threads. **Never call the SDK on the loop that runs the
fake**: the SDK fetches tenant tokens with blocking ``requests`` even inside its ``a...``
methods and would deadlock; use :class:`FakeFeishuThread` or :func:`asyncio.to_thread`.
The SDK caches tenant tokens per ``app_id`` process-wide, so in-process SDK clients that talk to
different fake instances should use different app ids (or clear ``TokenManager.cache``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import fnmatch
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from aiohttp import WSMsgType, web
from lark_oapi.ws.pb.pbbp2_pb2 import Frame

from tests.fakes._background import (
    LISTEN_BACKLOG,
    FormFile,
    Latch,
    ServerLifecycle,
    ServerThread,
    SignalEvent,
    form_summary,
    read_form,
    resolve_future,
)

__all__ = [
    "BOT_NAME",
    "BOT_OPEN_ID",
    "CHAT_EVENT_SAMPLE_NAMES",
    "CODE_FIELD_VALIDATION",
    "CODE_FILE_NOT_IN_MESSAGE",
    "CODE_IMAGE_EMPTY",
    "CODE_IMAGE_TOO_LARGE",
    "CODE_IMAGE_TYPE_UNSUPPORTED",
    "CODE_RESOURCE_INVALID_PARAM",
    "CODE_SCOPE_MISSING",
    "CODE_SPEECH_TOO_LONG",
    "DEFAULT_APP_ID",
    "DEFAULT_APP_SECRET",
    "DEFAULT_SCOPES",
    "ENDPOINTS",
    "FEISHU_ERRORS",
    "MAX_IMAGE_BYTES",
    "MAX_SPEECH_SECONDS",
    "SAMPLE_NAMES",
    "SAMPLE_SENDER_OPEN_ID",
    "SCOPE_IM_RESOURCE",
    "SCOPE_SPEECH",
    "SPEECH_BYTES_PER_SECOND",
    "AckRecord",
    "CardUpdate",
    "Delivery",
    "FakeCard",
    "FakeFeishu",
    "FakeFeishuThread",
    "FakeMessage",
    "FaultRule",
    "FormFile",
    "Gate",
    "RestCall",
    "SignalEvent",
    "SpeechRequest",
    "UploadedImage",
    "WsConnection",
    "build_bot_added_event",
    "build_message_event",
    "build_p2p_chat_entered_event",
    "load_sample",
]

T = TypeVar("T")
JSONDict = dict[str, Any]

SAMPLES_DIR: Final = Path(__file__).with_name("samples")
SAMPLE_NAMES: Final = (
    "p2p_text",
    "p2p_post",
    "p2p_image",
    "p2p_file",
    "p2p_sticker",
    "group_text_mention",
    "group_thread_reply",
)
"""Samples of ``im.message.receive_v1`` events (for :func:`build_message_event`)."""
CHAT_EVENT_SAMPLE_NAMES: Final = ("p2p_chat_entered", "bot_added")
"""Samples of chat events: ``im.chat.access_event.bot_p2p_chat_entered_v1`` and
``im.chat.member.bot.added_v1`` (for their own builders)."""

DEFAULT_APP_ID: Final = "cli_fake_app_0001"
DEFAULT_APP_SECRET: Final = "fake-app-secret"
BOT_OPEN_ID: Final = "ou_bot_open_id"
"""The bot's open_id: the samples' group mentions point at it."""
BOT_NAME: Final = "GPT Bot"
SAMPLE_SENDER_OPEN_ID: Final = "ou_7d8a6e6df7621556ce0d21922b676706"
SAMPLE_TENANT_KEY: Final = "2ca1d211f64f6438"
DEFAULT_SCOPES: Final = (
    "im:message",
    "im:message:send_as_bot",
    "im:message.p2p_msg:readonly",
    "im:message.group_at_msg:readonly",
    "cardkit:card:write",
    "contact:user.employee_id:readonly",
    "im:resource",
    "speech_to_text:speech",
)
"""The scopes a well set up bot app has been granted (``application/v6/scopes``)."""

# Wire constants of the long connection (lark_oapi/ws/const.py, ws/enum.py).
_FRAME_CONTROL: Final = 0
_FRAME_DATA: Final = 1

# Codes the fake chooses where the real platform's exact value is not pinned by the SDK.
CODE_MISSING_TOKEN: Final = 99991661
CODE_INVALID_TOKEN: Final = 99991663
CODE_INVALID_PARAM: Final = 99992402
CODE_INVALID_CONTENT: Final = 230001
CODE_CARD_CONTENT_FAILED: Final = 230099
CODE_CARD_NOT_FOUND: Final = 300301  # fake-chosen
CODE_ELEMENT_NOT_FOUND: Final = 300302  # fake-chosen
CODE_STREAMING_CLOSED: Final = 300309  # fake-chosen
CODE_UNKNOWN_APP: Final = 10003
CODE_NO_BOT: Final = 11205  # "app do not have bot" (bot/v3/info of an app without the bot feature)
CODE_FIELD_VALIDATION: Final = CODE_INVALID_PARAM  # "field validation failed"
CODE_SCOPE_MISSING: Final = 99991672  # "Access denied. One of the following scopes is required"
# Codes of Feishu's im/v1 image and resource APIs (from its error code tables).
CODE_RESOURCE_INVALID_PARAM: Final = 234001  # "Invalid request param."
CODE_FILE_NOT_IN_MESSAGE: Final = 234003  # "File not in msg."
CODE_IMAGE_TOO_LARGE: Final = 234006  # "The file size exceed the limit."
CODE_IMAGE_EMPTY: Final = 234010  # "File's size can't be 0."
CODE_IMAGE_TYPE_UNSUPPORTED: Final = 234011  # "Can't recognize the image format."
CODE_SPEECH_TOO_LONG: Final = 2300003  # fake-chosen: Feishu's code for > 60 s is not public
GRANTED: Final = 1
NOT_GRANTED: Final = 2
SCOPE_IM_RESOURCE: Final = "im:resource"
"""Needed by the image, file and message resource endpoints."""
SCOPE_SPEECH: Final = "speech_to_text:speech"
"""Needed by ``speech_to_text/v1/speech/file_recognize``."""
MAX_IMAGE_BYTES: Final = 10 * 1024 * 1024
"""Feishu's limit for ``POST /im/v1/images``."""
MAX_SPEECH_SECONDS: Final = 60
SPEECH_BYTES_PER_SECOND: Final = 16_000 * 2
"""16 kHz mono signed 16-bit little-endian PCM: what ``file_recognize`` takes."""
_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
_IMAGE_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
)
_FILE_ID = re.compile(r"^[A-Za-z0-9_]{16}$")

_TOKEN_ENDPOINTS: Final = frozenset({"tenant_token", "app_token"})
_NO_AUTH_ENDPOINTS: Final = _TOKEN_ENDPOINTS | {"ws_endpoint", "ws_connect", "unknown"}

_ROUTE_TABLE: Final[tuple[tuple[str, str, str], ...]] = (
    ("POST", "/callback/ws/endpoint", "ws_endpoint"),
    ("GET", "/ws", "ws_connect"),
    ("POST", "/open-apis/auth/v3/tenant_access_token/internal", "tenant_token"),
    ("POST", "/open-apis/auth/v3/app_access_token/internal", "app_token"),
    ("GET", "/open-apis/bot/v3/info", "bot_info"),
    ("GET", "/open-apis/application/v6/scopes", "application_scopes"),
    ("GET", "/open-apis/application/v6/applications/:app_id", "application_get"),
    ("GET", "/open-apis/contact/v3/users/batch", "contact_users_batch"),
    ("POST", "/open-apis/im/v1/messages", "message_create"),
    ("GET", "/open-apis/im/v1/messages", "message_list"),
    ("POST", "/open-apis/im/v1/messages/:message_id/reply", "message_reply"),
    ("POST", "/open-apis/im/v1/messages/:message_id/forward", "message_forward"),
    ("GET", "/open-apis/im/v1/messages/:message_id/resources/:file_key", "message_resource"),
    ("POST", "/open-apis/im/v1/messages/:message_id/reactions", "reaction_create"),
    ("DELETE", "/open-apis/im/v1/messages/:message_id/reactions/:reaction_id", "reaction_delete"),
    ("GET", "/open-apis/im/v1/messages/:message_id", "message_get"),
    ("PATCH", "/open-apis/im/v1/messages/:message_id", "message_patch"),
    ("PUT", "/open-apis/im/v1/messages/:message_id", "message_update"),
    ("DELETE", "/open-apis/im/v1/messages/:message_id", "message_delete"),
    ("POST", "/open-apis/im/v1/images", "image_upload"),
    ("GET", "/open-apis/im/v1/images/:image_key", "image_get"),
    ("POST", "/open-apis/im/v1/files", "file_upload"),
    ("GET", "/open-apis/im/v1/files/:file_key", "file_get"),
    ("GET", "/open-apis/im/v1/chats/:chat_id", "chat_get"),
    ("POST", "/open-apis/speech_to_text/v1/speech/file_recognize", "speech_file_recognize"),
    ("POST", "/open-apis/cardkit/v1/cards", "card_create"),
    ("PUT", "/open-apis/cardkit/v1/cards/:card_id", "card_update"),
    ("PATCH", "/open-apis/cardkit/v1/cards/:card_id/settings", "card_settings"),
    ("POST", "/open-apis/cardkit/v1/cards/:card_id/batch_update", "card_batch_update"),
    ("POST", "/open-apis/cardkit/v1/cards/:card_id/elements", "card_element_create"),
    (
        "PUT",
        "/open-apis/cardkit/v1/cards/:card_id/elements/:element_id/content",
        "card_element_content",
    ),
    ("PUT", "/open-apis/cardkit/v1/cards/:card_id/elements/:element_id", "card_element_update"),
    ("PATCH", "/open-apis/cardkit/v1/cards/:card_id/elements/:element_id", "card_element_patch"),
    ("DELETE", "/open-apis/cardkit/v1/cards/:card_id/elements/:element_id", "card_element_delete"),
)

ENDPOINTS: Final[frozenset[str]] = frozenset(name for _, _, name in _ROUTE_TABLE)
"""Endpoint names accepted by :meth:`FakeFeishu.fail` / ``delay`` / ``hold`` / ``calls``."""


def _compile_route(template: str) -> re.Pattern[str]:
    parts = re.split(r"(:[a-z_]+)", template)
    regex = "".join(
        f"(?P<{part[1:]}>[^/]+)" if part.startswith(":") else re.escape(part) for part in parts
    )
    return re.compile(f"^{regex}$")


_ROUTES: Final = tuple(
    (method, _compile_route(template), name) for method, template, name in _ROUTE_TABLE
)


def _route(method: str, path: str) -> tuple[str, dict[str, str]]:
    for route_method, pattern, name in _ROUTES:
        if route_method != method:
            continue
        match = pattern.match(path)
        if match:
            return name, match.groupdict()
    return "unknown", {}


# --------------------------------------------------------------------------------------------
# Samples and event builders
# --------------------------------------------------------------------------------------------


def _peer_of(request: web.Request) -> str:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peername[0]}:{peername[1]}" if peername else ""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


_SAMPLE_CACHE: dict[str, JSONDict] = {}


def load_sample(name: str) -> JSONDict:
    """Return a deep copy of ``samples/<name>.json`` (a schema 2.0 event envelope).

    ``name`` is one of :data:`SAMPLE_NAMES` (message events) or :data:`CHAT_EVENT_SAMPLE_NAMES`.
    """
    if name not in _SAMPLE_CACHE:
        path = SAMPLES_DIR / f"{name}.json"
        if not path.is_file():
            known = ", ".join((*SAMPLE_NAMES, *CHAT_EVENT_SAMPLE_NAMES))
            raise KeyError(f"unknown sample {name!r}; known: {known}")
        _SAMPLE_CACHE[name] = _read_json(path)
    return copy.deepcopy(_SAMPLE_CACHE[name])


FEISHU_ERRORS: Final[dict[str, JSONDict]] = _read_json(SAMPLES_DIR / "feishu_errors.json")
"""``name -> {"http_status": int, "body": {"code", "msg"}}`` (rate_limited, card_too_large, …)."""


def new_message_id() -> str:
    """A fresh ``om_…`` message id."""
    return f"om_{uuid.uuid4().hex}"


def _bot_mention(bot_open_id: str, bot_name: str, key: str = "@_user_1") -> JSONDict:
    return {
        "key": key,
        "id": {"union_id": "on_bot", "user_id": "", "open_id": bot_open_id},
        "name": bot_name,
        "tenant_key": SAMPLE_TENANT_KEY,
        "mentioned_type": "bot",
    }


def _set_dotted(target: JSONDict, dotted: str, value: Any) -> None:
    node: Any = target
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def build_message_event(
    sample: str = "p2p_text",
    *,
    text: str | None = None,
    content: JSONDict | str | None = None,
    message_type: str | None = None,
    message_id: str | None = None,
    event_id: str | None = None,
    chat_id: str | None = None,
    chat_type: str | None = None,
    sender_open_id: str | None = None,
    root_id: str | None = None,
    parent_id: str | None = None,
    thread_id: str | None = None,
    mentions: list[JSONDict] | None = None,
    mention_bot: bool | None = None,
    bot_open_id: str = BOT_OPEN_ID,
    bot_name: str = BOT_NAME,
    create_time_ms: int | None = None,
    app_id: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> JSONDict:
    """Build an ``im.message.receive_v1`` event (schema 2.0) from a sample with fresh ids.

    ``event_id`` and ``message_id`` are new unless given; ``header.create_time`` and
    ``message.create_time``/``update_time`` are "now" (ms) unless ``create_time_ms`` is given.
    ``text`` makes it a text message. ``mention_bot=True`` adds an ``@_user_1`` mention of the
    bot and prefixes the text with ``@_user_1`` when the text carries no placeholder;
    ``mention_bot=False`` removes all mentions. ``overrides`` maps dotted paths
    (``"event.message.chat_type"``) to values and is applied last.
    """
    event = load_sample(sample)
    header = event["header"]
    message = event["event"]["message"]
    now_ms = create_time_ms if create_time_ms is not None else int(time.time() * 1000)
    header["event_id"] = event_id or uuid.uuid4().hex
    header["create_time"] = str(now_ms)
    if app_id is not None:
        header["app_id"] = app_id
    message["message_id"] = message_id or new_message_id()
    message["create_time"] = str(now_ms)
    message["update_time"] = str(now_ms)
    if chat_id is not None:
        message["chat_id"] = chat_id
    if chat_type is not None:
        message["chat_type"] = chat_type
    if sender_open_id is not None:
        event["event"]["sender"]["sender_id"]["open_id"] = sender_open_id
    if root_id is not None:
        message["root_id"] = root_id
    if parent_id is not None:
        message["parent_id"] = parent_id
    if thread_id is not None:
        message["thread_id"] = thread_id
    if mentions is not None:
        message["mentions"] = copy.deepcopy(mentions)
    if mention_bot is False:
        message["mentions"] = []
    elif mention_bot:
        existing = message.get("mentions") or []
        if not any((m.get("id") or {}).get("open_id") == bot_open_id for m in existing):
            key = f"@_user_{len(existing) + 1}"
            message["mentions"] = [*existing, _bot_mention(bot_open_id, bot_name, key)]
    if text is not None:
        message["message_type"] = "text"
        if mention_bot and "@_user_" not in text:
            bot_keys = [
                m["key"]
                for m in message.get("mentions") or []
                if (m.get("id") or {}).get("open_id") == bot_open_id
            ]
            text = f"{bot_keys[0]} {text}"
        message["content"] = json.dumps({"text": text}, ensure_ascii=False)
    if message_type is not None:
        message["message_type"] = message_type
    if content is not None:
        message["content"] = (
            content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        )
    for dotted, value in (overrides or {}).items():
        _set_dotted(event, dotted, value)
    return event


def _build_chat_event(
    sample: str,
    *,
    chat_id: str | None,
    operator_open_id: str | None,
    event_id: str | None,
    app_id: str | None,
) -> JSONDict:
    event = load_sample(sample)
    header = event["header"]
    header["event_id"] = event_id or uuid.uuid4().hex
    header["create_time"] = str(int(time.time() * 1000))
    if app_id is not None:
        header["app_id"] = app_id
    body = event["event"]
    if chat_id is not None:
        body["chat_id"] = chat_id
    if operator_open_id is not None:
        body["operator_id"]["open_id"] = operator_open_id
    return event


def build_p2p_chat_entered_event(
    *,
    chat_id: str | None = None,
    operator_open_id: str | None = None,
    event_id: str | None = None,
    app_id: str | None = None,
) -> JSONDict:
    """Build an ``im.chat.access_event.bot_p2p_chat_entered_v1`` event (schema 2.0).

    Feishu sends it when a user opens the one-to-one chat with the bot (the first time and on
    later visits); ``event.last_message_id``/``last_message_create_time`` keep the sample's
    values. ``event_id`` is new and ``header.create_time`` is "now" unless given. The operator's
    ``union_id``/``user_id`` stay the sample user's when only ``operator_open_id`` is given.
    """
    return _build_chat_event(
        "p2p_chat_entered",
        chat_id=chat_id,
        operator_open_id=operator_open_id,
        event_id=event_id,
        app_id=app_id,
    )


def build_bot_added_event(
    *,
    chat_id: str | None = None,
    operator_open_id: str | None = None,
    chat_name: str | None = None,
    event_id: str | None = None,
    app_id: str | None = None,
) -> JSONDict:
    """Build an ``im.chat.member.bot.added_v1`` event (schema 2.0): a user added the bot to a group.

    ``chat_name`` sets ``event.name`` and every ``event.i18n_names`` entry. ``event_id`` is new
    and ``header.create_time`` is "now" unless given.
    """
    event = _build_chat_event(
        "bot_added",
        chat_id=chat_id,
        operator_open_id=operator_open_id,
        event_id=event_id,
        app_id=app_id,
    )
    if chat_name is not None:
        body = event["event"]
        body["name"] = chat_name
        body["i18n_names"] = dict.fromkeys(body["i18n_names"], chat_name)
    return event


# --------------------------------------------------------------------------------------------
# Thread-safe signalling
# --------------------------------------------------------------------------------------------


class _Notifier:
    """State lock plus "something changed" wake-ups for predicate waits from any thread."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def notify(self) -> None:
        with self.lock:
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(resolve_future, fut)

    async def wait_for(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            with self.lock:
                value = predicate()
                if value:
                    return value
                self._waiters.append((loop, fut))
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                with self.lock:
                    self._waiters = [(lp, f) for lp, f in self._waiters if f is not fut]
                    value = predicate()
                if value:
                    return value
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}") from None

    def wait_for_blocking(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        with self._cond:
            value = self._cond.wait_for(predicate, timeout)
        if not value:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        return value


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadedImage:
    """An image the fake accepted on ``POST /open-apis/im/v1/images``."""

    image_key: str
    data: bytes = field(repr=False)
    image_type: str
    """``message`` or ``avatar``."""
    content_type: str
    """The part's content type as uploaded (sniffed from the bytes when it was generic)."""
    filename: str | None
    call_seq: int
    """``seq`` of the :class:`RestCall` that uploaded it."""


@dataclass
class SpeechRequest:
    """A ``speech_to_text/v1/speech/file_recognize`` request whose audio decoded."""

    file_id: Any
    format: Any
    engine_type: Any
    pcm: bytes = field(repr=False)
    """The decoded audio (16 kHz mono s16le PCM if the caller did it right)."""
    call_seq: int
    code: int | None = None
    """The ``code`` the fake answered (0: recognised)."""

    @property
    def byte_count(self) -> int:
        """Bytes of decoded PCM."""
        return len(self.pcm)

    @property
    def seconds(self) -> float:
        """Duration of the audio at 16 kHz mono 16-bit."""
        return len(self.pcm) / SPEECH_BYTES_PER_SECOND


@dataclass
class RestCall:
    """One HTTP request the fake received (REST, endpoint discovery or WS handshake)."""

    seq: int
    method: str
    path: str
    endpoint: str
    path_params: dict[str, str]
    query: dict[str, str]
    query_multi: dict[str, list[str]]
    json: Any
    headers: dict[str, str]
    """Request headers without ``Authorization``."""
    token: str | None
    """The bearer token the request carried (``None`` when absent)."""
    time: float
    """``time.monotonic()`` at arrival."""
    status: int | None = None
    response: Any = None
    injected: str | None = None
    """Description of the fault rule that answered (``None`` for a normal answer)."""
    finished_at: float | None = None
    peer: str = ""
    """The client's ``host:port``: calls over one kept-alive connection share it."""
    files: dict[str, FormFile] = field(default_factory=dict)
    """File parts of a multipart body by field name (their metadata is in :attr:`json`)."""


@dataclass
class AckRecord:
    """An ACK frame a client sent back for a delivered data frame."""

    frame_message_id: str
    conn_id: str
    code: int | None
    payload: Any
    headers: dict[str, str]
    time: float
    latency: float | None
    """Seconds between the (last) send of the frame on that connection and this ACK."""
    event_id: str | None
    message_id: str | None
    """The IM ``message_id`` of the event, when it is a message event."""


@dataclass
class DeliveryAttempt:
    """One transmission of a delivery (possibly in several fragments) on one connection."""

    conn_id: str
    time: float
    reason: Literal["first", "redeliver", "replay"]


@dataclass
class Delivery:
    """An event the fake delivers through the long connection."""

    frame_message_id: str
    event: JSONDict
    payload: bytes
    fragments: int
    reverse_fragments: bool
    redeliver_after: float | None
    max_attempts: int
    created: float
    attempts: list[DeliveryAttempt] = field(default_factory=list)
    acks: list[AckRecord] = field(default_factory=list)
    trace_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    conn_id: str | None = None
    """Connection requested for the first send (``None``: round robin)."""

    @property
    def event_id(self) -> str | None:
        """``header.event_id`` of the event."""
        header = self.event.get("header")
        return header.get("event_id") if isinstance(header, dict) else None

    @property
    def event_type(self) -> str | None:
        """``header.event_type`` of the event."""
        header = self.event.get("header")
        return header.get("event_type") if isinstance(header, dict) else None

    @property
    def message_id(self) -> str | None:
        """The IM message id of a message event (``event.message.message_id``)."""
        body = self.event.get("event")
        message = body.get("message") if isinstance(body, dict) else None
        return message.get("message_id") if isinstance(message, dict) else None

    @property
    def acked(self) -> bool:
        """Whether any ACK arrived."""
        return bool(self.acks)


@dataclass
class WsConnection:
    """One long connection from a client."""

    conn_id: str
    service_id: int
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    connected_at: float
    headers: dict[str, str]
    closed_at: float | None = None
    pings: int = 0
    frames_received: int = 0

    @property
    def open(self) -> bool:
        """Whether the connection is still open."""
        return self.closed_at is None


@dataclass
class CardUpdate:
    """One sequenced CardKit operation that the fake accepted."""

    kind: str
    """``content`` / ``settings`` / ``update`` / ``element_*``."""
    sequence: int | None
    """``None`` for an unsequenced call, and for a batch update's actions after its first."""
    element_id: str | None
    content: Any
    time: float
    batch: bool = False
    """One action of a batch update (each is recorded as the operation it performs)."""


@dataclass
class FakeCard:
    """A CardKit card entity as the fake models it."""

    card_id: str
    spec: JSONDict
    """The card JSON now (settings and element updates applied)."""
    initial_spec: JSONDict
    """The card JSON as created."""
    elements: dict[str, JSONDict]
    """``element_id -> element`` (live content under ``"content"``)."""
    element_order: list[str]
    streaming_mode: bool
    created: float
    sequence: int = 0
    """The last accepted sequence (card-wide)."""
    updates: list[CardUpdate] = field(default_factory=list)
    settings: list[JSONDict] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    """Messages that reference this card (``{"type": "card", "data": {"card_id"}}``)."""

    def apply_settings(self, settings: JSONDict) -> None:
        """Take a settings update (``{"config": {…}, "card_link": …}``) as Feishu does."""
        config = settings.get("config") or {}
        if "streaming_mode" in config:
            self.streaming_mode = bool(config["streaming_mode"])
        self.spec.setdefault("config", {}).update(config)
        self.settings.append(settings)

    @property
    def closed(self) -> bool:
        """``True`` once ``streaming_mode`` is off (the stream was finished)."""
        return not self.streaming_mode

    @property
    def content_updates(self) -> list[CardUpdate]:
        """The accepted element ``content`` updates, in order."""
        return [u for u in self.updates if u.kind == "content"]

    @property
    def sequences(self) -> list[int]:
        """Sequences of all accepted sequenced operations, in arrival order."""
        return [u.sequence for u in self.updates if u.sequence is not None]

    def element_text(self, element_id: str) -> str:
        """The current content of one element."""
        element = self.elements.get(element_id) or {}
        return _element_visible_text(element)

    @property
    def visible_lines(self) -> list[str]:
        """The non-empty texts of its text-bearing elements: named ones in order, then the rest."""
        texts = [self.element_text(eid) for eid in self.element_order]
        unnamed = [
            _element_visible_text(e) for e in _walk_elements(self.spec) if not e.get("element_id")
        ]
        return [t for t in [*texts, *unnamed] if t]

    @property
    def text(self) -> str:
        """What the card shows now: the text of its text-bearing elements, in order."""
        return "\n".join(self.visible_lines)


@dataclass
class FakeMessage:
    """A message in the fake's IM model (sent by the bot, or delivered as an event)."""

    message_id: str
    chat_id: str
    msg_type: str
    content: str
    """The raw ``content`` JSON string as last set."""
    sender_type: Literal["app", "user"]
    sender_id: str
    create_time: int
    chat_type: str = ""
    root_id: str = ""
    parent_id: str = ""
    thread_id: str = ""
    reply_to: str | None = None
    """The message this one replied to (``POST …/reply``)."""
    reply_in_thread: bool | None = None
    receive_id: str | None = None
    receive_id_type: str | None = None
    uuid: str | None = None
    card_id: str | None = None
    deleted: bool = False
    content_history: list[str] = field(default_factory=list)
    reactions: dict[str, str] = field(default_factory=dict)
    """``reaction_id -> emoji_type``."""
    mentions: list[JSONDict] = field(default_factory=list)
    """Mentions in the API shape (``key``, ``id``, ``id_type``, ``name``, ``tenant_key``)."""

    def as_api_dict(self, app_id: str) -> JSONDict:
        """The ``im.v1`` message object shape returned by the API."""
        sender: JSONDict = (
            {"id": app_id, "id_type": "app_id", "sender_type": "app"}
            if self.sender_type == "app"
            else {"id": self.sender_id, "id_type": "open_id", "sender_type": "user"}
        )
        sender["tenant_key"] = SAMPLE_TENANT_KEY
        return {
            "message_id": self.message_id,
            "root_id": self.root_id,
            "parent_id": self.parent_id,
            "thread_id": self.thread_id,
            "msg_type": self.msg_type,
            "create_time": str(self.create_time),
            "update_time": str(self.create_time),
            "deleted": self.deleted,
            "updated": len(self.content_history) > 1,
            "chat_id": self.chat_id,
            "sender": sender,
            "body": {"content": self.content},
            "mentions": copy.deepcopy(self.mentions),
            "upper_message_id": "",
        }


# --------------------------------------------------------------------------------------------
# Visible text helpers
# --------------------------------------------------------------------------------------------


def _walk_elements(node: Any) -> list[JSONDict]:
    """All element dicts of a card JSON (schema 2.0 ``body.elements`` or v1 ``elements``)."""
    found: list[JSONDict] = []

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            if "tag" in value:
                found.append(value)
            for key in ("body", "elements", "columns", "header"):
                if key in value:
                    visit(value[key])
        elif isinstance(value, list):
            for item in value:
                visit(item)

    visit(node)
    return found


def _element_visible_text(element: JSONDict) -> str:
    tag = element.get("tag")
    if tag in ("markdown", "plain_text", "lark_md"):
        content = element.get("content")
        return content if isinstance(content, str) else ""
    if tag == "div":
        text = element.get("text")
        if isinstance(text, dict) and isinstance(text.get("content"), str):
            return str(text["content"])
    return ""


def _post_text(post: Any) -> str:
    if not isinstance(post, dict):
        return ""
    body = post
    if "content" not in post and post:
        first = next(iter(post.values()))
        body = first if isinstance(first, dict) else {}
    lines: list[str] = []
    title = body.get("title")
    if title:
        lines.append(str(title))
    for paragraph in body.get("content") or []:
        pieces: list[str] = []
        for node in paragraph or []:
            if not isinstance(node, dict):
                continue
            tag = node.get("tag")
            if tag in ("text", "md", "code_block", "a"):
                pieces.append(str(node.get("text") or node.get("href") or ""))
            elif tag == "at":
                pieces.append(f"@{node.get('user_name') or node.get('user_id') or ''}")
            elif tag == "img":
                pieces.append("[image]")
            elif tag == "hr":
                pieces.append("---")
        lines.append("".join(pieces))
    return "\n".join(lines)


def _card_json_lines(card: Any) -> list[str]:
    texts = [_element_visible_text(e) for e in _walk_elements(card)]
    return [t for t in texts if t]


def _card_json_text(card: Any) -> str:
    return "\n".join(_card_json_lines(card))


def _card_title(card: JSONDict) -> str | None:
    title = (card.get("header") or {}).get("title")
    if isinstance(title, dict) and isinstance(title.get("content"), str):
        return str(title["content"])
    return None


_UPGRADE_CLIENT_TEXT: Final = "请升级至最新版本客户端，以查看内容"


def _flattened_card_content(card: JSONDict, lines: list[str], *, degrade: bool) -> str:
    """The ``body.content`` GET/list answer for a card without ``card_msg_content_type``.

    Feishu flattens cards into a post-like JSON: ``{"title": str | None, "elements":
    [[{"tag": "text", "text": ...}], ...]}`` (one paragraph per text-bearing element here). With
    ``degrade`` a schema 2.0 card answers the stub Feishu sends instead of CardKit cards'
    text (seen in larksuite/oapi-sdk-python#95 and openclaw/openclaw#55466).
    """
    paragraphs: list[list[JSONDict]] = [[{"tag": "text", "text": line}] for line in lines]
    if degrade and card.get("schema") == "2.0":
        paragraphs = [
            [
                {"tag": "img", "image_key": "img_v3_fake_card_preview"},
                {"tag": "text", "text": _UPGRADE_CLIENT_TEXT},
                {"tag": "text", "text": ""},
            ]
        ]
    return json.dumps({"title": _card_title(card), "elements": paragraphs}, ensure_ascii=False)


def _load_json(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------------


class Gate(Latch):
    """Holds matching requests until :meth:`release` (created by :meth:`FakeFeishu.hold`).

    ``await gate.arrived.wait()`` (any loop) or :meth:`wait_arrived_blocking` (any thread)
    observe that a request reached the gate; :attr:`calls` lists the held requests.
    """

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.calls: list[RestCall] = []

    def __repr__(self) -> str:
        return (
            f"<Gate target={self.target!r} arrived={self.arrived.is_set()} "
            f"released={self.released}>"
        )


@dataclass
class FaultRule:
    """A fault injected with :meth:`FakeFeishu.fail`, ``delay``, ``hold`` or ``cut``.

    ``target`` is an endpoint name (see :data:`ENDPOINTS`), a path glob
    (``/open-apis/im/v1/messages/*/reply``) or ``"METHOD glob"``. ``times=None`` means forever.
    """

    target: str
    kind: Literal["fail", "delay", "hold", "cut"]
    times: int | None
    http_status: int = 400
    body: JSONDict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    gate: Gate | None = None
    hits: int = 0
    cancelled: bool = False

    @property
    def active(self) -> bool:
        """Whether the rule still applies."""
        return not self.cancelled and (self.times is None or self.hits < self.times)

    def cancel(self) -> None:
        """Stop applying the rule."""
        self.cancelled = True

    def matches(self, endpoint: str, method: str, path: str) -> bool:
        """Whether a request (endpoint name, method, path) is targeted by this rule."""
        target = self.target
        if target in ENDPOINTS or target == "unknown":
            return endpoint == target
        if " " in target:
            want_method, glob = target.split(" ", 1)
            return want_method.upper() == method and fnmatch.fnmatchcase(path, glob)
        return fnmatch.fnmatchcase(path, target)

    def describe(self) -> str:
        """Short description for :attr:`RestCall.injected`."""
        if self.kind == "fail" and self.body is not None:
            return f"fail {self.http_status} code={self.body.get('code')}"
        return self.kind


@dataclass
class _Reply:
    status: int = 200
    body: JSONDict | None = None
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    cut: bool = False
    """Send nothing: abort the connection instead (:meth:`FakeFeishu.cut`)."""


def _cut_connection(request: web.Request) -> web.StreamResponse:
    """Abort ``request``'s connection; the response returned is never sent."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)


def _ok(data: JSONDict | None = None, **top: Any) -> _Reply:
    body: JSONDict = {"code": 0, "msg": "success"}
    if data is not None:
        body["data"] = data
    body.update(top)
    return _Reply(body=body)


def _error(code: int, msg: str, status: int = 400) -> _Reply:
    return _Reply(status=status, body={"code": code, "msg": msg})


def _field_error(field_name: str, description: str, value: Any = None) -> _Reply:
    """Feishu's ``99992402`` answer with the offending field in ``error.field_violations``."""
    violation: JSONDict = {"field": field_name, "description": description}
    if value is not None:
        violation["value"] = value if isinstance(value, str) else json.dumps(value)
    return _Reply(
        status=400,
        body={
            "code": CODE_FIELD_VALIDATION,
            "msg": "field validation failed",
            "error": {"field_violations": [violation]},
        },
    )


def _sniff_image(data: bytes) -> str | None:
    """The image content type of ``data`` by its magic bytes (``None``: not an image)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, content_type in _IMAGE_MAGIC:
        if data.startswith(magic):
            return content_type
    return None


def _sample_error(name: str) -> _Reply:
    sample = FEISHU_ERRORS[name]
    return _Reply(status=int(sample["http_status"]), body=copy.deepcopy(sample["body"]))


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------


class FakeFeishu(ServerLifecycle):
    """A fake Feishu open platform on ``127.0.0.1`` (see the module docstring).

    ``reconnect_*`` and ``ping_interval`` form the ``ClientConfig`` sent with the endpoint and
    with every pong (seconds; floats are accepted by the SDK). ``redeliver_after`` (seconds,
    ``None`` = never) redelivers events that were not ACKed, at most ``max_attempts`` sends in
    total (Feishu itself redelivers after roughly 3 s; the default ``None`` never redelivers,
    pass ``redeliver_after=3.0`` for realism). ``replay_unacked`` re-queues unacknowledged
    events of a dropped connection for the next connection. ``ws_auth_error`` is the
    ``(code, msg)`` answered by the endpoint discovery on bad credentials; the real code is not
    pinned by the SDK (any code but 0, 1 and 1000040343 is fatal for it, so the SDK behaves
    the same for 514 or 10014). The token endpoints answer bad secrets with ``10014``.
    ``degrade_v2_cards`` makes ``GET``/list of a schema 2.0 card message answer Feishu's
    "please upgrade your client" stub instead of the card's text (see the module docstring).
    ``unknown_app_error``, ``bot_enabled``, ``bot_activate_status``, ``scopes`` and ``ws_url``
    model an app that is not fully set up, for the setup checks (see the module docstring);
    all of them can also be changed on a running fake.
    """

    def __init__(
        self,
        *,
        app_id: str = DEFAULT_APP_ID,
        app_secret: str = DEFAULT_APP_SECRET,
        bot_open_id: str = BOT_OPEN_ID,
        bot_name: str = BOT_NAME,
        host: str = "127.0.0.1",
        port: int = 0,
        reconnect_count: int = -1,
        reconnect_interval: float = 1,
        reconnect_nonce: float = 0,
        ping_interval: float = 120,
        pong_with_config: bool = True,
        redeliver_after: float | None = None,
        max_attempts: int = 4,
        replay_unacked: bool = True,
        token_ttl: int = 7200,
        card_size_limit: int | None = 30 * 1024,
        enforce_streaming_mode: bool = True,
        ws_auth_error: tuple[int, str] = (514, "auth failed: invalid app_id or app_secret"),
        degrade_v2_cards: bool = False,
        unknown_app_error: tuple[int, str] = (CODE_UNKNOWN_APP, "app_id not found"),
        bot_enabled: bool = True,
        bot_activate_status: int = 2,
        scopes: Mapping[str, int] | None = None,
        ws_url: str | None = None,
    ) -> None:
        self.app_id = app_id
        self.app_secret = app_secret
        self.bot_open_id = bot_open_id
        self.bot_name = bot_name
        self.host = host
        self._requested_port = port
        self.client_config: JSONDict = {
            "ReconnectCount": reconnect_count,
            "ReconnectInterval": reconnect_interval,
            "ReconnectNonce": reconnect_nonce,
            "PingInterval": ping_interval,
        }
        self.pong_with_config = pong_with_config
        self.redeliver_after = redeliver_after
        self.max_attempts = max_attempts
        self.replay_unacked = replay_unacked
        self.token_ttl = token_ttl
        self.card_size_limit = card_size_limit
        self.enforce_streaming_mode = enforce_streaming_mode
        self.ws_auth_error = ws_auth_error
        self.degrade_v2_cards = degrade_v2_cards
        self.unknown_app_error = unknown_app_error
        """``(code, msg)`` of the token endpoints for an ``app_id`` the fake does not know."""
        self.bot_enabled = bot_enabled
        """False: the app has no bot feature, ``bot/v3/info`` answers ``11205``."""
        self.bot_activate_status = bot_activate_status
        self.scopes: dict[str, int] = (
            dict(scopes) if scopes is not None else dict.fromkeys(DEFAULT_SCOPES, GRANTED)
        )
        """``scope_name -> grant_status`` listed by ``application/v6/scopes`` (see
        :meth:`set_scopes`)."""
        self.ws_url = ws_url
        """The WebSocket URL handed out by the endpoint discovery instead of the fake's own."""

        self._notifier = _Notifier()
        self._lock = self._notifier.lock
        self.calls: list[RestCall] = []
        self.acks: list[AckRecord] = []
        self.unexpected_frames: list[JSONDict] = []
        self.deliveries: dict[str, Delivery] = {}
        self.connections: list[WsConnection] = []
        self.connected = SignalEvent()
        """Set when the first long connection is established."""
        self.messages: dict[str, FakeMessage] = {}
        self.cards: dict[str, FakeCard] = {}
        self.users: dict[str, str] = {SAMPLE_SENDER_OPEN_ID: "Sample User"}
        """``open_id -> name`` answered by ``contact/v3/users/batch``."""
        self.resources: dict[str, tuple[bytes, str]] = {}
        """``file_key -> (bytes, content_type)`` served by the resource endpoints."""
        self.resource_kinds: dict[str, Literal["image", "file"]] = {}
        """``file_key -> kind`` the message resource endpoint checks ``?type=`` against."""
        self.strict_resources = False
        """True: a message resource request for a key not in :attr:`resources` answers
        ``234003`` "File not in msg." instead of made-up bytes."""
        self.speech_text: str | Callable[[SpeechRequest], str] = "recognized speech"
        """What ``file_recognize`` answers as ``recognition_text`` (or a function of the
        :class:`SpeechRequest`)."""
        self.speech_requests: list[SpeechRequest] = []
        """Every ``file_recognize`` request whose audio decoded, answered or refused."""
        self._uploaded_images: list[UploadedImage] = []
        self.tokens: dict[str, str] = {}
        """Issued and still valid access tokens: ``token -> kind``."""
        self.rules: list[FaultRule] = []
        self._tickets: dict[str, tuple[str, int]] = {}
        self._pending: list[Delivery] = []
        self._uuids: dict[str, str] = {}
        self._rr = 0
        self._seq = itertools.count(1)
        self._frame_seq = itertools.count(1)
        self._id_counter = itertools.count(1)
        self._service_ids = itertools.count(7_100)
        self._card_ids = itertools.count(7_355_372_766_134_157_313)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port: int | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving (idempotent)."""
        if self._runner is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
        app.router.add_route("*", "/ws", self._handle_ws)
        app.router.add_route("*", "/{tail:.*}", self._handle_http)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, backlog=LISTEN_BACKLOG)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Release gates, abort connections and shut the server down (idempotent)."""
        runner, self._runner = self._runner, None
        self._stopping = True
        with self._lock:
            for rule in self.rules:
                if rule.gate is not None:
                    rule.gate.release()
            connections = [c for c in self.connections if c.open]
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        for conn in connections:
            if conn.transport is not None:
                conn.transport.abort()
        if runner is not None:
            await runner.cleanup()
        self._notifier.notify()

    def run_in_thread(self) -> FakeFeishuThread:
        """Start this fake on its own event loop in a daemon thread; ``close()`` it when done."""
        return FakeFeishuThread(self).start()

    @property
    def domain(self) -> str:
        """``http://127.0.0.1:PORT``: pass it as the SDK's / channel's ``domain``."""
        return f"http://{self.host}:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the fake serves on."""
        if self._loop is None:
            raise RuntimeError("FakeFeishu is not started")
        return self._loop

    def _submit(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        loop = self.loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("a *_blocking call was made on the fake's own event loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- waiting -----------------------------------------------------------------------------

    async def wait_until(
        self, predicate: Callable[[], T | None], timeout: float = 5.0, what: str = "condition"
    ) -> T:
        """Await until ``predicate()`` is truthy (checked under the state lock on every change).

        Returns the truthy value; raises :class:`TimeoutError`. Works from any event loop.
        """
        return await self._notifier.wait_for(predicate, timeout, what)

    def wait_until_blocking(
        self, predicate: Callable[[], T | None], timeout: float = 5.0, what: str = "condition"
    ) -> T:
        """Blocking variant of :meth:`wait_until` for plain threads."""
        return self._notifier.wait_for_blocking(predicate, timeout, what)

    def _ack_predicate(self, message_id: str) -> Callable[[], AckRecord | None]:
        def find() -> AckRecord | None:
            for ack in self.acks:
                if message_id in (ack.frame_message_id, ack.message_id, ack.event_id):
                    return ack
            return None

        return find

    async def wait_for_ack(self, message_id: str, timeout: float = 5.0) -> AckRecord:
        """Wait for the first ACK of a delivery.

        ``message_id`` is the frame message id returned by :meth:`deliver`, or the event's IM
        message id, or its event id.
        """
        return await self.wait_until(self._ack_predicate(message_id), timeout, f"ACK {message_id}")

    def wait_for_ack_blocking(self, message_id: str, timeout: float = 5.0) -> AckRecord:
        """Blocking variant of :meth:`wait_for_ack`."""
        return self.wait_until_blocking(
            self._ack_predicate(message_id), timeout, f"ACK {message_id}"
        )

    def _connections_predicate(self, n: int, after: int) -> Callable[[], list[WsConnection]]:
        def find() -> list[WsConnection]:
            opened = [c for c in self.connections[after:] if c.open]
            return opened if len(opened) >= n else []

        return find

    async def wait_for_connections(
        self, n: int = 1, timeout: float = 5.0, *, after: int = 0
    ) -> list[WsConnection]:
        """Wait until ``n`` connections are open among those made after the first ``after``."""
        return await self.wait_until(
            self._connections_predicate(n, after), timeout, f"{n} open connection(s)"
        )

    def wait_for_connections_blocking(
        self, n: int = 1, timeout: float = 5.0, *, after: int = 0
    ) -> list[WsConnection]:
        """Blocking variant of :meth:`wait_for_connections`."""
        return self.wait_until_blocking(
            self._connections_predicate(n, after), timeout, f"{n} open connection(s)"
        )

    def _calls_predicate(
        self, endpoint: str, n: int, finished: bool
    ) -> Callable[[], list[RestCall]]:
        def find() -> list[RestCall]:
            found = [
                c
                for c in self.calls
                if c.endpoint == endpoint and (not finished or c.finished_at is not None)
            ]
            return found if len(found) >= n else []

        return find

    async def wait_for_calls(
        self, endpoint: str, n: int = 1, timeout: float = 5.0, *, finished: bool = True
    ) -> list[RestCall]:
        """Wait until ``n`` calls of ``endpoint`` arrived (and were answered, by default)."""
        return await self.wait_until(
            self._calls_predicate(endpoint, n, finished), timeout, f"{n} x {endpoint}"
        )

    def wait_for_calls_blocking(
        self, endpoint: str, n: int = 1, timeout: float = 5.0, *, finished: bool = True
    ) -> list[RestCall]:
        """Blocking variant of :meth:`wait_for_calls`."""
        return self.wait_until_blocking(
            self._calls_predicate(endpoint, n, finished), timeout, f"{n} x {endpoint}"
        )

    # -- queries -----------------------------------------------------------------------------

    def calls_to(self, endpoint: str | None = None, *, since: int = 0) -> list[RestCall]:
        """Recorded calls (optionally of one endpoint) with ``seq > since``, in arrival order."""
        with self._lock:
            return [
                c
                for c in self.calls
                if c.seq > since and (endpoint is None or c.endpoint == endpoint)
            ]

    def mark(self) -> int:
        """The ``seq`` of the last recorded call (pass it as ``since=`` later)."""
        with self._lock:
            return self.calls[-1].seq if self.calls else 0

    def delivery(self, frame_message_id: str) -> Delivery:
        """The delivery behind a frame message id returned by :meth:`deliver`."""
        with self._lock:
            return self.deliveries[frame_message_id]

    def open_connections(self) -> list[WsConnection]:
        """Connections that are currently open."""
        with self._lock:
            return [c for c in self.connections if c.open]

    def card(self, card_id: str) -> FakeCard:
        """The modelled card."""
        with self._lock:
            return self.cards[card_id]

    def card_text(self, card_id: str) -> str:
        """What the card shows now."""
        with self._lock:
            return self.cards[card_id].text

    def message(self, message_id: str) -> FakeMessage:
        """A modelled message (sent by the bot or delivered as an event)."""
        with self._lock:
            return self.messages[message_id]

    def message_text(self, message_id: str) -> str:
        """The text a user sees for a message (a card reference shows its card's text)."""
        with self._lock:
            return self._visible_text(self.messages[message_id])

    def replies_to(self, message_id: str) -> list[FakeMessage]:
        """Messages created with ``POST /im/v1/messages/{message_id}/reply``, in order."""
        with self._lock:
            return [m for m in self.messages.values() if m.reply_to == message_id]

    def reply_texts(self, message_id: str) -> list[str]:
        """Visible texts of :meth:`replies_to` (live: a streaming card shows its latest text)."""
        with self._lock:
            return [self._visible_text(m) for m in self.replies_to(message_id)]

    def sent_messages(self, chat_id: str | None = None) -> list[FakeMessage]:
        """Messages the bot sent (create or reply), optionally in one chat, in order."""
        with self._lock:
            return [
                m
                for m in self.messages.values()
                if m.sender_type == "app" and (chat_id is None or m.chat_id == chat_id)
            ]

    def uploaded_images(self) -> list[UploadedImage]:
        """Images accepted by ``POST /im/v1/images``, in upload order."""
        with self._lock:
            return list(self._uploaded_images)

    def _visible_text(self, message: FakeMessage) -> str:
        if message.card_id is not None and message.card_id in self.cards:
            return self.cards[message.card_id].text
        content = _load_json(message.content)
        if message.msg_type == "text" and isinstance(content, dict):
            return str(content.get("text", ""))
        if message.msg_type == "post":
            return _post_text(content)
        if message.msg_type == "interactive":
            return _card_json_text(content)
        return f"[{message.msg_type}]"

    # -- configuration -----------------------------------------------------------------------

    def fail(
        self,
        target: str,
        error: str | int | None = None,
        msg: str | None = None,
        http_status: int | None = None,
        *,
        code: int | None = None,
        times: int | None = 1,
        headers: Mapping[str, str] | None = None,
    ) -> FaultRule:
        """Answer the next ``times`` matching requests (``None``: all) with an error body.

        ``error`` is either a name in :data:`FEISHU_ERRORS` (``"rate_limited"``,
        ``"card_too_large"``, ``"message_recalled"``, ``"patch_window_expired"``,
        ``"card_sequence_not_increasing"``, ``"no_permission_cardkit"``,
        ``"invalid_app_secret"``) or a numeric code; ``msg``/``http_status``/``code`` override
        the sample. Both ``fs.fail("message_reply", "rate_limited")`` and
        ``fs.fail("message_reply", 230011, "withdrawn", 400)`` work.

        For ``"ws_connect"`` the WebSocket handshake is refused with ``http_status`` and the
        ``handshake-status``/``handshake-msg`` headers the SDK parses: 403 is fatal for the
        SDK; for 514 pass ``headers={"handshake-autherrcode": "1000040350"}`` (connection
        limit, fatal) or another code (retried).
        """
        body: JSONDict = {"code": 1, "msg": "injected failure"}
        status = 400
        if isinstance(error, str):
            sample = FEISHU_ERRORS[error]
            body = copy.deepcopy(sample["body"])
            status = int(sample["http_status"])
        elif isinstance(error, int):
            body["code"] = error
        if code is not None:
            body["code"] = code
        if msg is not None:
            body["msg"] = msg
        if http_status is not None:
            status = http_status
        rule = FaultRule(
            target=target,
            kind="fail",
            times=times,
            http_status=status,
            body=body,
            headers=dict(headers or {}),
        )
        return self._add_rule(rule)

    def delay(self, target: str, seconds: float, *, times: int | None = None) -> FaultRule:
        """Delay matching requests by ``seconds`` before answering them."""
        return self._add_rule(FaultRule(target=target, kind="delay", times=times, seconds=seconds))

    def hold(self, target: str, *, times: int | None = 1) -> Gate:
        """Hold the next ``times`` matching requests until ``gate.release()``."""
        gate = Gate(target)
        self._add_rule(FaultRule(target=target, kind="hold", times=times, gate=gate))
        return gate

    def cut(self, target: str, *, times: int | None = 1) -> FaultRule:
        """Abort the connection of the next ``times`` matching requests once their body is read,
        without answering (the client sees the connection reset mid-call). The call is
        recorded with status ``None`` and ``injected == "cut"``; the endpoint's effect does not
        happen."""
        return self._add_rule(FaultRule(target=target, kind="cut", times=times))

    def _add_rule(self, rule: FaultRule) -> FaultRule:
        if (
            rule.target not in ENDPOINTS
            and not rule.target.startswith(("/", "*"))
            and (" " not in rule.target)
        ):
            raise ValueError(f"unknown endpoint {rule.target!r}; known: {sorted(ENDPOINTS)}")
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Cancel every fault rule and release every gate."""
        with self._lock:
            for rule in self.rules:
                rule.cancel()
                if rule.gate is not None:
                    rule.gate.release()
            self.rules.clear()

    def revoke_tokens(self) -> None:
        """Invalidate all issued access tokens (later calls with them get ``99991663``)."""
        with self._lock:
            self.tokens.clear()

    def set_credentials(self, app_id: str, app_secret: str) -> None:
        """Change the credentials the fake accepts."""
        with self._lock:
            self.app_id = app_id
            self.app_secret = app_secret

    def set_scopes(self, granted: Iterable[str], *, not_granted: Iterable[str] = ()) -> None:
        """Make ``application/v6/scopes`` list exactly these scopes: ``granted`` with
        ``grant_status`` 1, ``not_granted`` (requested, not approved yet) with 2."""
        scopes = dict.fromkeys(granted, GRANTED)
        scopes.update(dict.fromkeys(not_granted, NOT_GRANTED))
        with self._lock:
            self.scopes = scopes

    def add_user(self, open_id: str, name: str) -> None:
        """Make ``contact/v3/users/batch`` resolve ``open_id`` to ``name``."""
        with self._lock:
            self.users[open_id] = name

    def add_resource(
        self,
        file_key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        kind: Literal["image", "file"] | None = None,
    ) -> None:
        """Serve ``data`` for ``file_key`` (message resources, images, files).

        With a ``kind`` the message resource endpoint answers ``234001`` to a request whose
        ``type`` is the other one (an image fetched with ``type=file``, say); voice messages and
        files are ``file``, images ``image``.
        """
        with self._lock:
            self.resources[file_key] = (data, content_type)
            if kind is None:
                self.resource_kinds.pop(file_key, None)
            else:
                self.resource_kinds[file_key] = kind

    def add_message(
        self,
        *,
        text: str | None = None,
        content: str | None = None,
        msg_type: str = "text",
        chat_id: str,
        sender_open_id: str = SAMPLE_SENDER_OPEN_ID,
        sender_type: Literal["user", "app"] = "user",
        message_id: str | None = None,
        root_id: str = "",
        parent_id: str = "",
    ) -> str:
        """Put a message into the IM model (as if sent earlier) and return its id.

        ``GET /im/v1/messages/:message_id`` then answers it: give it as the ``parent_id`` of a
        delivered event to test "the user quoted another message". Pass either ``text`` (a
        text message, content ``{"text": text}``) or ``content`` (the raw content JSON string
        of ``msg_type``; an ``interactive`` ``{"type": "card", "data": {"card_id"}}`` links
        the CardKit card). ``sender_type="app"`` makes it a message of this bot (its sender is
        the app id; ``sender_open_id`` is then ignored). A new ``om_…`` id unless
        ``message_id`` is given; an existing message with that id is replaced.
        """
        if text is not None and content is None:
            if msg_type != "text":
                raise ValueError(f"text= makes a text message, not msg_type={msg_type!r}")
            content = json.dumps({"text": text}, ensure_ascii=False)
        elif text is not None or content is None:
            raise ValueError("add_message needs exactly one of text= or content=")
        mid = message_id or new_message_id()
        message = FakeMessage(
            message_id=mid,
            chat_id=chat_id,
            msg_type=msg_type,
            content=content,
            sender_type=sender_type,
            sender_id=self.app_id if sender_type == "app" else sender_open_id,
            create_time=int(time.time() * 1000),
            root_id=root_id,
            parent_id=parent_id,
            content_history=[content],
        )
        with self._lock:
            if msg_type == "interactive":
                parsed = _load_json(content)
                if isinstance(parsed, dict) and parsed.get("type") == "card":
                    card_id = str((parsed.get("data") or {}).get("card_id"))
                    if card_id in self.cards:
                        message.card_id = card_id
                        self.cards[card_id].message_ids.append(mid)
            self.messages[mid] = message
        self._notifier.notify()
        return mid

    # -- event delivery ----------------------------------------------------------------------

    def build_event(self, sample: str = "p2p_text", **kwargs: Any) -> JSONDict:
        """:func:`build_message_event` with this fake's app id and bot identity.

        The chat event samples (:data:`CHAT_EVENT_SAMPLE_NAMES`) go to
        :meth:`build_p2p_chat_entered` / :meth:`build_bot_added` instead.
        """
        if sample == "p2p_chat_entered":
            return self.build_p2p_chat_entered(**kwargs)
        if sample == "bot_added":
            return self.build_bot_added(**kwargs)
        kwargs.setdefault("app_id", self.app_id)
        kwargs.setdefault("bot_open_id", self.bot_open_id)
        kwargs.setdefault("bot_name", self.bot_name)
        return build_message_event(sample, **kwargs)

    def build_p2p_chat_entered(self, **kwargs: Any) -> JSONDict:
        """:func:`build_p2p_chat_entered_event` with this fake's app id."""
        kwargs.setdefault("app_id", self.app_id)
        return build_p2p_chat_entered_event(**kwargs)

    def build_bot_added(self, **kwargs: Any) -> JSONDict:
        """:func:`build_bot_added_event` with this fake's app id."""
        kwargs.setdefault("app_id", self.app_id)
        return build_bot_added_event(**kwargs)

    async def deliver(
        self,
        event: JSONDict | str = "p2p_text",
        *,
        fragments: int = 1,
        reverse_fragments: bool = False,
        redeliver_after: float | Literal["default"] | None = "default",
        max_attempts: int | None = None,
        conn_id: str | None = None,
        **build_kwargs: Any,
    ) -> str:
        """Deliver an event through the long connection and return the frame message id.

        ``event`` is a full event dict (sent as is) or a sample name; with a sample name the
        remaining keyword arguments go to :func:`build_message_event` (``text=``,
        ``message_id=``, ``event_id=``, ``mention_bot=``, ``overrides=`` …). ``fragments > 1``
        splits the payload into that many frames (``sum``/``seq``), in reverse order with
        ``reverse_fragments``. ``conn_id`` picks the connection of the first send (default:
        round robin over open connections; a redelivery prefers another connection than the
        silent one). With no open connection the event waits for the next one.
        Must run on the fake's loop (see :meth:`deliver_blocking`).
        """
        if isinstance(event, str):
            event = self.build_event(event, **build_kwargs)
        elif build_kwargs:
            raise TypeError("keyword arguments are only accepted with a sample name")
        payload = json.dumps(event, ensure_ascii=False).encode("utf-8")
        if not 1 <= fragments <= len(payload):
            raise ValueError("fragments must be between 1 and the payload length")
        delivery = Delivery(
            frame_message_id=f"{next(self._id_counter):04d}{uuid.uuid4().hex[:16]}",
            event=event,
            payload=payload,
            fragments=fragments,
            reverse_fragments=reverse_fragments,
            redeliver_after=(
                self.redeliver_after if redeliver_after == "default" else redeliver_after
            ),
            max_attempts=max_attempts if max_attempts is not None else self.max_attempts,
            created=time.monotonic(),
            conn_id=conn_id,
        )
        with self._lock:
            self.deliveries[delivery.frame_message_id] = delivery
            self._record_inbound_message(event)
        await self._send_delivery(delivery, "first")
        self._notifier.notify()
        return delivery.frame_message_id

    def deliver_blocking(
        self, event: JSONDict | str = "p2p_text", *, timeout: float = 10.0, **kwargs: Any
    ) -> str:
        """:meth:`deliver` submitted to the fake's loop from another thread."""
        return self._submit(self.deliver(event, **kwargs), timeout)

    def _record_inbound_message(self, event: JSONDict) -> None:
        # Only message events carry ``event.message``: chat events (bot added, p2p chat
        # entered, …) and anything else pass through without touching the IM model.
        body = event.get("event")
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict) or not message.get("message_id"):
            return
        sender = (body or {}).get("sender") or {}
        sender_id = (sender.get("sender_id") or {}).get("open_id", "")
        mentions = [
            {
                "key": str(m.get("key") or ""),
                "id": str((m.get("id") or {}).get("open_id") or ""),
                "id_type": "open_id",
                "name": str(m.get("name") or ""),
                "tenant_key": str(m.get("tenant_key") or ""),
            }
            for m in message.get("mentions") or []
            if isinstance(m, dict)
        ]
        mid = str(message["message_id"])
        self.messages[mid] = FakeMessage(
            message_id=mid,
            chat_id=str(message.get("chat_id") or ""),
            msg_type=str(message.get("message_type") or ""),
            content=str(message.get("content") or ""),
            sender_type="user",
            sender_id=str(sender_id),
            create_time=int(message.get("create_time") or 0),
            chat_type=str(message.get("chat_type") or ""),
            root_id=str(message.get("root_id") or ""),
            parent_id=str(message.get("parent_id") or ""),
            thread_id=str(message.get("thread_id") or ""),
            content_history=[str(message.get("content") or "")],
            mentions=mentions,
        )

    def _pick_connection(self, delivery: Delivery, reason: str) -> WsConnection | None:
        opened = [c for c in self.connections if c.open]
        if not opened:
            return None
        if reason == "first" and delivery.conn_id is not None:
            for conn in opened:
                if conn.conn_id == delivery.conn_id:
                    return conn
        if reason == "redeliver" and len(opened) > 1 and delivery.attempts:
            # Prefer another client than the one that did not answer.
            opened = [c for c in opened if c.conn_id != delivery.attempts[-1].conn_id]
        conn = opened[self._rr % len(opened)]
        self._rr += 1
        return conn

    def _frames_for(self, delivery: Delivery, conn: WsConnection) -> list[bytes]:
        payload = delivery.payload
        total = delivery.fragments
        base, extra = divmod(len(payload), total)
        parts: list[bytes] = []
        start = 0
        for index in range(total):
            size = base + (1 if index < extra else 0)
            parts.append(payload[start : start + size])
            start += size
        frames: list[bytes] = []
        for index, part in enumerate(parts):
            frame = Frame()
            frame.SeqID = next(self._frame_seq)
            frame.LogID = frame.SeqID
            frame.service = conn.service_id
            frame.method = _FRAME_DATA
            for key, value in (
                ("type", "event"),
                ("message_id", delivery.frame_message_id),
                ("trace_id", delivery.trace_id),
                ("sum", str(total)),
                ("seq", str(index)),
            ):
                header = frame.headers.add()
                header.key = key
                header.value = value
            frame.payload = part
            frames.append(frame.SerializeToString())
        if delivery.reverse_fragments:
            frames.reverse()
        return frames

    async def _send_delivery(
        self, delivery: Delivery, reason: Literal["first", "redeliver", "replay"]
    ) -> None:
        with self._lock:
            conn = self._pick_connection(delivery, reason)
            if conn is None:
                if delivery not in self._pending:
                    self._pending.append(delivery)
                return
            delivery.attempts.append(DeliveryAttempt(conn.conn_id, time.monotonic(), reason))
            attempt_index = len(delivery.attempts) - 1
        try:
            for data in self._frames_for(delivery, conn):
                await conn.ws.send_bytes(data)
        except (ConnectionError, RuntimeError):
            # The connection died under us; the close handler replays unacked deliveries.
            pass
        if delivery.redeliver_after is not None:
            self._arm_redelivery(delivery, attempt_index)
        self._notifier.notify()

    def _arm_redelivery(self, delivery: Delivery, attempt_index: int) -> None:
        assert delivery.redeliver_after is not None
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            with self._lock:
                due = (
                    not delivery.acked
                    and len(delivery.attempts) == attempt_index + 1
                    and len(delivery.attempts) < delivery.max_attempts
                    and not self._stopping
                )
            if due:
                self._spawn(self._send_delivery(delivery, "redeliver"))

        handle = self.loop.call_later(delivery.redeliver_after, fire)
        self._timers.add(handle)

    async def drop_connections(self, *, graceful: bool = False) -> int:
        """Close every open long connection (abort the TCP socket unless ``graceful``).

        The SDK notices, calls its reconnect loop and fetches a new endpoint. Returns how many
        connections were dropped, after the server has processed their closing.
        """
        with self._lock:
            victims = [c for c in self.connections if c.open]
        for conn in victims:
            if graceful or conn.transport is None:
                await conn.ws.close()
            else:
                conn.transport.abort()
        await self.wait_until(
            lambda: all(not c.open for c in victims) or None,
            5.0,
            "dropped connections to close",
        )
        return len(victims)

    def drop_connections_blocking(self, *, graceful: bool = False, timeout: float = 10.0) -> int:
        """:meth:`drop_connections` submitted to the fake's loop from another thread."""
        return self._submit(self.drop_connections(graceful=graceful), timeout)

    # -- WebSocket ---------------------------------------------------------------------------

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        call = self._record_call(request, "ws_connect", {}, None)
        injected = await self._apply_faults(call)
        device_id = request.query.get("device_id", "")
        ticket = request.query.get("ticket", "")
        with self._lock:
            issued = self._tickets.pop(device_id, None)
        if injected is not None and injected.cut:
            return _cut_connection(request)
        if injected is None and (issued is None or issued[0] != ticket):
            injected = _Reply(status=403, body={"code": 403, "msg": "unknown device_id or ticket"})
        if injected is not None:
            body = injected.body or {}
            headers = {
                "handshake-status": str(body.get("code", injected.status)),
                "handshake-msg": str(body.get("msg", "")),
                **injected.headers,
            }
            self._finish_call(call, injected.status, body)
            return web.json_response(body, status=injected.status, headers=headers)

        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        assert issued is not None
        conn = WsConnection(
            conn_id=device_id,
            service_id=issued[1],
            ws=ws,
            transport=request.transport,
            connected_at=time.monotonic(),
            headers={k: v for k, v in request.headers.items() if k.lower() != "authorization"},
        )
        with self._lock:
            self.connections.append(conn)
            pending, self._pending = self._pending, []
        self.connected.set()
        self._finish_call(call, 101, {"conn_id": device_id})
        for delivery in pending:
            await self._send_delivery(delivery, "replay")
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self._on_frame(conn, msg.data)
                elif msg.type == WSMsgType.TEXT:
                    with self._lock:
                        self.unexpected_frames.append({"conn_id": conn.conn_id, "text": msg.data})
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            await self._on_closed(conn)
        return ws

    async def _on_closed(self, conn: WsConnection) -> None:
        with self._lock:
            conn.closed_at = time.monotonic()
            replay: list[Delivery] = []
            if self.replay_unacked and not self._stopping:
                for delivery in self.deliveries.values():
                    last = delivery.attempts[-1] if delivery.attempts else None
                    if not delivery.acked and last is not None and last.conn_id == conn.conn_id:
                        replay.append(delivery)
        self._notifier.notify()
        for delivery in replay:
            await self._send_delivery(delivery, "replay")

    async def _on_frame(self, conn: WsConnection, data: bytes) -> None:
        frame = Frame()
        try:
            frame.ParseFromString(data)
        except Exception as exc:  # a garbage frame is recorded, not fatal
            with self._lock:
                self.unexpected_frames.append({"conn_id": conn.conn_id, "error": repr(exc)})
            self._notifier.notify()
            return
        headers = {h.key: h.value for h in frame.headers}
        with self._lock:
            conn.frames_received += 1
        if frame.method == _FRAME_CONTROL and headers.get("type") == "ping":
            with self._lock:
                conn.pings += 1
            pong = Frame()
            pong.SeqID = 0
            pong.LogID = 0
            pong.service = frame.service
            pong.method = _FRAME_CONTROL
            header = pong.headers.add()
            header.key = "type"
            header.value = "pong"
            if self.pong_with_config:
                pong.payload = json.dumps(self.client_config).encode("utf-8")
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.ws.send_bytes(pong.SerializeToString())
            self._notifier.notify()
            return
        if frame.method == _FRAME_DATA and headers.get("message_id") in self.deliveries:
            self._record_ack(conn, headers, frame.payload)
            return
        with self._lock:
            self.unexpected_frames.append(
                {"conn_id": conn.conn_id, "method": frame.method, "headers": headers}
            )
        self._notifier.notify()

    def _record_ack(self, conn: WsConnection, headers: dict[str, str], payload: bytes) -> None:
        parsed = _load_json(payload.decode("utf-8", errors="replace"))
        code = parsed.get("code") if isinstance(parsed, dict) else None
        now = time.monotonic()
        with self._lock:
            delivery = self.deliveries[headers["message_id"]]
            sent = [a.time for a in delivery.attempts if a.conn_id == conn.conn_id]
            ack = AckRecord(
                frame_message_id=delivery.frame_message_id,
                conn_id=conn.conn_id,
                code=int(code) if isinstance(code, int) else None,
                payload=parsed,
                headers=headers,
                time=now,
                latency=(now - sent[-1]) if sent else None,
                event_id=delivery.event_id,
                message_id=delivery.message_id,
            )
            delivery.acks.append(ack)
            self.acks.append(ack)
        self._notifier.notify()

    # -- HTTP plumbing -----------------------------------------------------------------------

    def _record_call(
        self,
        request: web.Request,
        endpoint: str,
        params: dict[str, str],
        body: Any,
        files: dict[str, FormFile] | None = None,
    ) -> RestCall:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        with self._lock:
            call = RestCall(
                seq=next(self._seq),
                method=request.method,
                path=request.path,
                endpoint=endpoint,
                path_params=params,
                query={k: request.query.getone(k) for k in request.query},
                query_multi={k: request.query.getall(k) for k in request.query},
                json=body,
                headers={k: v for k, v in request.headers.items() if k.lower() != "authorization"},
                token=token,
                time=time.monotonic(),
                peer=_peer_of(request),
                files=dict(files or {}),
            )
            self.calls.append(call)
        self._notifier.notify()
        return call

    def _finish_call(self, call: RestCall, status: int, response: Any) -> None:
        with self._lock:
            call.status = status
            call.response = response
            call.finished_at = time.monotonic()
        self._notifier.notify()

    async def _apply_faults(self, call: RestCall) -> _Reply | None:
        with self._lock:
            matching: dict[str, FaultRule] = {}
            for rule in self.rules:
                if (
                    rule.kind not in matching
                    and rule.active
                    and rule.matches(call.endpoint, call.method, call.path)
                ):
                    rule.hits += 1
                    matching[rule.kind] = rule
        hold = matching.get("hold")
        if hold is not None and hold.gate is not None:
            with self._lock:
                hold.gate.calls.append(call)
            hold.gate.arrived.set()
            await hold.gate._released.wait()
        delay = matching.get("delay")
        if delay is not None and delay.seconds > 0:
            await asyncio.sleep(delay.seconds)
        if "cut" in matching:
            with self._lock:
                call.injected = "cut"
            return _Reply(status=0, cut=True)
        failure = matching.get("fail")
        if failure is not None:
            with self._lock:
                call.injected = failure.describe()
            return _Reply(
                status=failure.http_status,
                body=copy.deepcopy(failure.body),
                headers=dict(failure.headers),
            )
        return None

    async def _read_body(self, request: web.Request) -> tuple[Any, dict[str, FormFile]]:
        """The JSON-friendly body (file parts as their metadata) and the file parts' bytes."""
        files: dict[str, FormFile] = {}
        if not request.body_exists:
            return None, files
        if request.content_type.startswith("multipart/"):
            fields, files = await read_form(request)
            return form_summary(fields, files), files
        raw = await request.read()
        if not raw:
            return None, files
        try:
            return json.loads(raw), files
        except ValueError:
            return raw.decode("utf-8", errors="replace"), files

    async def _handle_http(self, request: web.Request) -> web.StreamResponse:
        endpoint, params = _route(request.method, request.path)
        body, files = await self._read_body(request)
        call = self._record_call(request, endpoint, params, body, files)
        reply = await self._apply_faults(call)
        if reply is not None and reply.cut:
            with self._lock:
                call.finished_at = time.monotonic()
            self._notifier.notify()
            return _cut_connection(request)
        if reply is None:
            with self._lock:
                reply = self._auth_check(call) or self._dispatch(call)
        self._finish_call(call, reply.status, reply.body if reply.raw is None else "<bytes>")
        if reply.raw is not None:
            return web.Response(
                body=reply.raw,
                status=reply.status,
                content_type=reply.content_type,
                headers=reply.headers,
            )
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)

    def _auth_check(self, call: RestCall) -> _Reply | None:
        if call.endpoint in _NO_AUTH_ENDPOINTS:
            return None
        if not call.token:
            return _error(CODE_MISSING_TOKEN, "Missing access token for authorization.")
        if call.token not in self.tokens:
            return _error(CODE_INVALID_TOKEN, "Invalid access token for authorization.")
        return None

    def _dispatch(self, call: RestCall) -> _Reply:
        handler: Callable[[RestCall], _Reply] | None = getattr(self, f"_ep_{call.endpoint}", None)
        if handler is None:
            return _error(404, "404 page not found", status=404)
        return handler(call)

    def _body(self, call: RestCall) -> JSONDict:
        return call.json if isinstance(call.json, dict) else {}

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{uuid.uuid4().hex[:24]}"

    # -- endpoint discovery and auth ---------------------------------------------------------

    def _ep_ws_endpoint(self, call: RestCall) -> _Reply:
        body = self._body(call)
        if body.get("AppID") != self.app_id or body.get("AppSecret") != self.app_secret:
            code, msg = self.ws_auth_error
            return _Reply(body={"code": code, "msg": msg, "data": {}})
        device_id = uuid.uuid4().hex
        service_id = next(self._service_ids)
        ticket = uuid.uuid4().hex
        self._tickets[device_id] = (ticket, service_id)
        base = self.ws_url or f"ws://{self.host}:{self.port}/ws"
        url = f"{base}?device_id={device_id}&service_id={service_id}&ticket={ticket}"
        return _ok({"URL": url, "ClientConfig": dict(self.client_config)})

    def _check_app(self, body: JSONDict) -> _Reply | None:
        if body.get("app_id") != self.app_id:
            code, msg = self.unknown_app_error
            return _Reply(body={"code": code, "msg": msg})
        if body.get("app_secret") != self.app_secret:
            return _sample_error("invalid_app_secret")
        return None

    def _ep_tenant_token(self, call: RestCall) -> _Reply:
        rejected = self._check_app(self._body(call))
        if rejected is not None:
            return rejected
        token = f"t-{uuid.uuid4().hex}"
        self.tokens[token] = "tenant"
        return _Reply(
            body={"code": 0, "msg": "ok", "tenant_access_token": token, "expire": self.token_ttl}
        )

    def _ep_app_token(self, call: RestCall) -> _Reply:
        rejected = self._check_app(self._body(call))
        if rejected is not None:
            return rejected
        token = f"a-{uuid.uuid4().hex}"
        self.tokens[token] = "app"
        return _Reply(
            body={"code": 0, "msg": "ok", "app_access_token": token, "expire": self.token_ttl}
        )

    def _ep_bot_info(self, call: RestCall) -> _Reply:
        if not self.bot_enabled:
            return _error(CODE_NO_BOT, "app do not have bot")
        bot = {
            "activate_status": self.bot_activate_status,
            "app_name": self.bot_name,
            "avatar_url": "",
            "ip_white_list": [],
            "open_id": self.bot_open_id,
        }
        return _Reply(body={"code": 0, "msg": "ok", "bot": bot})

    def _ep_application_scopes(self, call: RestCall) -> _Reply:
        scopes = [
            {"scope_name": name, "grant_status": status, "scope_type": "tenant"}
            for name, status in self.scopes.items()
        ]
        return _ok({"scopes": scopes})

    def _ep_application_get(self, call: RestCall) -> _Reply:
        return _ok({"app": {"app_id": self.app_id, "app_name": self.bot_name}})

    def _ep_contact_users_batch(self, call: RestCall) -> _Reply:
        items = [
            {"open_id": oid, "name": self.users[oid], "union_id": f"on_{oid[3:]}", "user_id": ""}
            for oid in call.query_multi.get("user_ids", [])
            if oid in self.users
        ]
        return _ok({"items": items})

    # -- IM ----------------------------------------------------------------------------------

    def _over_card_limit(self, text: str) -> bool:
        """Whether ``text`` is more than Feishu takes in a card (``card_size_limit``)."""
        return self.card_size_limit is not None and len(text.encode()) > self.card_size_limit

    def _validate_content(self, msg_type: str, content: Any) -> _Reply | None:
        if not isinstance(content, str) or not isinstance(_load_json(content), dict):
            return _error(CODE_INVALID_CONTENT, "invalid message content")
        if self._over_card_limit(content):
            return _sample_error("card_too_large")
        if msg_type == "interactive":
            parsed = _load_json(content)
            if parsed.get("type") == "card":
                card_id = str((parsed.get("data") or {}).get("card_id", ""))
                if card_id not in self.cards:
                    return _error(CODE_CARD_CONTENT_FAILED, f"card {card_id!r} not found")
        return None

    def _new_bot_message(
        self,
        *,
        chat_id: str,
        msg_type: str,
        content: str,
        uuid_: str | None,
        reply_to: FakeMessage | None = None,
        reply_in_thread: bool | None = None,
        receive_id: str | None = None,
        receive_id_type: str | None = None,
    ) -> FakeMessage:
        message = FakeMessage(
            message_id=new_message_id(),
            chat_id=chat_id,
            msg_type=msg_type,
            content=content,
            sender_type="app",
            sender_id=self.app_id,
            create_time=int(time.time() * 1000),
            receive_id=receive_id,
            receive_id_type=receive_id_type,
            uuid=uuid_,
            reply_in_thread=reply_in_thread,
            content_history=[content],
        )
        if reply_to is not None:
            message.reply_to = reply_to.message_id
            message.root_id = reply_to.root_id or reply_to.message_id
            message.parent_id = reply_to.message_id
            message.thread_id = reply_to.thread_id
            if reply_in_thread and not message.thread_id:
                message.thread_id = f"omt_{uuid.uuid4().hex[:16]}"
                reply_to.thread_id = message.thread_id
        if msg_type == "interactive":
            parsed = _load_json(content)
            if isinstance(parsed, dict) and parsed.get("type") == "card":
                message.card_id = str((parsed.get("data") or {}).get("card_id"))
                self.cards[message.card_id].message_ids.append(message.message_id)
        self.messages[message.message_id] = message
        if uuid_:
            self._uuids[uuid_] = message.message_id
        return message

    def _ep_message_create(self, call: RestCall) -> _Reply:
        body = self._body(call)
        rid_type = call.query.get("receive_id_type")
        receive_id = body.get("receive_id")
        msg_type = str(body.get("msg_type") or "")
        if not rid_type or not receive_id or not msg_type:
            return _error(CODE_INVALID_PARAM, "field validation failed")
        uuid_ = body.get("uuid")
        if uuid_ and uuid_ in self._uuids:
            return _ok(self.messages[self._uuids[uuid_]].as_api_dict(self.app_id))
        invalid = self._validate_content(msg_type, body.get("content"))
        if invalid is not None:
            return invalid
        chat_id = str(receive_id) if rid_type == "chat_id" else self._p2p_chat_of(str(receive_id))
        message = self._new_bot_message(
            chat_id=chat_id,
            msg_type=msg_type,
            content=str(body["content"]),
            uuid_=uuid_,
            receive_id=str(receive_id),
            receive_id_type=rid_type,
        )
        return _ok(message.as_api_dict(self.app_id))

    def _p2p_chat_of(self, user_id: str) -> str:
        for message in reversed(list(self.messages.values())):
            if (
                message.sender_type == "user"
                and message.sender_id == user_id
                and (message.chat_type == "p2p")
            ):
                return message.chat_id
        return f"oc_p2p_{user_id}"

    def _target(self, message_id: str) -> FakeMessage:
        existing = self.messages.get(message_id)
        if existing is not None:
            return existing
        # Lenient: an unknown target is treated as a user message in an unknown chat.
        placeholder = FakeMessage(
            message_id=message_id,
            chat_id="oc_unknown",
            msg_type="text",
            content='{"text": ""}',
            sender_type="user",
            sender_id="",
            create_time=0,
        )
        self.messages[message_id] = placeholder
        return placeholder

    def _ep_message_reply(self, call: RestCall) -> _Reply:
        body = self._body(call)
        msg_type = str(body.get("msg_type") or "")
        if not msg_type:
            return _error(CODE_INVALID_PARAM, "field validation failed")
        target = self._target(call.path_params["message_id"])
        if target.deleted:
            return _sample_error("message_recalled")
        uuid_ = body.get("uuid")
        if uuid_ and uuid_ in self._uuids:
            return _ok(self.messages[self._uuids[uuid_]].as_api_dict(self.app_id))
        invalid = self._validate_content(msg_type, body.get("content"))
        if invalid is not None:
            return invalid
        in_thread = body.get("reply_in_thread")
        message = self._new_bot_message(
            chat_id=target.chat_id,
            msg_type=msg_type,
            content=str(body["content"]),
            uuid_=uuid_,
            reply_to=target,
            reply_in_thread=bool(in_thread) if in_thread is not None else None,
        )
        return _ok(message.as_api_dict(self.app_id))

    def _existing(self, call: RestCall) -> FakeMessage | _Reply:
        message = self.messages.get(call.path_params["message_id"])
        if message is None:
            return _error(CODE_INVALID_CONTENT, "message not found")
        if message.deleted:
            return _sample_error("message_recalled")
        return message

    def _ep_message_patch(self, call: RestCall) -> _Reply:
        message = self._existing(call)
        if isinstance(message, _Reply):
            return message
        content = self._body(call).get("content")
        invalid = self._validate_content("interactive", content)
        if invalid is not None:
            return invalid
        message.content = str(content)
        message.content_history.append(message.content)
        return _ok({})

    def _ep_message_update(self, call: RestCall) -> _Reply:
        message = self._existing(call)
        if isinstance(message, _Reply):
            return message
        body = self._body(call)
        msg_type = str(body.get("msg_type") or message.msg_type)
        invalid = self._validate_content(msg_type, body.get("content"))
        if invalid is not None:
            return invalid
        message.msg_type = msg_type
        message.content = str(body["content"])
        message.content_history.append(message.content)
        return _ok(message.as_api_dict(self.app_id))

    def _ep_message_delete(self, call: RestCall) -> _Reply:
        message = self._existing(call)
        if isinstance(message, _Reply):
            return message
        message.deleted = True
        return _ok({})

    def _read_item(self, message: FakeMessage, call: RestCall) -> JSONDict:
        """``message`` as GET/list answer it: interactive content is not returned as sent."""
        item = message.as_api_dict(self.app_id)
        if message.msg_type != "interactive":
            return item
        card = self.cards.get(message.card_id) if message.card_id is not None else None
        spec = card.spec if card is not None else _load_json(message.content)
        if not isinstance(spec, dict):
            return item
        if call.query.get("card_msg_content_type") == "user_card_content":
            item["body"]["content"] = json.dumps(spec, ensure_ascii=False)
        else:
            lines = card.visible_lines if card is not None else _card_json_lines(spec)
            item["body"]["content"] = _flattened_card_content(
                spec, lines, degrade=self.degrade_v2_cards
            )
        return item

    def _ep_message_get(self, call: RestCall) -> _Reply:
        message = self.messages.get(call.path_params["message_id"])
        if message is None:
            # What Feishu answers for a recalled message; see the module docstring.
            return _sample_error("message_recalled")
        return _ok({"items": [self._read_item(message, call)]})

    def _ep_message_list(self, call: RestCall) -> _Reply:
        chat_id = call.query.get("container_id", "")
        items = [self._read_item(m, call) for m in self.messages.values() if m.chat_id == chat_id]
        return _ok({"items": items, "has_more": False, "page_token": ""})

    def _ep_message_forward(self, call: RestCall) -> _Reply:
        source = self._existing(call)
        if isinstance(source, _Reply):
            return source
        receive_id = str(self._body(call).get("receive_id") or "")
        message = self._new_bot_message(
            chat_id=receive_id,
            msg_type=source.msg_type,
            content=source.content,
            uuid_=None,
            receive_id=receive_id,
            receive_id_type=call.query.get("receive_id_type"),
        )
        return _ok(message.as_api_dict(self.app_id))

    def _resource_reply(self, key: str, kind: str) -> _Reply:
        data, content_type = self.resources.get(
            key, (f"fake {kind} {key}".encode(), "application/octet-stream")
        )
        return _Reply(
            raw=data,
            content_type=content_type,
            headers={"Content-Disposition": f'attachment; filename="{key}.bin"'},
        )

    def _scope_denied(self, scope: str) -> _Reply | None:
        """Feishu's answer when the app has asked for ``scope`` but it is not granted."""
        if self.scopes.get(scope) != NOT_GRANTED:
            return None
        link = (
            f"https://open.feishu.cn/app/{self.app_id}/auth?q={scope}"
            "&op_from=openapi&token_type=tenant"
        )
        msg = (
            f"Access denied. One of the following scopes is required: [{scope}]."
            f"应用尚未开通所需的应用身份权限：[{scope}]，点击链接申请并开通任一权限即可：{link}"
        )
        return _error(CODE_SCOPE_MISSING, msg)

    def _ep_message_resource(self, call: RestCall) -> _Reply:
        denied = self._scope_denied(SCOPE_IM_RESOURCE)
        if denied is not None:
            return denied
        kind = call.query.get("type")
        if kind not in ("image", "file"):
            return _field_error("type", "type must be one of image, file", kind)
        key = call.path_params["file_key"]
        if key not in self.resources and self.strict_resources:
            return _error(CODE_FILE_NOT_IN_MESSAGE, "File not in msg.")
        expected = self.resource_kinds.get(key)
        if expected is not None and expected != kind:
            return _error(CODE_RESOURCE_INVALID_PARAM, "Invalid request param.")
        return self._resource_reply(key, kind)

    def _ep_image_get(self, call: RestCall) -> _Reply:
        return self._scope_denied(SCOPE_IM_RESOURCE) or self._resource_reply(
            call.path_params["image_key"], "image"
        )

    def _ep_file_get(self, call: RestCall) -> _Reply:
        return self._scope_denied(SCOPE_IM_RESOURCE) or self._resource_reply(
            call.path_params["file_key"], "file"
        )

    def _ep_image_upload(self, call: RestCall) -> _Reply:
        denied = self._scope_denied(SCOPE_IM_RESOURCE)
        if denied is not None:
            return denied
        body = self._body(call)
        image_type = body.get("image_type")
        if image_type not in ("message", "avatar"):
            return _field_error(
                "image_type", "image_type must be one of message, avatar", image_type
            )
        part = call.files.get("image")
        if part is None:
            return _field_error("image", "image is required")
        if part.size == 0:
            return _error(CODE_IMAGE_EMPTY, "File's size can't be 0.")
        if part.size > MAX_IMAGE_BYTES:
            return _error(CODE_IMAGE_TOO_LARGE, "The file size exceed the limit.")
        sniffed = _sniff_image(part.data)
        if sniffed is None:
            return _error(CODE_IMAGE_TYPE_UNSUPPORTED, "Can't recognize the image format.")
        generic = part.content_type in (None, "", "application/octet-stream")
        content_type = sniffed if generic else str(part.content_type)
        key = f"img_v3_{uuid.uuid4().hex[:20]}"
        self.resources[key] = (part.data, content_type)
        self.resource_kinds[key] = "image"
        self._uploaded_images.append(
            UploadedImage(
                image_key=key,
                data=part.data,
                image_type=str(image_type),
                content_type=content_type,
                filename=part.filename,
                call_seq=call.seq,
            )
        )
        return _ok({"image_key": key})

    def _ep_file_upload(self, call: RestCall) -> _Reply:
        denied = self._scope_denied(SCOPE_IM_RESOURCE)
        if denied is not None:
            return denied
        key = f"file_v3_{uuid.uuid4().hex[:20]}"
        part = call.files.get("file")
        if part is None:
            self.resources[key] = (b"uploaded", "application/octet-stream")
        else:
            self.resources[key] = (part.data, part.content_type or "application/octet-stream")
        self.resource_kinds[key] = "file"
        return _ok({"file_key": key})

    # -- speech to text ----------------------------------------------------------------------

    def _ep_speech_file_recognize(self, call: RestCall) -> _Reply:
        denied = self._scope_denied(SCOPE_SPEECH)
        if denied is not None:
            return denied
        body = self._body(call)
        speech = body.get("speech")
        encoded = speech.get("speech") if isinstance(speech, dict) else None
        if not isinstance(encoded, str) or not encoded:
            return _field_error("speech.speech", "speech is required")
        try:
            pcm = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return _field_error("speech.speech", "speech must be base64 encoded")
        config = body.get("config")
        config = config if isinstance(config, dict) else {}
        request = SpeechRequest(
            file_id=config.get("file_id"),
            format=config.get("format"),
            engine_type=config.get("engine_type"),
            pcm=pcm,
            call_seq=call.seq,
        )
        self.speech_requests.append(request)
        reply = self._recognize(request)
        request.code = int((reply.body or {}).get("code", -1))
        return reply

    def _recognize(self, request: SpeechRequest) -> _Reply:
        if not isinstance(request.file_id, str) or not _FILE_ID.match(request.file_id):
            return _field_error(
                "config.file_id",
                "file_id must be 16 letters, digits or underscores",
                request.file_id,
            )
        if request.format != "pcm":
            return _field_error("config.format", "format must be pcm", request.format)
        if request.engine_type != "16k_auto":
            return _field_error(
                "config.engine_type", "engine_type must be 16k_auto", request.engine_type
            )
        if request.byte_count > MAX_SPEECH_SECONDS * SPEECH_BYTES_PER_SECOND:
            return _error(CODE_SPEECH_TOO_LONG, f"audio duration exceeds {MAX_SPEECH_SECONDS}s")
        text = self.speech_text
        recognized = text if isinstance(text, str) else text(request)
        return _ok({"recognition_text": recognized})

    def _ep_reaction_create(self, call: RestCall) -> _Reply:
        message = self._target(call.path_params["message_id"])
        emoji = str(((self._body(call).get("reaction_type") or {}).get("emoji_type")) or "")
        reaction_id = self._new_id("rc_")
        message.reactions[reaction_id] = emoji
        return _ok(
            {
                "reaction_id": reaction_id,
                "operator": {"operator_id": self.app_id, "operator_type": "app"},
                "action_time": str(int(time.time() * 1000)),
                "reaction_type": {"emoji_type": emoji},
            }
        )

    def _ep_reaction_delete(self, call: RestCall) -> _Reply:
        message = self._target(call.path_params["message_id"])
        emoji = message.reactions.pop(call.path_params["reaction_id"], "")
        return _ok(
            {"reaction_id": call.path_params["reaction_id"], "reaction_type": {"emoji_type": emoji}}
        )

    def _ep_chat_get(self, call: RestCall) -> _Reply:
        chat_id = call.path_params["chat_id"]
        return _ok(
            {
                "name": f"Chat {chat_id}",
                "description": "",
                "chat_mode": "group",
                "chat_type": "private",
                "owner_id": SAMPLE_SENDER_OPEN_ID,
                "user_count": "3",
                "bot_count": "1",
            }
        )

    # -- CardKit -----------------------------------------------------------------------------

    def _parse_card_json(self, data: Any) -> JSONDict | _Reply:
        if not isinstance(data, str):
            return _error(CODE_INVALID_PARAM, "card data must be a JSON string")
        if self._over_card_limit(data):
            return _sample_error("card_too_large")
        parsed = _load_json(data)
        if not isinstance(parsed, dict):
            return _error(CODE_CARD_CONTENT_FAILED, "failed to create card content")
        return parsed

    @staticmethod
    def _index_elements(spec: JSONDict) -> tuple[dict[str, JSONDict], list[str]]:
        elements: dict[str, JSONDict] = {}
        order: list[str] = []
        for element in _walk_elements(spec):
            element_id = element.get("element_id")
            if isinstance(element_id, str) and element_id:
                elements[element_id] = element
                order.append(element_id)
        return elements, order

    def _ep_card_create(self, call: RestCall) -> _Reply:
        body = self._body(call)
        if body.get("type") != "card_json":
            return _error(CODE_INVALID_PARAM, "only type=card_json is supported by the fake")
        spec = self._parse_card_json(body.get("data"))
        if isinstance(spec, _Reply):
            return spec
        elements, order = self._index_elements(spec)
        config = spec.get("config") or {}
        card = FakeCard(
            card_id=str(next(self._card_ids)),
            spec=spec,
            initial_spec=copy.deepcopy(spec),
            elements=elements,
            element_order=order,
            streaming_mode=bool(config.get("streaming_mode", False)),
            created=time.monotonic(),
        )
        self.cards[card.card_id] = card
        return _ok({"card_id": card.card_id}, msg="")

    def _sequenced(self, call: RestCall) -> tuple[FakeCard, int | None] | _Reply:
        card = self.cards.get(call.path_params["card_id"])
        if card is None:
            return _error(CODE_CARD_NOT_FOUND, "card not found")
        sequence = self._body(call).get("sequence")
        if sequence is not None and (not isinstance(sequence, int) or sequence <= card.sequence):
            return _sample_error("card_sequence_not_increasing")
        return card, sequence

    def _accept(
        self,
        card: FakeCard,
        sequence: int | None,
        kind: str,
        element_id: str | None,
        content: Any,
    ) -> _Reply:
        if sequence is not None:
            card.sequence = sequence
        card.updates.append(CardUpdate(kind, sequence, element_id, content, time.monotonic()))
        return _ok({}, msg="")

    def _ep_card_element_content(self, call: RestCall) -> _Reply:
        checked = self._sequenced(call)
        if isinstance(checked, _Reply):
            return checked
        card, sequence = checked
        element_id = call.path_params["element_id"]
        element = card.elements.get(element_id)
        if element is None:
            return _error(CODE_ELEMENT_NOT_FOUND, f"element {element_id!r} not found")
        if self.enforce_streaming_mode and not card.streaming_mode:
            return _error(CODE_STREAMING_CLOSED, "card streaming mode is closed")
        content = self._body(call).get("content")
        if not isinstance(content, str):
            return _error(CODE_INVALID_PARAM, "content must be a string")
        if self._over_card_limit(content):
            return _sample_error("card_too_large")
        element["content"] = content
        return self._accept(card, sequence, "content", element_id, content)

    def _ep_card_settings(self, call: RestCall) -> _Reply:
        checked = self._sequenced(call)
        if isinstance(checked, _Reply):
            return checked
        card, sequence = checked
        settings = _load_json(self._body(call).get("settings"))
        if not isinstance(settings, dict):
            return _error(CODE_INVALID_PARAM, "settings must be a JSON object string")
        card.apply_settings(settings)
        return self._accept(card, sequence, "settings", None, settings)

    def _ep_card_update(self, call: RestCall) -> _Reply:
        checked = self._sequenced(call)
        if isinstance(checked, _Reply):
            return checked
        card, sequence = checked
        spec = self._parse_card_json((self._body(call).get("card") or {}).get("data"))
        if isinstance(spec, _Reply):
            return spec
        card.spec = spec
        card.elements, card.element_order = self._index_elements(spec)
        card.streaming_mode = bool((spec.get("config") or {}).get("streaming_mode", False))
        return self._accept(card, sequence, "update", None, spec)

    def _ep_card_batch_update(self, call: RestCall) -> _Reply:
        """CardKit's batch update: ``actions`` (a JSON array in a string) applied in order as
        one sequenced operation, all or nothing. Modelled: ``partial_update_setting``,
        ``partial_update_element``, ``update_element`` and ``delete_elements``; any other
        action, or a malformed one, refuses the whole batch (invalid parameter)."""
        checked = self._sequenced(call)
        if isinstance(checked, _Reply):
            return checked
        card, sequence = checked
        actions = _load_json(self._body(call).get("actions"))
        if not isinstance(actions, list) or not actions:
            return _error(CODE_INVALID_PARAM, "actions must be a non-empty JSON array string")
        planned: list[tuple[str, str | None, Any]] = []
        for action in actions:
            step = self._batch_step(card, action)
            if isinstance(step, _Reply):
                return step
            planned.append(step)
        now = time.monotonic()
        for index, (kind, element_id, value) in enumerate(planned):
            if kind == "settings":
                card.apply_settings(value)
            elif kind == "element_delete":
                for each in value:
                    card.elements.pop(each, None)
                    if each in card.element_order:
                        card.element_order.remove(each)
            elif kind == "element_update":
                card.elements[str(element_id)] = value
            else:  # "content" / "element_patch": a partial update of one element
                card.elements[str(element_id)].update(value)
                value = value["content"] if kind == "content" else value
            # One operation, one sequence: it is recorded on the batch's first action.
            card.updates.append(
                CardUpdate(kind, sequence if index == 0 else None, element_id, value, now, True)
            )
        if sequence is not None:
            card.sequence = sequence
        return _ok({}, msg="")

    def _batch_step(self, card: FakeCard, action: Any) -> tuple[str, str | None, Any] | _Reply:
        """One batch action checked against ``card``: ``(kind, element id, value)``."""
        if not isinstance(action, dict) or not isinstance(action.get("params"), dict):
            return _error(CODE_INVALID_PARAM, "each action needs an action name and params")
        name, params = action.get("action"), action["params"]
        if name == "partial_update_setting":
            settings = params.get("settings")
            if not isinstance(settings, dict):
                return _error(CODE_INVALID_PARAM, "settings must be an object")
            return "settings", None, settings
        if name == "delete_elements":
            ids = params.get("element_ids")
            if not isinstance(ids, list) or any(i not in card.elements for i in ids):
                return _error(CODE_ELEMENT_NOT_FOUND, "element not found")
            return "element_delete", None, list(ids)
        if name not in ("partial_update_element", "update_element"):
            return _error(CODE_INVALID_PARAM, f"unsupported action {name!r}")
        element_id = params.get("element_id")
        if not isinstance(element_id, str) or element_id not in card.elements:
            return _error(CODE_ELEMENT_NOT_FOUND, f"element {element_id!r} not found")
        if name == "update_element":
            element = params.get("element")
            if not isinstance(element, dict):
                return _error(CODE_INVALID_PARAM, "element must be an object")
            return "element_update", element_id, element
        partial = params.get("partial_element")
        if not isinstance(partial, dict):
            return _error(CODE_INVALID_PARAM, "partial_element must be an object")
        content = partial.get("content")
        if content is None:
            return "element_patch", element_id, partial
        if not isinstance(content, str):
            return _error(CODE_INVALID_PARAM, "content must be a string")
        if self._over_card_limit(content):
            return _sample_error("card_too_large")
        return "content", element_id, partial

    def _ep_card_element_create(self, call: RestCall) -> _Reply:
        checked = self._sequenced(call)
        if isinstance(checked, _Reply):
            return checked
        card, sequence = checked
        new = _load_json(self._body(call).get("elements"))
        for element in _walk_elements(new):
            element_id = element.get("element_id")
            if isinstance(element_id, str) and element_id:
                card.elements[element_id] = element
                card.element_order.append(element_id)
        return self._accept(card, sequence, "element_create", None, new)

    def _ep_card_element_update(self, call: RestCall) -> _Reply:
        checked = self._sequenced(call)
        if isinstance(checked, _Reply):
            return checked
        card, sequence = checked
        element_id = call.path_params["element_id"]
        if element_id not in card.elements:
            return _error(CODE_ELEMENT_NOT_FOUND, f"element {element_id!r} not found")
        new = _load_json(self._body(call).get("element"))
        if isinstance(new, dict):
            card.elements[element_id] = new
        return self._accept(card, sequence, "element_update", element_id, new)

    def _ep_card_element_patch(self, call: RestCall) -> _Reply:
        checked = self._sequenced(call)
        if isinstance(checked, _Reply):
            return checked
        card, sequence = checked
        element_id = call.path_params["element_id"]
        if element_id not in card.elements:
            return _error(CODE_ELEMENT_NOT_FOUND, f"element {element_id!r} not found")
        partial = _load_json(self._body(call).get("partial_element"))
        if isinstance(partial, dict):
            card.elements[element_id].update(partial)
        return self._accept(card, sequence, "element_patch", element_id, partial)

    def _ep_card_element_delete(self, call: RestCall) -> _Reply:
        checked = self._sequenced(call)
        if isinstance(checked, _Reply):
            return checked
        card, sequence = checked
        element_id = call.path_params["element_id"]
        if card.elements.pop(element_id, None) is None:
            return _error(CODE_ELEMENT_NOT_FOUND, f"element {element_id!r} not found")
        card.element_order.remove(element_id)
        return self._accept(card, sequence, "element_delete", element_id, None)


# --------------------------------------------------------------------------------------------
# Background-thread runner
# --------------------------------------------------------------------------------------------


class FakeFeishuThread(ServerThread[FakeFeishu]):
    """Runs a :class:`FakeFeishu` on a private event loop in a daemon thread.

    For tests where the bot runs in a subprocess (or the SDK is called synchronously)::

        with FakeFeishuThread() as server:
            env["FEISHU_DOMAIN"] = server.domain
            ...
            frame_id = server.deliver("p2p_text", text="hi")
            server.fake.wait_for_ack_blocking(frame_id)

    The loop-bound controls are exposed as blocking methods here (:meth:`deliver`,
    :meth:`drop_connections`, :meth:`call`); everything else is on :attr:`fake` and is
    thread-safe (use its ``*_blocking`` waits from the test thread).
    """

    def __init__(self, fake: FakeFeishu | None = None, *, start_timeout: float = 10.0) -> None:
        super().__init__(fake if fake is not None else FakeFeishu(), start_timeout=start_timeout)

    @property
    def domain(self) -> str:
        """``http://127.0.0.1:PORT`` of the running fake."""
        return self.fake.domain

    def deliver(self, event: JSONDict | str = "p2p_text", **kwargs: Any) -> str:
        """Blocking :meth:`FakeFeishu.deliver`; returns the frame message id."""
        return self.fake.deliver_blocking(event, **kwargs)

    def drop_connections(self, *, graceful: bool = False) -> int:
        """Blocking :meth:`FakeFeishu.drop_connections`."""
        return self.fake.drop_connections_blocking(graceful=graceful)
