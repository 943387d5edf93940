"""Welcoming people: a user opening the private chat for the first time, a group adding the bot.

Feishu sends ``im.chat.access_event.bot_p2p_chat_entered_v1`` every time a user opens the chat
with the bot, so who was welcomed is remembered in the store (an atomic mark that lives for
years, shared by every instance); ``im.chat.member.bot.added_v1`` comes once per addition, and
a group is welcomed once too. The welcome is marked before it is sent: if Feishu refuses it
after the retries, it is not tried again (a missed greeting, logged; never a repeated one).
People not allowed to use the bot (``access.allow``) are not welcomed.
"""

from __future__ import annotations

import hashlib

from bot.chat.access import AccessControl
from bot.feishu.api import FeishuApi, FeishuApiError
from bot.logging import get_logger
from bot.store import Store

log = get_logger(__name__)

#: how long "already welcomed" is remembered
WELCOMED_TTL_S = 50 * 365 * 24 * 3600

_COMMANDS = (
    "/help lists everything; /reset starts afresh; /role picks a persona (engineer, teacher, "
    "translator…); /model picks a model; /usage shows what you used."
)
_DONATE = (
    "Have an OpenAI-compatible API key to share? Send it to me in a private chat: I check it, "
    "use it fairly for everyone's questions and never show it."
)


def welcome_text(*, in_group: bool, donations: bool) -> str:
    """What the bot says when it meets a user or a group."""
    if in_group:
        lines = [
            "Hello everyone! I am a ChatGPT-style assistant. @mention me with a question and I "
            "answer in a thread; reply in that thread to keep talking.",
        ]
    else:
        lines = [
            "Hello! I am a ChatGPT-style assistant: write to me and I answer, remembering our "
            "conversation. Reply to (quote) a message to ask me about it.",
        ]
    lines.append(_COMMANDS)
    if donations:
        lines.append(_DONATE)
    return "\n\n".join(lines)


class Welcomer:
    """Sends each user and each group the welcome, once."""

    def __init__(
        self, api: FeishuApi, store: Store, access: AccessControl, *, donations: bool
    ) -> None:
        self._api = api
        self._store = store
        self._access = access
        self._donations = donations

    async def user_entered(self, chat_id: str, open_id: str) -> None:
        """A user opened the private chat with the bot."""
        if not chat_id or not open_id or not self._access.allows([open_id], chat_id):
            return
        await self._welcome(f"welcomed:user:{open_id}", chat_id, in_group=False)

    async def bot_added(self, chat_id: str, operator_open_id: str) -> None:
        """Someone added the bot to a group."""
        ids = [operator_open_id] if operator_open_id else []
        if not chat_id or not self._access.allows(ids, chat_id):
            return
        await self._welcome(f"welcomed:chat:{chat_id}", chat_id, in_group=True)

    async def _welcome(self, mark: str, chat_id: str, *, in_group: bool) -> None:
        try:
            if not await self._store.mark_seen(mark, WELCOMED_TTL_S):
                return
            text = welcome_text(in_group=in_group, donations=self._donations)
            uuid = "welcome-" + hashlib.sha256(mark.encode()).hexdigest()[:32]
            await self._api.send_to_chat(chat_id, text, uuid=uuid)
        except FeishuApiError as exc:
            log.warning("welcome_not_sent", chat_id=chat_id, error=str(exc))
        except Exception as exc:  # a store failure: no welcome, and the bot carries on
            log.error("welcome_failed", chat_id=chat_id, error=f"{type(exc).__name__}: {exc}")
        else:
            log.info("welcome_sent", chat_id=chat_id, group=in_group)
