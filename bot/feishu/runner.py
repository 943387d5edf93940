"""``python -m bot run``: the bot's life from start to a clean exit.

Start: open the core (store, keys, LLM client), connect to Feishu, answer what a previous run
left unanswered. Then serve until SIGINT or SIGTERM (or until the connection is lost for longer
than ``feishu.reconnect_timeout_s``: then exit 1), let answers in progress finish within
``feishu.shutdown_grace_s`` (cutting the rest short with a note in their cards), disconnect,
close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from bot.app import build_core
from bot.config import Settings
from bot.errors import FeishuConnectError
from bot.feishu.gateway import FeishuGateway
from bot.logging import Redactor, get_logger

log = get_logger(__name__)


async def serve(settings: Settings, redactor: Redactor) -> None:
    """Run the Feishu bot until a stop signal; raise FeishuConnectError if it cannot connect."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(number, stop.set)
    core = await build_core(settings, redactor)
    try:
        if not core.pool.keys():
            log.warning("no_api_keys", hint="add llm.keys or OPENAI_API_KEYS, or donate one")
        gateway = FeishuGateway(settings, core)
        await gateway.start()
        try:
            await gateway.resume_inbox()
            log.info("bot_ready", model=settings.llm.model)
            stopping = asyncio.create_task(stop.wait())
            lost = asyncio.create_task(gateway.lost.wait())
            await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            lost.cancel()
            log.info("bot_stopping")
        finally:
            await gateway.stop()
        if gateway.lost.is_set():
            raise FeishuConnectError(gateway.lost_reason)
    finally:
        await core.close()
        for number in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(number)
    log.info("bot_stopped")
