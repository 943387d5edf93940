"""The shared key pool in chat: donating a key, ``/key …`` for everyone, ``/keys …`` for admins.

A donation is a private-chat message that is a key (any recognised shape) or ``/key add <key>``.
It is never a prompt: it is not sent to the model, not kept in history, and only its masked form
and key id are ever logged or shown. The key is checked with a cheap call before it joins the
pool; a bot cannot recall a user's message, so the answer asks the donor to delete it. In a group
a key is never accepted: the sender is told to revoke it. Someone ``access.allow`` does not list
never gets here: the transport turns them away before the service sees the message.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from urllib.parse import urlsplit

from bot.chat.commands import Command, CommandName
from bot.config import Settings
from bot.llm.events import TokenUsage
from bot.llm.keypool import KeyPool, KeyView, key_id_of
from bot.llm.validation import KeyCheck
from bot.logging import get_logger, mask_key
from bot.timing import Clock

log = get_logger(__name__)

KeyCheckFunction = Callable[[str], Awaitable[KeyCheck]]

DELETE_YOUR_MESSAGE = (
    "I cannot delete your message myself: please recall or delete it now, so the key does not "
    "stay in this chat."
)
GROUP_KEY_TEXT = (
    "That looks like an API key, posted where others can read it: please revoke it with its "
    "provider now. I did not keep it or send it anywhere. To share a key with the bot, send it "
    "to me in a private chat."
)
ADMINS_ONLY = "Sorry, only the bot's admins can do that."
KEY_USAGE = (
    "Usage: /key add <key> (or just send me the key), /key mine, /key remove <key id>. "
    "Admins: /keys, /keys disable|enable|remove <key id>."
)


class KeyCommands:
    """Answers donations and key commands with plain text; never shows a secret."""

    def __init__(
        self,
        pool: KeyPool,
        check: KeyCheckFunction,
        settings: Settings,
        *,
        clock: Clock = time.time,
    ) -> None:
        self._pool = pool
        self._check = check
        self._settings = settings
        self._clock = clock

    def count_tokens(self, key_id: str, usage: TokenUsage) -> None:
        """Count what an answer cost on its key, so the pool can use keys fairly."""
        self._pool.count_tokens(key_id, usage.prompt_tokens + usage.completion_tokens)

    # ---- donations ---------------------------------------------------------------------------

    async def donate(self, secret: str, *, user_id: str, in_group: bool) -> str:
        """Handle a key a user sent; return the answer."""
        masked, key_id = mask_key(secret), key_id_of(secret)
        bound = log.bind(key=masked, key_id=key_id)
        if in_group:
            bound.warning("key_donation_refused", reason="group chat")
            return GROUP_KEY_TEXT
        keys = self._settings.keys
        if not keys.accept_donations:
            bound.info("key_donation_refused", reason="donations off")
            return (
                "This bot does not take keys by chat: please give keys to its owner. "
                f"I did not keep it. {DELETE_YOUR_MESSAGE}"
            )
        known = self._pool.has(secret)
        if known is not None:
            bound.info("key_donation_known")
            return (
                f"That key is already in the pool ({known.masked}, id {known.key_id}). "
                f"{DELETE_YOUR_MESSAGE}"
            )
        result = await self._check(secret)
        bound.info("key_donation_checked", verdict=result.verdict)
        endpoint = urlsplit(self._settings.llm.base_url).netloc or self._settings.llm.base_url
        if result.verdict == "valid":
            view = await self._pool.add(secret, owner=user_id, source="donated")
            return (
                f"Thank you! Your key {view.masked} (id {view.key_id}) is now in the pool, used "
                f"fairly for everyone's questions. /key mine shows how it is used. "
                f"{DELETE_YOUR_MESSAGE}"
            )
        reasons = {
            "invalid": f"{endpoint} refused it as invalid",
            "no_quota": f"{endpoint} says it has no quota or balance left",
            "wrong_endpoint": f"it does not work with this bot's endpoint {endpoint}",
        }
        if result.verdict in reasons:
            return (
                f"I could not add the key {masked}: {reasons[result.verdict]} "
                f"({result.detail}). Nothing was stored. {DELETE_YOUR_MESSAGE}"
            )
        return (
            f"I could not check the key {masked} right now ({result.detail}), so I did not keep "
            f"it. Please try again later. {DELETE_YOUR_MESSAGE}"
        )

    # ---- commands ----------------------------------------------------------------------------

    async def run(self, command: Command, *, user_id: str, in_group: bool, admin: bool) -> str:
        """Answer ``/key …`` or ``/keys …``; ``admin``: the sender is in ``access.admins``."""
        action, _, rest = command.argument.partition(" ")
        action, rest = action.lower(), rest.strip()
        if command.name is CommandName.KEYS:
            if not admin:
                return ADMINS_ONLY
            if not action:
                return self._list(self._pool.keys(), title="Keys in the pool")
            if action in ("disable", "enable", "remove") and rest:
                return await self._admin_change(action, rest)
            return KEY_USAGE
        if action == "add" and rest:
            return await self.donate(rest, user_id=user_id, in_group=in_group)
        if action == "mine":
            pool_keys = self._pool.keys()
            mine = [k for k in pool_keys if k.source == "donated" and k.owner == user_id]
            if not mine:
                return "You have not shared a key. Send me one in a private chat to share it."
            return self._list(mine, title="Your keys")
        if action == "remove" and rest:
            view = self._find(rest)
            if view is None or view.source != "donated" or view.owner != user_id:
                return f"{rest} is not one of your keys (/key mine lists them)."
            await self._pool.remove(view.key_id)
            return f"Removed your key {view.masked} (id {view.key_id}) from the pool."
        return KEY_USAGE

    async def _admin_change(self, action: str, key_id: str) -> str:
        view = self._find(key_id)
        if view is None:
            return f"There is no key with id {key_id} (/keys lists them)."
        if action == "disable":
            await self._pool.disable(view.key_id, "disabled by an admin", by="manual")
            return (
                f"Disabled {view.masked} (id {view.key_id}); /keys enable {view.key_id} undoes it."
            )
        if action == "enable":
            await self._pool.enable(view.key_id, reason="enabled by an admin")
            return f"Enabled {view.masked} (id {view.key_id})."
        if view.source != "donated":
            return (
                f"{view.masked} comes from settings.yaml or the environment: remove it there "
                "(or /keys disable it)."
            )
        await self._pool.remove(view.key_id)
        return f"Removed {view.masked} (id {view.key_id}) from the pool."

    def _find(self, key_id: str) -> KeyView | None:
        pool_keys = self._pool.keys()
        return next((k for k in pool_keys if k.key_id == key_id.strip()), None)

    def _list(self, keys: list[KeyView], *, title: str) -> str:
        lines = [f"{title} ({len(keys)}):"]
        for key in keys:
            state = key.state
            if key.state == "cooling" and key.until is not None:
                state += f" until {datetime.fromtimestamp(key.until).strftime('%H:%M:%S')}"
            if key.reason:
                state += f" ({key.reason})"
            lines.append(
                f"- {key.masked} id {key.key_id} · owner {key.owner} · {key.source} · {state} · "
                f"{key.requests} requests in all · {key.tokens_today} tokens today"
            )
        return "\n".join(lines)
