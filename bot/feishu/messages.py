"""Feishu messages as the bot sees them: the channel's ``InboundMessage`` mapped once, here.

Nothing deeper touches the SDK's types. The mapping decides the conversation (p2p: the user;
group: the thread), strips the bot's @mention from the text, and tells text, voice messages,
images and files (carried as :class:`bot.chat.media.MediaRef` resource keys, read later by
the service) from what the bot cannot read. A post keeps its text and its images: the image
and video markup the SDK renders into its text (``![image](img_…)``, ``[media:file_…]``)
would mean nothing to the model, so it is dropped and the images travel as media; a post of
images only is an image message, one of videos only is not read.

What the channel hands over is not trusted to be well formed: every field is read defensively
and every string is made valid Unicode (a lone surrogate, which JSON's ``"\\ud800"`` decodes to,
becomes U+FFFD), so a :class:`FeishuMessage` always serialises. Reading an inbox payload back
raises :class:`InboxPayloadError` and nothing else for anything unreadable.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

from bot.chat.media import MediaRef

MessageKind = Literal["text", "voice", "image", "file", "unsupported"]

#: Message types whose text the bot reads; the media types below are read by the service.
READABLE_TYPES = frozenset({"text", "post"})
#: Feishu message types the bot understands beyond text, and what it calls them
_MEDIA_TYPES: dict[str, MessageKind] = {"audio": "voice", "image": "image", "file": "file"}
_KINDS = ("text", "voice", "image", "file", "unsupported")

_TYPE_NAMES = {
    "image": "an image",
    "file": "a file",
    "audio": "a voice message",
    "media": "a video",
    "video": "a video",
    "sticker": "a sticker",
    "merge_forward": "forwarded messages",
    "share_chat": "a shared chat",
    "share_user": "a contact card",
    "interactive": "a card",
    "location": "a location",
}

#: What the SDK's post converter writes for an ``img`` element: ``![image](img_…)`` (or ``![]``).
_POST_IMAGE = re.compile(r"(?:\n\n)?!\[(?:image)?\]\((?P<key>[^()\s]*)\)")
#: ... and for a ``media`` (video) element: ``[media:file_…]``.
_POST_VIDEO = re.compile(r"(?:\n\n)?\[media:(?P<key>[^\]\s]*)\]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class InboxPayloadError(ValueError):
    """An inbox payload that cannot be read back as a :class:`FeishuMessage`; says why."""


@dataclass(frozen=True)
class FeishuMessage:
    """An inbound Feishu message, reduced to what the bot needs. Serialisable for the inbox.

    Every string field holds valid Unicode (lone surrogates are replaced on construction).
    """

    message_id: str
    chat_id: str
    chat_type: str
    sender_open_id: str
    conversation_id: str
    kind: MessageKind
    message_type: str
    text: str
    create_time_ms: int
    in_group: bool
    #: the type the "text only" reply names when it is not ``message_type`` ("image" for a post
    #: holding only images)
    describe_as: str = ""
    #: the sender's tenant-scoped user_id, when the app may read it (access lists may name it)
    sender_user_id: str = ""
    #: the message this one replies to (quotes), and the root of its reply chain or thread
    parent_id: str = ""
    root_id: str = ""
    #: the voice message, images or file it carries (a post may hold text and images)
    media: tuple[MediaRef, ...] = ()

    @property
    def sender_ids(self) -> tuple[str, ...]:
        """Every id of the sender that an access list may name."""
        return tuple(each for each in (self.sender_open_id, self.sender_user_id) if each)

    @property
    def quotes_thread_root(self) -> bool:
        """Whether the quoted message is the root of this group conversation (its thread), whose
        text the conversation's history already starts with."""
        return self.in_group and bool(self.parent_id) and self.parent_id == self.root_id

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str) and _SURROGATE.search(value):
                object.__setattr__(self, field.name, _valid_unicode(value))

    def describe_type(self) -> str:
        """``an image``, ``a file``… for the "text only" reply."""
        name = self.describe_as or self.message_type
        if not name:
            return "this kind of message"
        return _TYPE_NAMES.get(name, f"a {name} message")

    def to_json(self) -> str:
        """The inbox payload (always encodable as UTF-8)."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, payload: str) -> FeishuMessage:
        """Read an inbox payload back; unknown fields are ignored, optional ones defaulted.

        Raises:
            InboxPayloadError: the payload is not JSON, not an object, or a required field is
                missing or of the wrong type.
        """
        try:
            data = json.loads(payload)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InboxPayloadError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InboxPayloadError(f"not a JSON object but {_json_type(data)}")
        kind = _field(data, "kind", str)
        if kind not in _KINDS:
            raise InboxPayloadError(f"kind: expected one of {', '.join(_KINDS)}, got {kind[:40]!r}")
        media = _field(data, "media", list, default=[])
        conversation_id = _field(data, "conversation_id", str)
        chat_type = _field(data, "chat_type", str, default="")
        if not chat_type:
            chat_type = "p2p" if conversation_id.startswith("p2p:") else "group"
        return cls(
            message_id=_field(data, "message_id", str),
            chat_id=_field(data, "chat_id", str),
            chat_type=chat_type,
            sender_open_id=_field(data, "sender_open_id", str),
            conversation_id=conversation_id,
            kind=kind,
            message_type=_field(data, "message_type", str, default=""),
            text=_field(data, "text", str),
            create_time_ms=_field(data, "create_time_ms", int, default=0),
            in_group=_field(data, "in_group", bool, default=chat_type != "p2p"),
            describe_as=_field(data, "describe_as", str, default=""),
            sender_user_id=_field(data, "sender_user_id", str, default=""),
            parent_id=_field(data, "parent_id", str, default=""),
            root_id=_field(data, "root_id", str, default=""),
            media=tuple(_media_from_json(item) for item in media),
        )


def _media_from_json(data: Any) -> MediaRef:
    """One media item of an inbox payload; raise :class:`InboxPayloadError`."""
    if not isinstance(data, dict):
        raise InboxPayloadError(f"media: expected an object, got {_json_type(data)}")
    kind = _field(data, "kind", str)
    if kind not in ("image", "file", "audio"):
        raise InboxPayloadError(f"media kind: unknown {kind[:40]!r}")
    return MediaRef(
        kind=kind,
        key=_field(data, "key", str),
        name=_field(data, "name", str, default=""),
        duration_ms=_field(data, "duration_ms", int, default=0),
    )


_MISSING: Any = object()


def _field(data: dict[str, Any], name: str, kind: type[Any], default: Any = _MISSING) -> Any:
    """``data[name]`` if it is a ``kind`` (a bool is no int here), else ``default`` or an error."""
    if name not in data or (data[name] is None and default is not _MISSING):
        if default is _MISSING:
            raise InboxPayloadError(f"{name}: missing")
        return default
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}[kind]
        raise InboxPayloadError(f"{name}: expected {expected}, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _valid_unicode(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (a split pair is joined again)."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def conversation_key(
    chat_type: str, chat_id: str, sender: str, root_id: str, message_id: str
) -> str:
    """p2p: one conversation per user; group: one per thread (its root, or this message)."""
    if chat_type == "p2p":
        return f"p2p:{sender}"
    return f"group:{chat_id}:{root_id or message_id}"


def from_inbound(inbound: Any, bot_open_id: str | None) -> FeishuMessage:
    """Map the channel's ``InboundMessage`` (duck-typed) to a :class:`FeishuMessage`.

    Never raises for what the channel can produce, however malformed the event was.
    """
    raw = getattr(inbound, "raw", None)
    raw = raw if isinstance(raw, dict) else {}
    conversation = getattr(inbound, "conversation", None)
    message_id = _str(getattr(inbound, "id", ""))
    chat_id = _str(getattr(conversation, "chat_id", ""))
    message_type = _str(getattr(inbound, "raw_content_type", "") or raw.get("message_type"))
    chat_type = _str(getattr(conversation, "chat_type", "") or raw.get("chat_type")) or "p2p"
    identity = getattr(inbound, "sender", None)
    sender = _str(getattr(identity, "open_id", ""))
    kind: MessageKind = "text" if message_type in READABLE_TYPES else "unsupported"
    text, held = "", ""
    media: tuple[MediaRef, ...] = ()
    if kind == "text":
        text, held = _readable_text(inbound, message_type)
        text = strip_bot_mention(text, getattr(inbound, "mentions", None), bot_open_id)
        if held == "image":
            media = _media_of(inbound, message_type)
        if not text and held:
            # A post of images only is answered like an image; of videos, like a video.
            kind = "image" if media else "unsupported"
    elif message_type in _MEDIA_TYPES:
        media = _media_of(inbound, message_type)
        kind = _MEDIA_TYPES[message_type] if media else "unsupported"
    return FeishuMessage(
        message_id=message_id,
        chat_id=chat_id,
        chat_type=chat_type,
        sender_open_id=sender,
        conversation_id=conversation_key(
            chat_type, chat_id, sender, _str(raw.get("root_id")), message_id
        ),
        kind=kind,
        message_type=message_type,
        text=text,
        create_time_ms=_int(getattr(inbound, "create_time", 0)),
        in_group=chat_type != "p2p",
        describe_as=held if kind == "unsupported" else "",
        sender_user_id=_str(getattr(identity, "user_id", "")),
        parent_id=_str(raw.get("parent_id")),
        root_id=_str(raw.get("root_id")),
        media=media,
    )


_MEDIA_KEY: Final = re.compile(r"[A-Za-z0-9_-]{1,256}")
"""What Feishu's image and file keys are made of; a key is also a URL path segment."""


def _media_of(inbound: Any, message_type: str) -> tuple[MediaRef, ...]:
    """What the channel's resource descriptors say the message carries: a post's images, an
    image, a file or a voice message (never stickers or videos); each key once."""
    wanted = {"post": "image", "image": "image", "file": "file", "audio": "audio"}[message_type]
    items: dict[str, MediaRef] = {}
    for resource in _list(getattr(inbound, "resources", None)):
        key = _str(getattr(resource, "file_key", ""))
        if _str(getattr(resource, "type", "")) != wanted or key in items:
            continue
        if not _MEDIA_KEY.fullmatch(key):
            continue  # not a key Feishu issued (the SDK stringifies whatever the content held)
        items[key] = MediaRef(
            kind=wanted,  # type: ignore[arg-type]
            key=key,
            name=_str(getattr(resource, "file_name", "")),
            duration_ms=max(0, _int(getattr(resource, "duration_ms", 0))),
        )
    return tuple(items.values())


def _readable_text(inbound: Any, message_type: str) -> tuple[str, str]:
    """The message's text, and for a post what media it held besides ("image", "media", "")."""
    text = _str(getattr(inbound, "content_text", ""))
    if not text:
        # Merged bursts (TextBatchConfig) leave content_text empty and keep content.text.
        text = _str(getattr(getattr(inbound, "content", None), "text", ""))
    if message_type != "post":
        return text, ""
    keys = {
        _str(getattr(resource, "file_key", ""))
        for resource in _list(getattr(inbound, "resources", None))
    }
    found: set[str] = set()

    def drop(media: str) -> Callable[[re.Match[str]], str]:
        def replace(match: re.Match[str]) -> str:
            key = match["key"]
            if key and key not in keys and not key.startswith(("img_", "file_")):
                return match[0]  # not what the converter wrote for this post: the user's text
            found.add(media)
            return ""

        return replace

    text = _POST_IMAGE.sub(drop("image"), text)
    text = _POST_VIDEO.sub(drop("media"), text)
    return text.strip(), "image" if "image" in found else ("media" if found else "")


def strip_bot_mention(text: str, mentions: Any, bot_open_id: str | None) -> str:
    """Remove the bot's @mention in every form the channel renders it (``@Name``, ``@_user_1``)."""
    for mention in _list(mentions):
        if not bot_open_id or getattr(mention, "open_id", None) != bot_open_id:
            continue
        name = _str(getattr(mention, "name", ""))
        for form in (f"@{name}" if name else "", _str(getattr(mention, "key", ""))):
            if form:
                text = text.replace(form + " ", "").replace(form, "")
    return text.strip()


def _str(value: Any) -> str:
    """A field the SDK types as ``str`` but copies from the event unchecked."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except ValueError:  # an int too long to print
        return ""


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return 0
    return 0


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []
