"""Feishu messages as the bot sees them: the channel's ``InboundMessage`` mapped once, here.

Nothing deeper touches the SDK's types. The mapping decides the conversation (p2p: the user;
group: the thread), strips the bot's @mention from the text, and tells text from what the bot
cannot read yet.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

MessageKind = Literal["text", "unsupported"]

#: Message types whose text the bot reads; everything else gets a polite "text only" reply.
READABLE_TYPES = frozenset({"text", "post"})

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


@dataclass(frozen=True)
class FeishuMessage:
    """An inbound Feishu message, reduced to what the bot needs. Serialisable for the inbox."""

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

    def describe_type(self) -> str:
        """``an image``, ``a file``… for the "text only" reply."""
        return _TYPE_NAMES.get(self.message_type, f"a {self.message_type} message")

    def to_json(self) -> str:
        """The inbox payload."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, payload: str) -> FeishuMessage:
        """Read an inbox payload back."""
        return cls(**json.loads(payload))


def conversation_key(
    chat_type: str, chat_id: str, sender: str, root_id: str, message_id: str
) -> str:
    """p2p: one conversation per user; group: one per thread (its root, or this message)."""
    if chat_type == "p2p":
        return f"p2p:{sender}"
    return f"group:{chat_id}:{root_id or message_id}"


def from_inbound(inbound: Any, bot_open_id: str | None) -> FeishuMessage:
    """Map the channel's ``InboundMessage`` (duck-typed) to a :class:`FeishuMessage`."""
    raw: dict[str, Any] = getattr(inbound, "raw", None) or {}
    message_type = str(getattr(inbound, "raw_content_type", "") or raw.get("message_type") or "")
    chat_type = str(inbound.conversation.chat_type or raw.get("chat_type") or "p2p")
    root_id = str(raw.get("root_id") or "")
    sender = str(inbound.sender.open_id or "")
    kind: MessageKind = "text" if message_type in READABLE_TYPES else "unsupported"
    text = _text_of(inbound) if kind == "text" else ""
    return FeishuMessage(
        message_id=str(inbound.id),
        chat_id=str(inbound.conversation.chat_id),
        chat_type=chat_type,
        sender_open_id=sender,
        conversation_id=conversation_key(
            chat_type, str(inbound.conversation.chat_id), sender, root_id, str(inbound.id)
        ),
        kind=kind,
        message_type=message_type,
        text=strip_bot_mention(text, getattr(inbound, "mentions", []), bot_open_id),
        create_time_ms=int(getattr(inbound, "create_time", 0) or 0),
        in_group=chat_type != "p2p",
    )


def _text_of(inbound: Any) -> str:
    text = str(getattr(inbound, "content_text", "") or "")
    if not text:
        # Merged bursts (TextBatchConfig) leave content_text empty and keep content.text.
        text = str(getattr(getattr(inbound, "content", None), "text", "") or "")
    return text


def strip_bot_mention(text: str, mentions: Any, bot_open_id: str | None) -> str:
    """Remove the bot's @mention in every form the channel renders it (``@Name``, ``@_user_1``)."""
    for mention in mentions or []:
        if not bot_open_id or getattr(mention, "open_id", None) != bot_open_id:
            continue
        for form in (f"@{mention.name}" if mention.name else None, mention.key):
            if form:
                text = text.replace(form + " ", "").replace(form, "")
    return text.strip()
