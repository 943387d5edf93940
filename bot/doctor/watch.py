"""``doctor --watch``: open the SDK's long connection and wait for one message to arrive.

This proves what the API cannot tell: the ``im.message.receive_v1`` subscription, the
persistent-connection mode and a published version. It runs ``lark_oapi.ws.Client`` (the same
long connection the bot uses, without the channel on top) on a daemon thread with its own event
loop (:func:`bot.feishu.sdk_compat.give_ws_client_its_own_loop`). That client has no stop: the
caller ends the process once :func:`watch` returns (``os._exit`` after flushing its output).

The handler only records the sender and chat type (never the text) and returns, so the SDK
acknowledges the event: Feishu then considers it delivered, and a running bot will not get it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from bot.config import FeishuSettings
from bot.doctor import console
from bot.doctor.console import EVENTS, PERSISTENT_MODE
from bot.doctor.manual import MESSAGE_EVENT
from bot.doctor.report import Result
from bot.feishu import sdk_compat

NAME: Final = "watch"
ACK_GRACE_S: Final = 0.5
"""Time left to the SDK to send the acknowledgement after the handler returned."""


@dataclass(frozen=True)
class Arrival:
    """What doctor shows of a message that arrived: who sent it and where, not what."""

    open_id: str
    chat_type: str


class _Waiter:
    """Where the SDK's thread leaves the first arrival or the failure that ended it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.arrival: Arrival | None = None
        self.error: str | None = None

    def arrive(self, data: Any) -> None:
        event = getattr(data, "event", None)
        sender_id = getattr(getattr(event, "sender", None), "sender_id", None)
        message = getattr(event, "message", None)
        if self.arrival is None:
            self.arrival = Arrival(
                open_id=str(getattr(sender_id, "open_id", None) or "unknown"),
                chat_type=str(getattr(message, "chat_type", None) or "unknown"),
            )
        self.done.set()

    def fail(self, error: str) -> None:
        self.error = error
        self.done.set()


def watch(
    feishu: FeishuSettings,
    *,
    timeout_s: float,
    announce: Callable[[Result], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Result:
    """Connect, ``announce`` that a message may be sent now, and wait up to ``timeout_s``."""
    import lark_oapi as lark
    from lark_oapi.ws.client import Client

    waiter = _Waiter()
    handler = (
        lark.EventDispatcherHandler.builder("", "")
        .register_p2_im_message_receive_v1(waiter.arrive)
        .build()
    )
    client = Client(
        feishu.app_id,
        feishu.app_secret.get_secret_value(),
        log_level=lark.LogLevel.ERROR,
        event_handler=handler,
        domain=feishu.domain,
        auto_reconnect=False,
    )

    def serve() -> None:
        sdk_compat.give_ws_client_its_own_loop()
        try:
            client.start()  # returns only by raising
        except Exception as exc:  # the SDK's own exception types, websockets' and the network's
            waiter.fail(f"{type(exc).__name__}: {exc}")

    threading.Thread(target=serve, name="doctor-watch", daemon=True).start()
    announce(
        Result.manual(
            NAME,
            "send the bot a message now (privately, or @mention it in a group); waiting up to "
            f"{timeout_s:g} s. Doctor takes that message: a running bot would not get it, and "
            "it is not answered",
        )
    )
    waiter.done.wait(timeout_s)
    if waiter.arrival is not None:
        sleep(ACK_GRACE_S)
        arrival = waiter.arrival
        return Result.ok(
            NAME,
            f"{MESSAGE_EVENT} arrived from {arrival.open_id} in a {arrival.chat_type} chat: "
            "Feishu delivers messages to this machine",
        )
    domain = feishu.domain
    if waiter.error is not None:
        problem = f"the long connection failed: {waiter.error}"
        fix = "run `make doctor` without --watch: the long connection check says what to fix"
        return Result.fail(NAME, problem, fix)
    problem = f"no message arrived within {timeout_s:g} s"
    fix = (
        f"add the event {MESSAGE_EVENT} ({console.page(domain, EVENTS, 'Add events (添加事件)')}), "
        f"save the subscription mode {PERSISTENT_MODE}, and {console.PUBLISH}; Feishu hands "
        "each message to one connected client: if a bot is running, it may have got it instead"
    )
    return Result.fail(NAME, problem, fix)
