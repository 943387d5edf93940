"""Telling people when a key leaves or re-enters the pool: its owner and the admins, privately.

One private message per recipient and state change (the pool reports each change once). A
recipient is a Feishu open_id: the donor of a donated key, and everyone in ``access.admins``
that looks like one. Sending never disturbs serving: failures are logged and dropped.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from bot.feishu.api import FeishuApi, FeishuApiError
from bot.llm.keypool import KeyStateChange
from bot.logging import get_logger
from bot.timing import Clock

log = get_logger(__name__)


class KeyNotices:
    """The key pool's ``on_state_change`` hook for the Feishu bot."""

    def __init__(
        self,
        api: FeishuApi,
        admins: Sequence[str],
        *,
        health_check_minutes: float,
        clock: Clock = time.time,
    ) -> None:
        self._api = api
        self._admins = [admin for admin in admins if admin.startswith("ou_")]
        self._every = health_check_minutes
        self._clock = clock

    async def __call__(self, change: KeyStateChange) -> None:
        recipients = dict.fromkeys(self._admins)
        if change.source == "donated" and change.owner.startswith("ou_"):
            recipients[change.owner] = None
        moment = str(int(self._clock()))
        for open_id in recipients:
            text = self._text(change, to_owner=open_id == change.owner)
            uuid = hashlib.sha256(
                "\x1f".join((change.key_id, change.change, open_id, moment)).encode()
            ).hexdigest()[:40]
            try:
                await self._api.send_to_user(open_id, text, uuid=uuid)
            except FeishuApiError as exc:
                log.warning("key_notice_not_sent", key=change.masked, error=str(exc))
            else:
                log.info("key_notice_sent", key=change.masked, change=change.change)

    def _text(self, change: KeyStateChange, *, to_owner: bool) -> str:
        key = f"{change.masked} (id {change.key_id})"
        if change.change == "enabled":
            return f"API key {key} is back in the pool: {change.reason}."
        recheck = (
            f"It is checked again every {self._every:g} minutes and comes back by itself once it "
            "works again."
            if self._every > 0
            else "It is checked again when the bot restarts."
        )
        if to_owner:
            return (
                f"Your API key {key} was taken out of the pool: {change.reason}. {recheck} "
                f"If it is gone for good, send /key remove {change.key_id}."
            )
        return (
            f"API key {key} of {change.owner} ({change.source}) was disabled automatically: "
            f"{change.reason}. {recheck} /keys enable {change.key_id} puts it back by hand."
        )
