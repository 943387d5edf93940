"""The setup steps doctor cannot check through Feishu's API, as a checklist with console paths.

Event subscriptions, the subscription mode and the release state are not readable with a
tenant token; ``doctor --watch`` proves them end to end instead (a message arrives).
"""

from __future__ import annotations

from bot.doctor import console
from bot.doctor.console import EVENTS, PERSISTENT_MODE
from bot.doctor.report import Result

MESSAGE_EVENT = "im.message.receive_v1"
WELCOME_EVENTS = (
    "im.chat.access_event.bot_p2p_chat_entered_v1",
    "im.chat.member.bot.added_v1",
)


def manual_steps(domain: str, *, watching: bool = False) -> list[Result]:
    """The manual checklist, with the console paths of ``domain``'s platform.

    ``watching``: ``--watch`` runs next, so the last step (try it with ``--watch``) is left out.
    """
    steps = [
        Result.manual(
            "events",
            f"{console.page(domain, EVENTS, 'Add events (添加事件)')}: "
            f"{MESSAGE_EVENT} (Receive message / 接收消息) is required; "
            f"{WELCOME_EVENTS[0]} and {WELCOME_EVENTS[1]} are optional (welcomes); "
            "add no other event",
        ),
        Result.manual(
            "subscription mode",
            f"{console.page(domain, EVENTS)} → subscription mode {PERSISTENT_MODE} → Save; the "
            "console accepts it only while a client is connected: save it while "
            "`make run` or `make doctor ARGS=--watch` runs",
        ),
        Result.manual(
            "release",
            f"{console.page(domain, console.PUBLISH)}; scope and event changes take effect only "
            "in a published version",
        ),
    ]
    if not watching:
        steps.append(
            Result.manual(
                "try it",
                "`make doctor ARGS=--watch`, then send the bot a message: doctor shows it arrive",
            )
        )
    return steps
