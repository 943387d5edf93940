"""``python -m bot run``: the bot's life from start to a clean exit.

Start: take the store's instance lock (one bot per store), open the core (store, keys, LLM
client), connect to Feishu, answer what a previous run left unanswered. In the background:
housekeeping (expired marks, old history) and the key health check (automatically disabled keys
are re-checked at start and every ``keys.health_check_minutes``). Then serve until SIGINT or
SIGTERM (or until the connection is lost for longer than ``feishu.reconnect_timeout_s``: then
exit 1), let answers in progress finish within ``feishu.shutdown_grace_s`` (what is cut short or
still queued stays in the inbox for the next start), disconnect, close the store.

With ``ops.http`` set, ``/healthz`` and ``/metrics`` (:mod:`bot.ops.http`) listen from before
connecting (the health check says ``connecting`` until the connection is up) until the bot has
disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from bot import runtime, signals
from bot.app import Core, build_core
from bot.config import Settings
from bot.errors import FeishuConnectError, StoreError
from bot.feishu.gateway import FeishuGateway
from bot.feishu.ingress import IngressProcess
from bot.llm.keypool import KeyPool
from bot.llm.validation import KeyCheck
from bot.logging import Redactor, get_logger
from bot.ops.health import HealthChecks
from bot.ops.http import OpsServer
from bot.ops.metrics import Metrics
from bot.store import Store
from bot.store.lock import InstanceLock
from bot.timing import Clock, Sleep

log = get_logger(__name__)

HOUSEKEEPING_EVERY_S = 3600.0
DAY_S = 86_400.0
#: the channel drops events older than 30 minutes as stale: journal entries older are useless
ARRIVALS_KEPT_S = 1800.0


async def serve(settings: Settings, redactor: Redactor, ingress: IngressProcess) -> None:
    """Run the Feishu bot until a stop signal; raise FeishuConnectError if it cannot connect,
    StoreLocked if another bot uses the store. The long connection is ``ingress``'s
    (:mod:`bot.feishu.ingress`)."""
    stop = asyncio.Event()
    with signals.handling([signal.SIGINT, signal.SIGTERM], stop.set), _instance_lock(settings):
        core = await build_core(settings, redactor, metrics=Metrics())
        try:
            if not core.pool.keys():
                log.warning("no_api_keys", hint="add llm.keys or OPENAI_API_KEYS")
            gateway = FeishuGateway(settings, core, ingress, on_lost=stop.set)
            async with _ops_endpoints(settings, core, gateway):
                await _serve(settings, core, gateway, stop)
        finally:
            await core.close()
    log.info("bot_stopped")


async def _serve(
    settings: Settings, core: Core, gateway: FeishuGateway, stop: asyncio.Event
) -> None:
    """Connect, answer until ``stop``, disconnect; raise FeishuConnectError if it was lost."""
    try:
        await gateway.start()
        async with asyncio.TaskGroup() as background:
            housekeeping = background.create_task(
                _housekeeping(
                    core.store,
                    settings.chat.history_retention_days,
                    hold_minutes=settings.chat.attachment_hold_minutes,
                )
            )
            health = background.create_task(
                keep_keys_checked(core.pool, core.check_key, settings.keys.health_check_minutes)
            )
            await gateway.resume_inbox()
            runtime.tune_for_serving()
            log.info("bot_ready", model=settings.llm.model)
            await stop.wait()
            log.info("bot_stopping")
            housekeeping.cancel()
            health.cancel()
    finally:
        await gateway.stop()
    if gateway.lost_reason:
        raise FeishuConnectError(gateway.lost_reason)


@contextlib.asynccontextmanager
async def _ops_endpoints(
    settings: Settings, core: Core, gateway: FeishuGateway
) -> AsyncIterator[None]:
    """``/healthz`` and ``/metrics`` while the bot runs, when ``ops.http`` is set; raise
    OpsServerError when its address cannot be bound."""
    address = settings.ops.address()
    if address is None:
        yield
        return
    health = HealthChecks(
        connection=lambda: gateway.connection, store=core.store, keys=core.pool.keys
    )
    server = OpsServer(
        *address, metrics=core.metrics, health=health, store=core.store, keys=core.pool.keys
    )
    await server.start()
    try:
        yield
    finally:
        await server.stop()


def _instance_lock(settings: Settings) -> InstanceLock:
    """The lock next to the SQLite file: a second bot on the same store refuses to start."""
    path = settings.store.sqlite_path()
    return InstanceLock(path.with_name(path.name + ".lock"))


async def _housekeeping(
    store: Store,
    retention_days: float,
    *,
    hold_minutes: float = 0,
    every_s: float = HOUSEKEEPING_EVERY_S,
    clock: Clock = time.time,
) -> None:
    """Now and then: drop expired dedup marks, turns older than the retention period,
    attachments no question came for, and journaled events that were never accepted."""
    while True:
        try:
            removed = await store.purge_expired()
            pruned = (
                await store.prune_turns(clock() - retention_days * DAY_S) if retention_days else 0
            )
            # Journaled events not accepted by now were turned away (or are too old to answer).
            forgotten = await store.forget_arrivals(before=clock() - ARRIVALS_KEPT_S)
            expired = await store.drop_held(before=clock() - hold_minutes * 60)
            log.debug(
                "housekeeping_done",
                dedup_marks=removed,
                turns=pruned,
                arrivals=forgotten,
                attachments=expired,
            )
        except StoreError as exc:  # a busy or full disk now and then must not stop the bot
            log.error("housekeeping_failed", error=str(exc))
        await asyncio.sleep(every_s)


async def keep_keys_checked(
    pool: KeyPool,
    check: Callable[[str], Awaitable[KeyCheck]],
    every_minutes: float,
    *,
    sleep: Sleep = asyncio.sleep,
    jitter: Callable[[], float] = lambda: random.uniform(0.8, 1.2),
) -> None:
    """Re-check automatically disabled keys at start, then every ``every_minutes`` (jittered,
    so several bots do not all ask at once); those that work again return to the pool."""

    async def works(secret: str) -> bool:
        return (await check(secret)).verdict == "valid"

    while True:
        try:
            revived = await pool.recheck(works)
            log.info("keys_rechecked", revived=revived)
        except StoreError as exc:  # try again at the next round
            log.error("keys_recheck_failed", error=str(exc))
        if every_minutes <= 0:
            return
        await sleep(every_minutes * 60 * jitter())
