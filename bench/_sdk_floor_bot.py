"""The SDK's own ACK floor for bench/ack_floor.py: its long connection, answering nothing.

Not a product. By default it opens the long connection through ``FeishuChannel`` as the bot
used to before its long connection got a process of its own (the WebSocket client on a loop of
its own, no ``permessage-deflate``, the SDK's text batching off, the GIL switch interval the bot
serves with) and hands every message to an empty handler: what is left between a frame and its
ACK is the SDK's (the WebSocket client, the dispatcher, the typed event, the channel's hand-off
to its background loop).

With ``--raw`` there is no channel: the SDK's bare WebSocket client (``lark_oapi.ws.Client``)
gets an event handler that returns at once, or with ``--journal PATH`` the bot's own
long-connection handler (:class:`bot.feishu.ingress.EventForwarder`), journaling each message
event in the journal file ``PATH`` and passing it on to nobody: the floor of the bot's
long-connection process.

Output is JSON lines on stdout (``bot_ready`` once connected); SIGTERM or SIGINT stops it with
exit code 0. Run by the benchmark as ``python -m bench._sdk_floor_bot --domain … --app-id …
--app-secret … [--raw [--journal PATH]]`` against the test fakes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._reference_bot import emit
from bot import runtime
from bot.feishu import sdk_compat
from bot.feishu.ingress import EventForwarder


def parse_options(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--app-secret", required=True)
    parser.add_argument(
        "--journal", type=Path, help="with --raw: journal every message event in this file"
    )
    parser.add_argument(
        "--raw", action="store_true", help="the bare WebSocket client instead of the channel"
    )
    return parser.parse_args(argv)


class _Ignore:
    """An event handler that returns at once (the ACK is all that is left)."""

    def _do_without_validation(self, payload: bytes) -> None:
        return None


async def serve_raw(options: argparse.Namespace) -> None:
    """Connect the bare WebSocket client, take messages until SIGTERM or SIGINT, disconnect."""
    from lark_oapi.ws import Client

    ws_loop = sdk_compat.give_ws_client_its_own_loop()
    sdk_compat.connect_without_compression()
    handler: Any = _Ignore()
    if options.journal is not None:
        handler = EventForwarder(lambda _message: None, options.journal)
    client = Client(
        options.app_id,
        options.app_secret,
        event_handler=handler,  # type: ignore[arg-type]
        domain=options.domain,
        auto_reconnect=False,
    )
    thread = threading.Thread(target=client.start, name="ws", daemon=True)
    thread.start()
    while client._conn is None:  # what the channel polls for readiness too
        if not thread.is_alive():
            raise RuntimeError("the WebSocket client could not connect")
        await asyncio.sleep(0.05)
    stop = _stop_on_signals()
    runtime.tune_for_serving()
    emit("bot_ready")
    try:
        await stop.wait()
    finally:
        asyncio.run_coroutine_threadsafe(client._disconnect(), ws_loop).result(timeout=5)
        ws_loop.call_soon_threadsafe(ws_loop.stop)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


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

    async def ignore(_message: Any) -> None:
        return None

    channel.on("message", ignore)
    stop = _stop_on_signals()
    await channel.start_background(timeout=20)
    runtime.tune_for_serving()
    emit("bot_ready")
    try:
        await stop.wait()
    finally:
        sdk_compat.disable_auto_reconnect(channel.ws_client)
        await channel.stop_background()


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    asyncio.run(serve_raw(options) if options.raw else serve(options))
    emit("bot_stopped")


if __name__ == "__main__":
    main()
