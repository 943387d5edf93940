"""The long-connection process itself: ``python -m bot.feishu.ingress_child FD BOT_PID``.

Started by :class:`bot.feishu.ingress.IngressProcess` (read that module first); ``FD`` is its
end of a socket pair to the bot, ``BOT_PID`` the bot's pid. It runs the SDK's own WebSocket
client (``lark_oapi.ws.Client``: endpoint discovery, pings, reconnects, fragments) with
:class:`EventForwarder` as its event handler, which journals every message event
(:mod:`bot.journal`) and passes every event's payload to the bot, before the SDK acknowledges
it.

It imports as little as it can: the SDK's WebSocket client without the rest of the SDK
(:func:`bot.feishu.sdk_compat.import_ws_client_alone`), no settings models, no store; so it
starts in a fraction of a second and holds about 25 MiB of its own (40 MiB resident).

Over the socket, each message is one ``multiprocessing.connection`` frame: a tag byte, then the
body. From the bot: :data:`CONFIG` (JSON: the app, the domain, the journal's file, logging),
then :data:`CONNECT` or :data:`STOP`. To the bot: :data:`CONNECTED`, :data:`REFUSED` (JSON
``{code, msg}`` of the SDK's ``ClientException``), :data:`EVENT` with a payload,
:data:`RECONNECTING`, :data:`RECONNECTED`.

Lifetimes: it ends when the bot says :data:`STOP`, when the bot's end of the socket closes, and
when the bot dies, even by ``kill -9`` (``PR_SET_PDEATHSIG``); it ignores SIGINT and SIGTERM,
which a terminal's Ctrl-C and ``systemctl stop`` send to every process of the bot, so the bot's
graceful stop decides when the connection ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import orjson

from bot.feishu import sdk_compat
from bot.journal import ARRIVAL_TIMEOUT_S, ArrivalJournal
from bot.logging import configure_logging, get_logger, quiet_sdk_shutdown

log = get_logger(__name__)

CONFIG: Final = b"c"
CONNECT: Final = b"connect"
STOP: Final = b"stop"
CONNECTED: Final = b"C"
REFUSED: Final = b"F"
EVENT: Final = b"E"
RECONNECTING: Final = b"R"
RECONNECTED: Final = b"r"

MESSAGE_EVENT: Final = "im.message.receive_v1"
#: how often the process looks whether the SDK's client has connected (what the channel polls)
READY_POLL_S: Final = 0.01
#: how long a stopping process may take to close the connection
DISCONNECT_TIMEOUT_S: Final = 3.0
_PR_SET_PDEATHSIG: Final = 1


class EventForwarder:
    """What the SDK's WebSocket client calls for every event frame in the long-connection
    process, before its ACK: journal a message event, pass the payload on with ``send``."""

    def __init__(self, send: Callable[[bytes], None], journal_file: Path) -> None:
        self._send = send
        self._journal_file = journal_file
        self._journal: ArrivalJournal | None = None  # opened at the first message

    def _do_without_validation(self, payload: bytes) -> None:
        """Journal, then pass on; the SDK acknowledges the frame when this returns (and answers
        it with an error, so that Feishu sends it again, when the bot is gone and ``send``
        raises)."""
        message_id = message_id_of(payload)
        if message_id is not None and not self._record(message_id, payload):
            # Acknowledged all the same (Feishu would only send it again): say what was not kept.
            log.warning("arrival_not_journaled", message_id=message_id)
        self._send(EVENT + payload)

    def _record(self, message_id: str, payload: bytes) -> bool:
        try:
            if self._journal is None:
                self._journal = ArrivalJournal.open(
                    self._journal_file, busy_timeout_s=ARRIVAL_TIMEOUT_S
                )
            event = payload.decode("utf-8")
        except (OSError, sqlite3.Error, UnicodeDecodeError) as exc:
            log.warning("arrival_journal_unavailable", error=repr(exc))
            return False
        return self._journal.record(message_id, event, time.time(), timeout_s=ARRIVAL_TIMEOUT_S)


def message_id_of(payload: bytes) -> str | None:
    """The message id of an ``im.message.receive_v1`` envelope; ``None`` for other events."""
    try:
        envelope = orjson.loads(payload)
        if envelope.get("header", {}).get("event_type") != MESSAGE_EVENT:
            return None
        message_id = envelope["event"]["message"]["message_id"]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return None
    return str(message_id) if message_id else None


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - run as a process
    """The process's life: take the configuration, wait for ``connect``, run the client until
    ``stop`` or the bot's end closes."""
    try:
        _live(argv or sys.argv[1:])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no interpreter shutdown under the SDK's running threads


def _live(argv: Sequence[str]) -> None:  # pragma: no cover - run as a process
    fd, bot_pid = (int(value) for value in argv)
    _die_with(bot_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    connection = Connection(socket.socket(fileno=fd).detach())
    lock = threading.Lock()

    def send(message: bytes) -> None:
        with lock:
            connection.send_bytes(message)

    first = receive(connection)
    if first is None or not first.startswith(CONFIG):
        return
    config = json.loads(first[1:])
    configure_logging(
        level=config["log_level"],
        json=config["log_json"],
        sdk_level=config["sdk_level"],
        secrets=[config["app_secret"]],
    )
    if receive(connection) == CONNECT:
        _serve(connection, send, config)


def _serve(
    connection: Connection, send: Callable[[bytes], None], config: dict[str, Any]
) -> None:  # pragma: no cover - run as a process
    ws = sdk_compat.import_ws_client_alone()
    from lark_oapi.core.enum import LogLevel

    ws_loop = sdk_compat.give_ws_client_its_own_loop()
    sdk_compat.connect_without_compression()
    client = ws.Client(
        config["app_id"],
        config["app_secret"],
        log_level=LogLevel.DEBUG if config["sdk_level"] == "debug" else LogLevel.INFO,
        event_handler=EventForwarder(send, Path(config["journal"])),
        domain=config["domain"],
        auto_reconnect=True,
    )
    client.on_reconnecting = lambda: send(RECONNECTING)
    client.on_reconnected = lambda: send(RECONNECTED)

    def run() -> None:
        """The SDK's client; it returns only when it could not connect (or gave up)."""
        code = 1
        try:
            client.start()
        except ws.ClientException as exc:
            send(REFUSED + json.dumps({"code": exc.code, "msg": str(exc.args[0])}).encode())
            code = 0
        except BaseException as exc:
            log.error("ingress_connection_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            sys.stderr.flush()
            os._exit(code)  # the bot sees its end of the socket close

    threading.Thread(target=run, name="ingress-ws", daemon=True).start()
    threading.Thread(target=_report_ready, args=(client, send), daemon=True).start()
    receive(connection)  # until ``stop`` or the bot's end closes
    quiet_sdk_shutdown()
    sdk_compat.disable_auto_reconnect(client)
    if ws_loop.is_running():
        with contextlib.suppress(Exception):
            sdk_compat.schedule_disconnect(client, ws_loop).result(timeout=DISCONNECT_TIMEOUT_S)


def _report_ready(client: Any, send: Callable[[bytes], None]) -> None:  # pragma: no cover
    while getattr(client, "_conn", None) is None:
        time.sleep(READY_POLL_S)
    with contextlib.suppress(OSError):
        send(CONNECTED)


def receive(connection: Connection) -> bytes | None:
    """Block until the other end's next message; ``None`` once it is gone."""
    try:
        return connection.recv_bytes()
    except (EOFError, OSError):
        return None


def _die_with(bot_pid: int) -> None:  # pragma: no cover - Linux only, run as a process
    """Have the kernel kill this process when the bot dies, even by ``kill -9``."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != bot_pid:  # the bot died before the line above
        os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
