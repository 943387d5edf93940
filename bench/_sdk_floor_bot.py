"""The SDK's own ACK floor for bench/ack_floor.py: ``FeishuChannel`` with a handler doing nothing.

Not a product. It opens the long connection exactly as :class:`bot.feishu.gateway.FeishuGateway`
does (the WebSocket client on a loop of its own, no ``permessage-deflate``, the SDK's text
batching off, the GIL switch interval the bot serves with) and hands every message to an empty
handler: what is left between a frame and its ACK is the SDK's (the WebSocket client, the
dispatcher, the typed event, the channel's hand-off to its background loop).

With ``--journal PATH`` every message is first journaled on the WebSocket thread as the bot does
it (:meth:`bot.store.sqlite.SQLiteStore.record_arrival`, same hook, same timeout, a SQLite store
at ``PATH``), so the journal's share of the ACK can be told apart.

Output is JSON lines on stdout (``bot_ready`` once connected); SIGTERM or SIGINT stops it with
exit code 0. Run by the benchmark as ``python -m bench._sdk_floor_bot --domain … --app-id …
--app-secret … [--journal PATH]`` against the test fakes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._reference_bot import emit
from bot import runtime
from bot.feishu import sdk_compat
from bot.feishu.gateway import ARRIVAL_TIMEOUT_S
from bot.store.sqlite import SQLiteStore


def parse_options(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--app-secret", required=True)
    parser.add_argument("--journal", type=Path, help="journal every event in this SQLite store")
    return parser.parse_args(argv)


async def serve(options: argparse.Namespace) -> None:
    """Connect, take messages until SIGTERM or SIGINT, disconnect."""
    from lark_oapi.channel import FeishuChannel, SafetyConfig, TextBatchConfig

    sdk_compat.give_ws_client_its_own_loop()
    sdk_compat.connect_without_compression()
    channel = FeishuChannel(
        app_id=options.app_id,
        app_secret=options.app_secret,
        domain=options.domain,
        safety=SafetyConfig(text_batch=TextBatchConfig(delay_ms=0)),
    )
    store: SQLiteStore | None = None
    if options.journal is not None:
        store = SQLiteStore(options.journal)
        await store.open()
        journal = store

        def record(message_id: str, event: str) -> None:
            if not journal.record_arrival(
                message_id, event, time.time(), timeout_s=ARRIVAL_TIMEOUT_S
            ):
                emit("arrival_not_journaled", message_id=message_id)

        sdk_compat.hook_message_events(channel, record)

    async def ignore(_message: Any) -> None:
        return None

    channel.on("message", ignore)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await channel.start_background(timeout=20)
    runtime.tune_for_serving()
    emit("bot_ready")
    try:
        await stop.wait()
    finally:
        sdk_compat.disable_auto_reconnect(channel.ws_client)
        await channel.stop_background()
        if store is not None:
            await store.close()


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(serve(parse_options(sys.argv[1:] if argv is None else argv)))
    emit("bot_stopped")


if __name__ == "__main__":
    main()
