"""``python -m bot run``: the bot's life from start to a clean exit.

Start: open the core (store, keys, LLM client), connect to Feishu, answer what a previous run
left unanswered. Then serve until SIGINT or SIGTERM (or until the connection is lost for longer
than ``feishu.reconnect_timeout_s``: then exit 1), let answers in progress finish within
``feishu.shutdown_grace_s`` (cutting the rest short with a note in their cards), disconnect,
close the store.
"""

from __future__ import annotations

import asyncio
import signal

from bot import signals
from bot.app import build_core
from bot.config import Settings
from bot.errors import FeishuConnectError
from bot.feishu.gateway import FeishuGateway
from bot.logging import Redactor, get_logger
from bot.store import Store

log = get_logger(__name__)

PURGE_EVERY_S = 3600.0


async def serve(settings: Settings, redactor: Redactor) -> None:
    """Run the Feishu bot until a stop signal; raise FeishuConnectError if it cannot connect."""
    stop = asyncio.Event()
    with signals.handling([signal.SIGINT, signal.SIGTERM], stop.set):
        core = await build_core(settings, redactor)
        try:
            if not core.pool.keys():
                log.warning("no_api_keys", hint="add llm.keys or OPENAI_API_KEYS")
            gateway = FeishuGateway(settings, core, on_lost=stop.set)
            await gateway.start()
            housekeeping = asyncio.create_task(_purge_expired_marks(core.store))
            try:
                await gateway.resume_inbox()
                log.info("bot_ready", model=settings.llm.model)
                await stop.wait()
                log.info("bot_stopping")
            finally:
                housekeeping.cancel()
                await gateway.stop()
            if gateway.lost_reason:
                raise FeishuConnectError(gateway.lost_reason)
        finally:
            await core.close()
    log.info("bot_stopped")


async def _purge_expired_marks(store: Store, every_s: float = PURGE_EVERY_S) -> None:
    """Drop expired dedup marks now and then, so the store does not grow with every message."""
    while True:
        removed = await store.purge_expired()
        log.debug("dedup_marks_purged", removed=removed)
        await asyncio.sleep(every_s)
