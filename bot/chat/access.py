"""Who may use the bot (``access.allow``, ``access.admins``) and how much (daily quotas).

A user is allowed when ``access.allow`` is empty, or names one of their ids (open_id, user_id)
or the chat the message came from; admins are always allowed and exempt from quotas. Someone
not allowed is told so once per day (the mark is in the store, so restarts and several
instances agree) and is otherwise ignored: the model is never called for them.

Quotas count the usage records the answers leave (requests and tokens per user and day, local
time), so they hold across restarts and keys; a day starts at local midnight.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime, timedelta

from bot.config import AccessSettings
from bot.store import Store, Usage
from bot.timing import Clock

REFUSAL_TEXT = (
    "Sorry, this bot is only open to the people its owner listed. If you should have access, "
    "ask the bot's owner to add you under access.allow. (I say this once a day.)"
)
#: how long the "refused today" mark lives: past the end of any day it was set in
_REFUSAL_MARK_TTL_S = 2 * 24 * 3600


def day_of(timestamp: float) -> str:
    """The local calendar day of ``timestamp``, as ``YYYY-MM-DD`` (how usage is recorded)."""
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d")


def month_start(day: str) -> str:
    """The first day of ``day``'s month."""
    return day[:8] + "01"


def until_midnight(now: float) -> float:
    """Seconds from ``now`` to the next local midnight."""
    moment = datetime.fromtimestamp(now)
    midnight = datetime.combine(moment.date() + timedelta(days=1), datetime.min.time())
    return midnight.timestamp() - now


def describe_wait(seconds: float) -> str:
    """``3 h 12 min``, ``5 min`` or ``less than a minute``."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "less than a minute"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def totals(rows: Iterable[Usage]) -> tuple[int, int]:
    """Requests and tokens (prompt + completion) of usage rows."""
    requests = tokens = 0
    for row in rows:
        requests += row.requests
        tokens += row.prompt_tokens + row.completion_tokens
    return requests, tokens


class AccessControl:
    """Answers "may this user use the bot" and "is their quota used up"."""

    def __init__(self, settings: AccessSettings, store: Store, *, clock: Clock = time.time):
        self._settings = settings
        self._store = store
        self._clock = clock
        self._allow = frozenset(settings.allow)
        self._admins = frozenset(settings.admins)

    def is_admin(self, user_ids: Iterable[str]) -> bool:
        """Whether any of the user's ids is in ``access.admins``."""
        return not self._admins.isdisjoint(user_ids)

    def allows(self, user_ids: Iterable[str], chat_id: str = "") -> bool:
        """Whether a message from this user in this chat may be answered."""
        ids = set(user_ids)
        if not self._allow or self.is_admin(ids):
            return True
        return not self._allow.isdisjoint(ids) or (bool(chat_id) and chat_id in self._allow)

    async def refuse_today(self, user_id: str) -> bool:
        """True the first time today a user who is not allowed writes (tell them, once)."""
        key = f"access_refused:{user_id}:{day_of(self._clock())}"
        return await self._store.mark_seen(key, _REFUSAL_MARK_TTL_S)

    async def quota_exceeded(self, user_id: str, user_ids: Iterable[str]) -> str | None:
        """The message to show when the user reached a daily quota today; None when not."""
        limits = self._settings
        if not (limits.daily_requests_per_user or limits.daily_tokens_per_user):
            return None
        if self.is_admin([user_id, *user_ids]):
            return None
        now = self._clock()
        today = day_of(now)
        requests, tokens = totals(await self._store.usage_between(today, today, user_id))
        resets = f"It resets at midnight, in {describe_wait(until_midnight(now))}."
        if limits.daily_requests_per_user and requests >= limits.daily_requests_per_user:
            return (
                f"You have used your {limits.daily_requests_per_user} requests for today. {resets}"
            )
        if limits.daily_tokens_per_user and tokens >= limits.daily_tokens_per_user:
            return (
                f"You have used your {limits.daily_tokens_per_user:,} tokens for today "
                f"({tokens:,} so far). {resets}"
            )
        return None

    async def images_exceeded(self, user_id: str, user_ids: Iterable[str]) -> str | None:
        """The message to show when the user drew ``access.daily_images_per_user`` images
        today (0: no limit); None when they may draw another."""
        limit = self._settings.daily_images_per_user
        if not limit or self.is_admin([user_id, *user_ids]):
            return None
        now = self._clock()
        today = day_of(now)
        drawn = sum(row.images for row in await self._store.usage_between(today, today, user_id))
        if drawn < limit:
            return None
        return (
            f"You have drawn your {limit} images for today. It resets at midnight, in "
            f"{describe_wait(until_midnight(now))}."
        )
