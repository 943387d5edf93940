"""The Feishu gateway: the SDK's ``FeishuChannel`` wrapped thinly around the conversation service.

Threads and loops: the channel runs the WebSocket on its own thread and hands each message to
our handler on its background loop (``lark-channel-bg``) after the ACK was already scheduled.
The handler does one atomic store write (accept: dedup mark + inbox record) and passes the
message to the bot's loop, where replies are streamed. So the WebSocket is never blocked, every
message is answered once (the acceptance gate is persistent, across restarts and instances), and
none is lost (the inbox is replayed at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from bot.app import Core
from bot.chat.service import IncomingMessage, Reply
from bot.config import Settings
from bot.errors import FeishuConnectError
from bot.feishu import http_pool
from bot.feishu.dedup import StoreDedup
from bot.feishu.messages import FeishuMessage, from_inbound
from bot.feishu.replier import CardReplier
from bot.logging import adopt_sdk_logger, bind_context, get_logger, quiet_sdk_shutdown
from bot.store import InboxEntry

log = get_logger(__name__)

Clock = Callable[[], float]

#: how long an accepted message id is remembered (Feishu redelivers within hours, not days)
ACCEPT_TTL_S = 7 * 24 * 3600

DELAYED_PREFIX = "_(Sorry for the delay: I was restarting when you sent this.)_\n\n"
TOO_LATE_TEXT = (
    "Sorry, I was offline when you sent this and could not answer in time. "
    "Please send it again if you still need an answer."
)
UNSUPPORTED_TEXT = (
    "I can only read text for now, so I cannot look at {what}. "
    "Please describe it in words and I will gladly help."
)


class FeishuGateway:
    """Receives Feishu messages, answers them through the conversation service."""

    def __init__(
        self,
        settings: Settings,
        core: Core,
        *,
        clock: Clock = time.time,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._core = core
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._channel: Any = None
        self._ws_loop: asyncio.AbstractEventLoop | None = None
        self._http: http_pool.HttpxShim | None = None
        self._replier: CardReplier | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._cut_short = asyncio.Event()
        self._on_lost = on_lost
        self.lost_reason = ""  # set when the connection is gone for good
        self._watchdog: asyncio.Task[None] | None = None
        self._left_over: list[InboxEntry] = []
        # New messages wait here until what a previous run left is dispatched (keeps order).
        self._early: list[FeishuMessage] | None = []

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the credentials, connect the long connection; raise FeishuConnectError.

        Messages arriving from now on wait until :meth:`resume_inbox` has dispatched what a
        previous run left, so every conversation stays in order.
        """
        # What a previous run left is read before any new message can arrive.
        self._left_over = await self._core.store.inbox_list()
        await self._check_credentials()
        self._channel = self._build_channel()
        self._replier = CardReplier(
            self._channel, update_interval_s=self._settings.chat.stream_update_ms / 1000
        )
        from lark_oapi.channel import FeishuChannelError

        timeout = self._settings.feishu.connect_timeout_s
        try:
            await self._channel.start_background(timeout=timeout)
        except FeishuChannelError as exc:
            await self._stop_channel()
            raise FeishuConnectError(self._describe_connect_error(exc)) from None
        identity = self._channel.bot_identity
        log.info(
            "feishu_connected",
            bot=getattr(identity, "name", None),
            bot_open_id=getattr(identity, "open_id", None),
        )

    async def resume_inbox(self) -> None:
        """Answer what a previous run accepted but did not answer (crash, kill -9)."""
        now = self._clock()
        window = self._settings.chat.resume_within_minutes * 60
        left_over, self._left_over = self._left_over, []
        early, self._early = self._early or [], None
        for entry in left_over:
            message = FeishuMessage.from_json(entry.payload)
            if now - entry.received_at <= window:
                log.info("message_resumed", message_id=entry.message_id)
                self._dispatch(message, delayed=True)
            else:
                log.info("message_expired", message_id=entry.message_id)
                self._track(self._answer(message, None, text=TOO_LATE_TEXT))
        for message in early:
            self._dispatch(message, delayed=False)

    async def stop(self) -> None:
        """Stop taking messages, let answers finish within the grace period, disconnect."""
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        grace = self._settings.feishu.shutdown_grace_s
        if self._tasks:
            log.info("shutdown_waiting", replies=len(self._tasks), grace_s=grace)
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                self._cut_short.set()  # replies close their cards with a note
                await asyncio.wait(pending, timeout=10)
        await self._stop_channel()

    async def _stop_channel(self) -> None:
        if self._channel is None:
            return
        quiet_sdk_shutdown()
        ws = self._channel.ws_client
        if ws is not None:
            ws._auto_reconnect = False  # the SDK would otherwise reconnect while stopping
        with contextlib.suppress(Exception):
            await self._channel.stop_background()
        await asyncio.to_thread(_drain_loop, self._ws_loop)
        if self._http is not None:
            await self._http.aclose()

    # ---- building the channel ----------------------------------------------------------------

    def _build_channel(self) -> Any:
        import lark_oapi.ws.client as ws_client_module
        from lark_oapi.channel import (
            FeishuChannel,
            PolicyConfig,
            SafetyConfig,
            TextBatchConfig,
        )
        from lark_oapi.core.enum import LogLevel

        # The SDK's WebSocket client runs on a module-level loop picked at import; give it a
        # fresh one so it can never be the bot's running loop.
        ws_client_module.loop = self._ws_loop = asyncio.new_event_loop()
        adopt_sdk_logger()
        self._http = http_pool.install()
        feishu = self._settings.feishu
        channel = FeishuChannel(
            app_id=feishu.app_id,
            app_secret=feishu.app_secret.get_secret_value(),
            domain=feishu.domain,
            log_level=LogLevel.DEBUG if self._settings.log.sdk_level == "debug" else LogLevel.INFO,
            policy=PolicyConfig(require_mention=self._settings.chat.group_requires_mention),
            safety=SafetyConfig(
                text_batch=TextBatchConfig(delay_ms=self._settings.chat.merge_burst_ms)
            ),
            dedup_store=StoreDedup(self._core.store, self._loop),
            name_lookup=_no_name_lookup,
        )
        channel.on("message", self._on_message)
        channel.on("reject", self._on_reject)
        # Called on the SDK's WebSocket thread: hand over to the bot's loop.
        channel.on("reconnecting", lambda *_: self._loop.call_soon_threadsafe(self._reconnecting))
        channel.on("reconnected", lambda *_: self._loop.call_soon_threadsafe(self._reconnected))
        channel.on("error", lambda error, *_: log.warning("feishu_error", error=str(error)))
        return channel

    async def _check_credentials(self) -> None:
        """Ask for a tenant token first, so bad credentials give one clear line."""
        import lark_oapi as lark
        from lark_oapi.api.auth.v3 import (
            InternalTenantAccessTokenRequest,
            InternalTenantAccessTokenRequestBody,
        )

        feishu = self._settings.feishu
        client = (
            lark.Client.builder()
            .app_id(feishu.app_id)
            .app_secret(feishu.app_secret.get_secret_value())
            .domain(feishu.domain)
            .log_level(lark.LogLevel.ERROR)
            .build()
        )
        body = (
            InternalTenantAccessTokenRequestBody.builder()
            .app_id(feishu.app_id)
            .app_secret(feishu.app_secret.get_secret_value())
            .build()
        )
        request = InternalTenantAccessTokenRequest.builder().request_body(body).build()
        try:
            response = await asyncio.to_thread(client.auth.v3.tenant_access_token.internal, request)
        except Exception as exc:
            raise FeishuConnectError(
                f"cannot reach Feishu at {feishu.domain}: {type(exc).__name__}: {exc}. "
                "Check the network and feishu.domain"
            ) from None
        if not response.success():
            raise FeishuConnectError(
                f"Feishu rejected app_id/app_secret: {response.msg} (code {response.code}). "
                "Copy both from the developer console → your app → Credentials & Basic Info"
            )

    def _describe_connect_error(self, exc: Exception) -> str:
        cause = exc.__cause__
        if cause is not None and type(cause).__name__ == "ClientException":
            return (
                f"Feishu refused the long connection: {cause}. Check that the app enables "
                "'Receive events through persistent connection' and that app_id/app_secret match"
            )
        return (
            f"could not connect to Feishu at {self._settings.feishu.domain} within "
            f"{self._settings.feishu.connect_timeout_s:g} s ({exc}). Check the network and "
            "feishu.domain"
        )

    # ---- inbound (on the channel's loop) -----------------------------------------------------

    async def _on_message(self, inbound: Any) -> None:
        try:
            await self._accept(inbound)
        except Exception as exc:  # the event is ACKed already: say loudly what was not kept
            log.error(
                "message_not_accepted",
                message_id=getattr(inbound, "id", None),
                error=f"{type(exc).__name__}: {exc}",
            )

    async def _accept(self, inbound: Any) -> None:
        identity = self._channel.bot_identity
        bot_open_id = getattr(identity, "open_id", None)
        # Group messages without the bot's @mention were already turned away by the channel's
        # policy gate (PolicyConfig.require_mention) and reach `_on_reject` instead.
        message = from_inbound(inbound, bot_open_id)
        entry = InboxEntry(
            message_id=message.message_id,
            conversation_id=message.conversation_id,
            payload=message.to_json(),
            received_at=self._clock(),
        )
        accepted = await self._core.store.accept_message(entry, ACCEPT_TTL_S)
        log.info(
            "message_accepted" if accepted else "message_duplicate",
            message_id=message.message_id,
            conversation=message.conversation_id,
            message_type=message.message_type,
            accepted_at=time.monotonic(),
        )
        if accepted and not self._closing:
            self._loop.call_soon_threadsafe(self._dispatch_new, message)

    def _reconnecting(self) -> None:
        log.warning("feishu_reconnecting")
        if self._watchdog is None and not self._closing:
            self._watchdog = asyncio.create_task(self._expect_reconnect())

    def _reconnected(self) -> None:
        log.info("feishu_reconnected")
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _expect_reconnect(self) -> None:
        """The SDK stops reconnecting silently after a fatal answer: do not stay up deaf."""
        timeout = self._settings.feishu.reconnect_timeout_s
        await asyncio.sleep(timeout)
        if self._closing:
            return
        self.lost_reason = (
            f"lost the connection to Feishu and could not reconnect within {timeout:g} s; "
            "check the network and the app's long-connection setting, then start the bot again"
        )
        log.error("feishu_connection_lost", reconnect_timeout_s=timeout)
        if self._on_lost is not None:
            self._on_lost()

    def _on_reject(self, event: Any, *_: Any) -> None:
        log.info(
            "message_ignored",
            reason=str(getattr(event, "reason", "")),
            message_id=getattr(getattr(event, "message", None), "id", None),
        )

    # ---- answering (on the bot's loop) -------------------------------------------------------

    def _dispatch_new(self, message: FeishuMessage) -> None:
        if self._early is not None:
            self._early.append(message)
        else:
            self._dispatch(message, delayed=False)

    def _dispatch(self, message: FeishuMessage, delayed: bool) -> None:
        if message.kind != "text":
            text = UNSUPPORTED_TEXT.format(what=message.describe_type())
            self._track(self._answer(message, None, text=text))
            return
        # Taking the place in the conversation now keeps arrival order.
        reply = self._core.service.handle(
            IncomingMessage(
                conversation_id=message.conversation_id,
                user_id=message.sender_open_id,
                text=message.text,
                message_id=message.message_id,
            )
        )
        self._track(self._answer(message, reply, delayed=delayed))

    def _track(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(
        self,
        message: FeishuMessage,
        reply: Reply | None,
        *,
        delayed: bool = False,
        text: str = "",
    ) -> None:
        """Deliver ``reply`` as a streamed card, or ``text`` as a plain reply; then clear the
        message from the inbox. What could not be delivered stays for the next start."""
        bind_context(conversation=message.conversation_id, message_id=message.message_id)
        assert self._replier is not None
        started = time.monotonic()
        try:
            if reply is None:
                await self._send(message, {"text": text})
                outcome = "text"
            else:
                result = await self._replier.stream(
                    chat_id=message.chat_id,
                    reply_to=message.message_id,
                    in_thread=message.in_group,
                    events=reply,
                    prefix=DELAYED_PREFIX if delayed else "",
                    stop=self._cut_short,
                )
                outcome = result.outcome
                if not all(result.message_ids):
                    # The SDK reports a card it could not send only by an empty message id.
                    log.warning("reply_card_not_sent", fallback="markdown")
                    await self._send(message, {"markdown": result.text})
        except Exception as exc:
            log.error("reply_not_delivered", error=f"{type(exc).__name__}: {exc}")
            return  # stays in the inbox: answered at the next start
        finally:
            if reply is not None:
                await reply.aclose()
        await self._core.store.inbox_remove(message.message_id)
        log.info("reply_sent", outcome=outcome, seconds=round(time.monotonic() - started, 3))

    async def _send(self, message: FeishuMessage, content: dict[str, str]) -> None:
        result = await self._channel.send(
            message.chat_id,
            content,
            {"reply_to": message.message_id, "reply_in_thread": message.in_group or None},
        )
        if not getattr(result, "success", True):
            raise OSError(f"Feishu refused the reply: {getattr(result, 'error', result)}")


async def _no_name_lookup(open_ids: list[str]) -> dict[str, Any]:
    """Skip the contact API: names are not needed, and it would cost a scope and API quota."""
    return {}


def _drain_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Cancel what the SDK left on its stopped WebSocket loop, then close it quietly."""
    if loop is None or loop.is_closed():
        return
    for _ in range(50):  # the SDK's thread stops the loop; wait for that (at most ~1 s)
        if not loop.is_running():
            break
        time.sleep(0.02)
    else:
        return
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    with contextlib.suppress(Exception):
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    with contextlib.suppress(Exception):
        loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
