"""The text of a message a user replied to (quoted), for the model to read as context.

The bot's own answers are found in the store (every delivered answer is recorded with the ids
of the messages that carry it), so quoting one costs no API call. Anything else is fetched with
``GET im/v1/messages/:id`` (scope ``im:message`` or ``im:message:readonly``) and its text taken
from the content: a text message, a post (rich text), or a card's visible text. Images, files
and stickers have no text ("").
"""

from __future__ import annotations

import json
from typing import Any

from bot.chat.service import QuoteUnavailable
from bot.feishu.api import FeishuApi, FeishuApiError
from bot.logging import get_logger
from bot.store import Store

log = get_logger(__name__)

#: card JSON keys whose string values a reader sees
_CARD_TEXT_KEYS = frozenset({"text", "content", "title"})


class FeishuQuotes:
    """Reads quoted messages: the bot's own from the store, others through the message API."""

    def __init__(self, api: FeishuApi, store: Store) -> None:
        self._api = api
        self._store = store

    async def quoted_text(self, message_id: str) -> str:
        """The quoted message's text, "" when it has none; :class:`QuoteUnavailable` when it
        cannot be read."""
        sent = await self._store.find_sent(message_id)
        if sent is not None:
            return sent.content
        try:
            item = await self._api.get_message(message_id)
        except FeishuApiError as exc:
            log.warning("quoted_message_unreadable", quoted=message_id, error=str(exc))
            if exc.missing_scope:
                reason = f"the bot lacks the Feishu permission {exc.missing_scope}"
            elif exc.code == 230011 or exc.status == 404:
                reason = "it was recalled or deleted"
            else:
                reason = "Feishu did not return it"
            raise QuoteUnavailable(
                f"(I could not read the message you replied to: {reason}. I answer without it.)"
            ) from None
        return message_text(item)


def message_text(item: dict[str, Any]) -> str:
    """The readable text of a message as the message API returns it."""
    body = item.get("body")
    raw = body.get("content") if isinstance(body, dict) else None
    try:
        content = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return ""
    msg_type = item.get("msg_type")
    if msg_type == "text" and isinstance(content, dict):
        text = str(content.get("text") or "")
        return _name_mentions(text, item.get("mentions"))
    if msg_type == "post" and isinstance(content, dict):
        return _post_text(content)
    if msg_type == "interactive":
        return "\n".join(_card_strings(content)).strip()
    return ""


def _name_mentions(text: str, mentions: Any) -> str:
    """``@_user_1`` placeholders replaced by the names they stand for."""
    for mention in mentions if isinstance(mentions, list) else []:
        if isinstance(mention, dict) and mention.get("key"):
            text = text.replace(str(mention["key"]), f"@{mention.get('name') or 'someone'}")
    return text


def _post_text(content: dict[str, Any]) -> str:
    """A post's title and paragraphs (text, links, @mentions, code), images left out."""
    if "content" not in content:  # a post keyed by language: take the first one
        content = next((v for v in content.values() if isinstance(v, dict)), {})
    lines = [str(content.get("title") or "")]
    for paragraph in content.get("content") or []:
        parts = []
        for element in paragraph if isinstance(paragraph, list) else []:
            if not isinstance(element, dict):
                continue
            tag = element.get("tag")
            if tag in ("text", "a", "code_block", "md"):
                parts.append(str(element.get("text") or ""))
            elif tag == "at":
                parts.append(f"@{element.get('user_name') or 'someone'}")
        lines.append("".join(parts))
    return "\n".join(line for line in lines if line).strip()


def _card_strings(node: Any) -> list[str]:
    """The visible strings of a card, in order."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _CARD_TEXT_KEYS and isinstance(value, str):
                if value.strip():
                    found.append(value)
            else:
                found += _card_strings(value)
    elif isinstance(node, list):
        for value in node:
            found += _card_strings(value)
    return found
