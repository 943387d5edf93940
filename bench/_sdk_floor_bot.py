"""The SDK's own ACK floor for bench/ack_floor.py: its long connection, answering nothing.

Not a product. By default it opens the long connection through ``FeishuChannel`` as the bot
used to before its long connection got a process of its own (the WebSocket client on a loop of
its own, no ``permessage-deflate``, the SDK's text batching off, the GIL switch interval the bot
serves with) and hands every message to an empty handler: what is left between a frame and its
ACK is the SDK's (the WebSocket client, the dispatcher, the typed event, the channel's hand-off
to its background loop).

With ``--raw`` there is no channel: the SDK's bare WebSocket client (``lark_oapi.ws.Client``)
gets an event handler that returns at once; with ``--raw --journal PATH`` it is the bot's own
long-connection process (:mod:`bot.feishu.ingress_child`, journaling each message event in the
journal file ``PATH``), whose events this process takes and drops: that process's floor.

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
from bot.feishu.ingress import ChildWsClient, IngressConfig, IngressProcess


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
    client = Client(
        options.app_id,
        options.app_secret,
        event_handler=_Ignore(),  # type: ignore[arg-type]
        domain=options.domain,
        auto_reconnect=False,
    )
    await _serve_client(client)
    asyncio.run_coroutine_threadsafe(client._disconnect(), ws_loop).result(timeout=5)
    ws_loop.call_soon_threadsafe(ws_loop.stop)


async def serve_ingress(options: argparse.Namespace) -> None:
    """The bot's own long-connection process, its events handed to nobody, until a signal."""
    ingress = IngressProcess.spawn(
        IngressConfig(options.app_id, options.app_secret, options.domain, str(options.journal))
    )
    client = ChildWsClient(ingress, lambda _status: None, event_handler=_Ignore())
    try:
        await _serve_client(client)
    finally:
        client.stop()
        ingress.close()


async def _serve_client(client: Any) -> None:
    """Run ``client.start`` on a thread until it is connected, then until SIGTERM or SIGINT."""
    thread = threading.Thread(target=client.start, name="ws", daemon=True)
    thread.start()
    while client._conn is None:  # what the channel polls for readiness too
        if not thread.is_alive():
            raise RuntimeError("the WebSocket client could not connect")
        await asyncio.sleep(0.05)
    stop = _stop_on_signals()
    runtime.tune_for_serving()
    emit("bot_ready")
    await stop.wait()


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
    if options.raw:
        asyncio.run(serve_raw(options) if options.journal is None else serve_ingress(options))
    else:
        asyncio.run(serve(options))
    emit("bot_stopped")


if __name__ == "__main__":
    main()
