"""The Feishu gateway: the SDK's ``FeishuChannel`` wrapped thinly around the answer jobs.

Processes, threads and loops: the long connection lives in a process of its own
(:mod:`bot.feishu.ingress`), which journals every message event and acknowledges it there, so
the ACK never waits for the GIL this process's answers hold. Its events reach the channel's
dispatcher on the channel's start thread, exactly as from the SDK's WebSocket client, and the
channel hands each message to our handler on its background loop (``lark-channel-bg``). The
handler does one atomic store write (accept: dedup mark + inbox record) and passes the message
to the bot's loop, where :class:`bot.feishu.answerer.Answerer` answers it. So the WebSocket is
never blocked, every message is answered once (the acceptance gate is persistent, across
restarts), and none is lost (the journal and the inbox are replayed at start). The channel's
own dedup lookups are answered from memory (its default): the accept write is the real gate.

The tenant token is fetched and refreshed ahead of expiry on a worker thread
(:class:`bot.feishu.token_keeper.TenantTokenKeeper`), so no REST call on any loop ever waits for
the SDK's blocking token request.

:attr:`FeishuGateway.connection` says whether the long connection is up (``connected``), being
restored (``reconnecting``: the SDK reports both through the channel), not yet up
(``connecting``) or closed (``stopped``); the health check reads it and the metrics count it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Literal

from bot.app import Core
from bot.config import Settings
from bot.errors import FeishuConnectError
from bot.feishu import http_pool, sdk_compat
from bot.feishu.answerer import Answerer
from bot.feishu.api import FeishuApi
from bot.feishu.formula_images import FormulaImages
from bot.feishu.ingress import ChildWsClient, IngressProcess
from bot.feishu.key_notices import KeyNotices
from bot.feishu.media import FeishuMedia
from bot.feishu.messages import FeishuMessage, from_inbound
from bot.feishu.quotes import FeishuQuotes
from bot.feishu.replier import CardReplier
from bot.feishu.token_keeper import TenantTokenKeeper
from bot.feishu.transport import AiohttpTransport
from bot.feishu.welcome import Welcomer
from bot.logging import adopt_sdk_logger, get_logger, quiet_sdk_shutdown
from bot.ops.metrics import Metrics
from bot.store import InboxEntry
from bot.timing import Clock

log = get_logger(__name__)


#: how long an accepted message id is remembered (Feishu redelivers within hours, not days)
ACCEPT_TTL_S = 7 * 24 * 3600
#: seconds one Feishu REST call on the answer path may take before it is retried
REST_TIMEOUT_S = 10.0

#: the long connection's state, as the SDK reported it last
ConnectionState = Literal["connecting", "connected", "reconnecting", "stopped"]


class FeishuGateway:
    """Receives Feishu messages and hands them to the answer jobs."""

    def __init__(
        self,
        settings: Settings,
        core: Core,
        ingress: IngressProcess,
        *,
        clock: Clock = time.time,
        on_lost: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._core = core
        self._clock = clock
        self._metrics = metrics or core.metrics
        self.connection: ConnectionState = "connecting"
        self._loop = asyncio.get_running_loop()
        self._channel: Any = None
        self._http: http_pool.HttpxShim | None = None
        self._transport: AiohttpTransport | None = None
        self._tokens: TenantTokenKeeper | None = None
        self._answerer: Answerer | None = None
        self._welcomer: Welcomer | None = None
        self._greetings: set[asyncio.Task[None]] = set()
        self._replays: set[asyncio.Task[None]] = set()
        self._on_lost = on_lost
        self._ingress = ingress
        self._restore_ws_client: Callable[[], None] | None = None
        self.lost_reason = ""  # set when the connection is gone for good
        self._watchdog: asyncio.Task[None] | None = None
        self._left_over: list[InboxEntry] = []
        # New messages wait here until what a previous run left is dispatched (keeps order).
        self._early: list[tuple[FeishuMessage, float]] | None = []

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the credentials, connect the long connection; raise FeishuConnectError.

        Messages arriving from now on wait until :meth:`resume_inbox` has dispatched what a
        previous run left, so every conversation stays in order.
        """
        sdk_compat.check_sdk_version()
        # What a previous run left is read before any new message can arrive.
        self._left_over = await self._core.store.inbox_list()
        feishu = self._settings.feishu
        self._tokens = TenantTokenKeeper(
            feishu.app_id, feishu.app_secret.get_secret_value(), feishu.domain
        )
        await self._tokens.start()  # bad credentials end here, with one clear line
        self._channel = self._build_channel()
        app_id = feishu.app_id
        self._transport = AiohttpTransport(
            feishu.domain,
            token=lambda: sdk_compat.cached_tenant_token(app_id),
            refresh=self._tokens.refresh_now,
            timeout_s=REST_TIMEOUT_S,  # the channel's own client would wait forever
        )
        api = FeishuApi(self._transport, on_token_invalid=self._tokens.refresh_now)
        self._core.pool.on_state_change = KeyNotices(
            api,
            self._settings.access.admins,
            health_check_minutes=self._settings.keys.health_check_minutes,
        )
        self._core.service.quotes = FeishuQuotes(api, self._core.store)
        media = FeishuMedia(api)
        self._core.service.images = media
        if self._core.service.media is not None:
            self._core.service.media.source = media
            self._core.service.media.speech = media
        self._welcomer = Welcomer(
            api,
            self._core.store,
            self._core.service.access,
            donations=self._settings.keys.accept_donations,
        )
        replier = CardReplier(
            api,
            update_interval_s=self._settings.chat.stream_update_ms / 1000,
            footer=self._settings.chat.footer,
            metrics=self._metrics,
            formulas=FormulaImages(media) if self._settings.media.formulas else None,
            before_new_card=self._core.service.requests_first.wait,
        )
        self._answerer = Answerer(
            self._settings,
            self._core.store,
            self._core.service,
            replier,
            clock=self._clock,
            metrics=self._metrics,
        )
        from lark_oapi.channel import FeishuChannelError

        try:
            await self._channel.start_background(timeout=feishu.connect_timeout_s)
        except FeishuChannelError as exc:
            await self._stop_channel()
            raise FeishuConnectError(self._describe_connect_error(exc)) from None
        self._set_connection("connected")
        identity = self._channel.bot_identity
        log.info(
            "feishu_connected",
            bot=getattr(identity, "name", None),
            bot_open_id=getattr(identity, "open_id", None),
        )

    async def resume_inbox(self) -> None:
        """Answer what a previous run accepted but did not finish (crash, kill -9, shutdown)."""
        assert self._answerer is not None
        await self._replay_arrivals()  # accepted ones join the early messages, in order
        left_over, self._left_over = self._left_over, []
        await self._answerer.resume(left_over)
        early, self._early = self._early or [], None
        for message, accepted_at in early:
            self._answerer.dispatch(message, accepted_at=accepted_at)

    async def stop(self) -> None:
        """Stop taking messages, let answers finish within the grace period, disconnect."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._answerer is not None:
            await self._answerer.stop(self._settings.feishu.shutdown_grace_s)
        for tasks in (self._greetings, self._replays):
            if tasks:
                _, late = await asyncio.wait(set(tasks), timeout=5)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        await self._stop_channel()

    async def _stop_channel(self) -> None:
        self._set_connection("stopped")
        try:
            if self._channel is not None:
                quiet_sdk_shutdown()
                with contextlib.suppress(Exception):
                    await self._channel.stop_background()
                if self._http is not None:
                    await self._http.aclose()
        finally:
            if self._restore_ws_client is not None:
                self._restore_ws_client()
                self._restore_ws_client = None
            if self._transport is not None:
                await self._transport.aclose()
            if self._tokens is not None:
                await self._tokens.aclose()

    # ---- building the channel ----------------------------------------------------------------

    def _build_channel(self) -> Any:
        from lark_oapi.channel import (
            FeishuChannel,
            PolicyConfig,
            SafetyConfig,
            TextBatchConfig,
        )
        from lark_oapi.core.enum import LogLevel

        adopt_sdk_logger()
        self._http = http_pool.install()
        feishu = self._settings.feishu
        channel = FeishuChannel(
            app_id=feishu.app_id,
            app_secret=feishu.app_secret.get_secret_value(),
            domain=feishu.domain,
            log_level=LogLevel.DEBUG if self._settings.log.sdk_level == "debug" else LogLevel.INFO,
            policy=PolicyConfig(require_mention=self._settings.chat.group_requires_mention),
            # The SDK merges bursts per chat, mixing the users of a group: the bot merges p2p
            # bursts itself (Answerer) and lets every message through at once here.
            safety=SafetyConfig(text_batch=TextBatchConfig(delay_ms=0)),
            name_lookup=_no_name_lookup,
        )
        # The long-connection process journals and acknowledges; the channel gets its events.
        self._restore_ws_client = sdk_compat.use_ws_client(
            lambda *args, **kwargs: ChildWsClient(
                self._ingress,
                self._ingress_exited,
                *args,
                on_restarted=self._ingress_restarted,
                **kwargs,
            )
        )
        # Called on the thread that dispatches events: hand over to the bot's loop.
        sdk_compat.handle_p2p_chat_entered(
            channel,
            lambda chat_id, open_id: self._loop.call_soon_threadsafe(
                self._greet, "user", chat_id, open_id
            ),
        )
        channel.on("message", self._on_message)
        channel.on("botAdded", self._on_bot_added)
        channel.on("reject", self._on_reject)
        # Called on the thread that dispatches events: hand over to the bot's loop.
        channel.on("reconnecting", lambda *_: self._loop.call_soon_threadsafe(self._reconnecting))
        channel.on("reconnected", lambda *_: self._loop.call_soon_threadsafe(self._reconnected))
        channel.on("error", lambda error, *_: log.warning("feishu_error", error=str(error)))
        return channel

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

    async def _replay_arrivals(self) -> None:
        """Feed events a previous run acknowledged but never accepted through the channel again."""
        arrivals = await self._core.store.arrivals()
        if not arrivals:
            return
        log.info("arrivals_replayed", messages=len(arrivals))
        replays = [sdk_compat.replay_message_event(self._channel, event) for _, event in arrivals]
        await asyncio.gather(*(asyncio.wrap_future(r) for r in replays), return_exceptions=True)

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
        if accepted:
            self._metrics.message_received()
        log.info(
            "message_accepted" if accepted else "message_duplicate",
            message_id=message.message_id,
            conversation=message.conversation_id,
            message_type=message.message_type,
            accepted_at=time.monotonic(),
        )
        if accepted:
            self._loop.call_soon_threadsafe(self._dispatch_new, message, entry.received_at)

    def _set_connection(self, state: ConnectionState) -> None:
        self.connection = state
        self._metrics.connection_up(state == "connected")

    def _reconnecting(self) -> None:
        log.warning("feishu_reconnecting")
        if self.connection != "stopped":
            self._metrics.connection_lost()
            self._set_connection("reconnecting")
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._expect_reconnect())

    def _reconnected(self) -> None:
        log.info("feishu_reconnected")
        if self.connection != "stopped":
            self._set_connection("connected")
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _expect_reconnect(self) -> None:
        """The SDK stops reconnecting silently after a fatal answer: do not stay up deaf."""
        timeout = self._settings.feishu.reconnect_timeout_s
        await asyncio.sleep(timeout)
        log.error("feishu_connection_lost", reconnect_timeout_s=timeout)
        self._give_up(
            f"lost the connection to Feishu and could not reconnect within {timeout:g} s; "
            "check the network and the app's long-connection setting, then start the bot again"
        )

    def _ingress_exited(self, status: str) -> None:
        """On the channel's start thread: the long-connection process died on its own once too
        often (or its replacement was refused)."""
        self._loop.call_soon_threadsafe(
            self._give_up,
            f"the long-connection process ended unexpectedly ({status}) and was not started "
            "again; start the bot again (what it had acknowledged is answered then)",
        )

    def _ingress_restarted(self) -> None:
        """On the channel's start thread: a new long-connection process replaces one that died.

        Whatever the dead one passed on has been handed to the channel; what it journaled but
        could not pass on (it was not acknowledged, so Feishu sends it again too) is replayed
        now, and the accept gate drops whichever copy comes second.
        """
        self._loop.call_soon_threadsafe(self._replay_in_background)

    def _replay_in_background(self) -> None:
        """Start the replay after a restart; :meth:`stop` awaits it (or cancels it)."""
        task = asyncio.create_task(self._replay_after_restart())
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    async def _replay_after_restart(self) -> None:
        try:
            await self._replay_arrivals()
        except Exception as exc:  # the bot serves on: Feishu sends unacknowledged events again
            log.error("arrivals_not_replayed", error=f"{type(exc).__name__}: {exc}")

    def _give_up(self, reason: str) -> None:
        """The connection is gone for good: say why and stop the bot."""
        if self.lost_reason or self.connection == "stopped":
            return
        self.lost_reason = reason
        if self._on_lost is not None:
            self._on_lost()

    def _on_bot_added(self, event: Any, *_: Any) -> None:
        chat_id = str(getattr(event, "chat_id", "") or "")
        operator = str(getattr(getattr(event, "operator", None), "open_id", "") or "")
        self._loop.call_soon_threadsafe(self._greet, "group", chat_id, operator)

    def _greet(self, who: str, chat_id: str, open_id: str) -> None:
        """On the bot's loop: welcome a user or a group (once; see :mod:`bot.feishu.welcome`)."""
        if self._welcomer is None:
            return
        if who == "user":
            greeting = self._welcomer.user_entered(chat_id, open_id)
        else:
            greeting = self._welcomer.bot_added(chat_id, open_id)
        task = asyncio.create_task(greeting)
        self._greetings.add(task)
        task.add_done_callback(self._greetings.discard)

    def _on_reject(self, event: Any, *_: Any) -> None:
        log.info(
            "message_ignored",
            reason=str(getattr(event, "reason", "")),
            message_id=getattr(event, "message_id", None),
        )

    # ---- answering (on the bot's loop) -------------------------------------------------------

    def _dispatch_new(self, message: FeishuMessage, accepted_at: float) -> None:
        if self._early is not None:
            self._early.append((message, accepted_at))
        elif self._answerer is not None:
            self._answerer.dispatch(message, accepted_at=accepted_at)


async def _no_name_lookup(open_ids: list[str]) -> dict[str, Any]:
    """Skip the contact API: names are not needed, and it would cost a scope and API quota."""
    return {}
