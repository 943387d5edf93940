"""The long connection in a process of its own: frames are journaled and acknowledged there.

Why a process: Feishu redelivers an event whose ACK is late, and the SDK writes the ACK only
after the event handler returned, on the WebSocket client's thread. In the bot's process that
thread shares the GIL with the loop answering every conversation, the channel's background loop
and the store's thread: at 200 concurrent conversations its ACK p99 was 0.3-0.5 s, 10-17x the
minimal reference bot's, while the SDK's bare WebSocket client journaling in a process with
nothing else to do stays below the reference (``bench/ack_floor.py``, rows ``ws_journal`` and
``bot``; ``bench/RESULTS.md``).

How: ``python -m bot run`` calls :meth:`IngressProcess.fork` early, while the process has one
thread (forking a process with threads can leave the child waiting forever on a lock another
thread held), so the child shares the imported SDK with the bot instead of importing it again.
The child waits until the gateway's channel starts its long connection, then runs the SDK's
own ``lark_oapi.ws.Client`` (endpoint discovery, pings, reconnects, fragments) with a handler
that, for each event frame, journals a message event (:mod:`bot.store.journal`) and passes the
payload to the bot, before the SDK acknowledges it. In the bot, :class:`ChildWsClient` stands
in for the SDK's WebSocket client inside the ``FeishuChannel`` (see
:func:`bot.feishu.sdk_compat.use_ws_client`): it hands each payload to the channel's
dispatcher exactly as the SDK's client would, so the channel's normalisation, policies and the
bot's handlers work unchanged.

Over a socket pair, each message is one ``multiprocessing.connection`` frame: a tag byte, then
the body. To the child: ``connect``, ``stop``. To the bot: ``C`` connected, ``F`` the connection
was refused (JSON ``{code, msg}`` of the SDK's ``ClientException``), ``E`` an event payload,
``R`` reconnecting, ``r`` reconnected.

Lifetimes: the child ends when asked (``stop``), when the bot's end of the socket closes, and
when the bot dies, even by ``kill -9`` (``PR_SET_PDEATHSIG``); it ignores SIGINT and SIGTERM,
which a terminal's Ctrl-C and ``systemctl stop`` send to every process of the bot, so the bot's
graceful stop decides when the connection ends. A child that dies on its own
ends the bot's long connection for good: :class:`ChildWsClient` reports it and the gateway
stops the bot (exit 1), since a process with threads cannot safely fork a new one; what the
child acknowledged is in the journal and answered at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, NoReturn

import orjson

from bot.config import Settings
from bot.logging import adopt_sdk_logger, get_logger, quiet_sdk_shutdown
from bot.store.journal import ARRIVAL_TIMEOUT_S, ArrivalJournal, journal_path

log = get_logger(__name__)

#: how often the child looks whether the SDK's client has connected (what the channel polls)
READY_POLL_S: Final = 0.01
#: how long a stopping child may take to close the connection
DISCONNECT_TIMEOUT_S: Final = 3.0
#: how long :meth:`IngressProcess.close` waits for the child before killing it
EXIT_TIMEOUT_S: Final = 5.0
MESSAGE_EVENT: Final = "im.message.receive_v1"

_CONNECT: Final = b"connect"
_STOP: Final = b"stop"
_CONNECTED: Final = b"C"
_REFUSED: Final = b"F"
_EVENT: Final = b"E"
_RECONNECTING: Final = b"R"
_RECONNECTED: Final = b"r"
_PR_SET_PDEATHSIG: Final = 1


class IngressExited(Exception):
    """The long-connection process ended before it connected (its exit is in the message)."""


@dataclass(frozen=True)
class IngressConfig:
    """What the long-connection process needs: the app, the domain and the journal's file."""

    app_id: str
    app_secret: str = field(repr=False)
    domain: str
    journal: Path
    sdk_debug: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> IngressConfig:
        """The configuration of the bot's settings (the journal next to the SQLite store)."""
        feishu = settings.feishu
        return cls(
            app_id=feishu.app_id,
            app_secret=feishu.app_secret.get_secret_value(),
            domain=feishu.domain,
            journal=journal_path(settings.store.sqlite_path()),
            sdk_debug=settings.log.sdk_level == "debug",
        )


class IngressProcess:
    """The bot's handle on the forked long-connection process."""

    def __init__(self, pid: int, connection: Connection) -> None:
        self.pid = pid
        self._connection = connection
        self._send_lock = threading.Lock()
        self._status: int | None = None

    @classmethod
    def fork(cls, config: IngressConfig) -> IngressProcess:
        """Fork the long-connection process; call while this process has a single thread."""
        if threading.active_count() != 1:
            raise RuntimeError("fork the long-connection process before any thread starts")
        ours, theirs = socket.socketpair()
        for end in (ours, theirs):  # a burst must not wait for the bot to read (kernel caps it)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.collect()
        gc.freeze()  # the child's collections leave the shared heap alone: its pages stay shared
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is the end-to-end tests'
            ours.close()
            _child_main(Connection(theirs.detach()), config)
        theirs.close()
        log.debug("ingress_forked", pid=pid)
        return cls(pid, Connection(ours.detach()))

    def send(self, message: bytes) -> None:
        """Send one message to the child (any thread); quietly nothing once it is gone."""
        with self._send_lock, contextlib.suppress(OSError):
            self._connection.send_bytes(message)

    def receive(self) -> bytes | None:
        """Block until the child's next message; ``None`` once it is gone."""
        try:
            return self._connection.recv_bytes()
        except (EOFError, OSError):
            return None

    def exit_status(self, wait_s: float = 0.0) -> str:
        """How the child ended, for a log line or an error, waiting at most ``wait_s`` for it
        to end (``running`` if it has not)."""
        status = self._wait(wait_s)
        if status is None:
            return "running"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit code {os.waitstatus_to_exitcode(status)}"

    def close(self, timeout_s: float = EXIT_TIMEOUT_S) -> None:
        """Ask the child to stop, wait for it (then kill it), release the socket."""
        self.send(_STOP)
        if self._wait(timeout_s) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap(block=True)
        self._connection.close()

    def _wait(self, timeout_s: float) -> int | None:
        """The child's wait status once it ended within ``timeout_s``; ``None`` if it runs on."""
        if self._reap(block=False) is None and timeout_s > 0:
            try:
                ended = os.pidfd_open(self.pid)  # readable once the process has ended
            except OSError:  # not our child, or already reaped
                return self._reap(block=False)
            try:
                select.select([ended], [], [], timeout_s)
            finally:
                os.close(ended)
        return self._reap(block=False)

    def _reap(self, *, block: bool) -> int | None:
        if self._status is None:
            try:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return self._status
            if pid:
                self._status = status
        return self._status


class ChildWsClient:
    """Stands in for ``lark_oapi.ws.Client`` inside the ``FeishuChannel``: the connection is the
    child's; this hands what it receives to the channel's dispatcher.

    The channel builds it with the SDK client's arguments and calls :meth:`start` on its start
    thread (blocking, as the SDK's does) and :meth:`stop` when it stops; it polls ``_conn`` to
    learn that the connection is up. ``on_exit(status)`` is called when the child dies on its
    own after connecting.
    """

    def __init__(
        self,
        ingress: IngressProcess,
        on_exit: Callable[[str], None],
        *_: Any,
        event_handler: Any,
        **__: Any,
    ) -> None:
        self._ingress = ingress
        self._on_exit = on_exit
        self._event_handler = event_handler
        self._conn: object | None = None  # read by the channel: not None once connected
        self._auto_reconnect = True  # cleared by sdk_compat.disable_auto_reconnect; unused here
        self._stopping = False
        self.on_reconnecting: Callable[[], None] = lambda: None
        self.on_reconnected: Callable[[], None] = lambda: None

    def start(self) -> None:
        """Connect through the child, then hand over events until the child is gone."""
        self._ingress.send(_CONNECT)
        first = self._ingress.receive()
        if first is None:
            status = self._ingress.exit_status(wait_s=EXIT_TIMEOUT_S)
            raise IngressExited(f"the long-connection process ended ({status})")
        if first.startswith(_REFUSED):
            from lark_oapi.ws.exception import ClientException

            refusal = json.loads(first[1:])
            raise ClientException(int(refusal["code"]), str(refusal["msg"]))
        self._conn = self._ingress
        while (message := self._ingress.receive()) is not None:
            self._take(message)
        self._conn = None
        if not self._stopping:
            status = self._ingress.exit_status(wait_s=EXIT_TIMEOUT_S)
            log.error("ingress_exited", status=status)
            self._on_exit(status)

    def stop(self) -> None:
        """Ask the child to disconnect and end (the channel's stop calls this)."""
        self._stopping = True
        self._ingress.send(_STOP)

    def _take(self, message: bytes) -> None:
        tag, body = message[:1], message[1:]
        try:
            if tag == _EVENT:
                self._event_handler._do_without_validation(body)
            elif tag == _RECONNECTING:
                self.on_reconnecting()
            elif tag == _RECONNECTED:
                self.on_reconnected()
        except Exception as exc:  # one bad event must not stop the others
            log.error("event_not_handled", error=f"{type(exc).__name__}: {exc}")


# ---- the child -------------------------------------------------------------------------------


class EventForwarder:
    """What the SDK's WebSocket client calls for every event frame in the long-connection
    process, before its ACK: journal a message event, pass the payload on with ``send``."""

    def __init__(self, send: Callable[[bytes], None], journal_file: Path) -> None:
        self._send = send
        self._journal_file = journal_file
        self._journal: ArrivalJournal | None = None  # opened at the first message

    def _do_without_validation(self, payload: bytes) -> None:
        message_id = _message_id(payload)
        if message_id is not None and not self._record(message_id, payload):
            # Acknowledged all the same (Feishu would only send it again): say what was not kept.
            log.warning("arrival_not_journaled", message_id=message_id)
        self._send(_EVENT + payload)

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


def _message_id(payload: bytes) -> str | None:
    """The message id of an ``im.message.receive_v1`` envelope; ``None`` for other events."""
    try:
        envelope = orjson.loads(payload)
        if envelope.get("header", {}).get("event_type") != MESSAGE_EVENT:
            return None
        message_id = envelope["event"]["message"]["message_id"]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return None
    return str(message_id) if message_id else None


def _child_main(connection: Connection, config: IngressConfig) -> NoReturn:  # pragma: no cover
    """The child's life: wait for ``connect``, run the SDK's client until ``stop`` or EOF."""
    code = 1
    try:
        _die_with_parent()
        # Ctrl-C reaches the whole process group, and `systemctl stop` signals every process of
        # the service: the bot decides when its connection ends (after its grace period).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lock = threading.Lock()

        def send(message: bytes) -> None:
            with lock:
                connection.send_bytes(message)

        command = _receive(connection)
        if command == _CONNECT:
            _serve(connection, send, config)
        code = 0
    except BaseException as exc:
        with contextlib.suppress(Exception):
            log.error("ingress_failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve(
    connection: Connection, send: Callable[[bytes], None], config: IngressConfig
) -> None:  # pragma: no cover - run in the child
    from lark_oapi.core.enum import LogLevel
    from lark_oapi.ws import Client
    from lark_oapi.ws.exception import ClientException

    from bot.feishu import sdk_compat

    ws_loop = sdk_compat.give_ws_client_its_own_loop()
    sdk_compat.connect_without_compression()
    adopt_sdk_logger()
    client = Client(
        config.app_id,
        config.app_secret,
        log_level=LogLevel.DEBUG if config.sdk_debug else LogLevel.INFO,
        event_handler=EventForwarder(send, config.journal),
        domain=config.domain,
        auto_reconnect=True,
    )
    client.on_reconnecting = lambda: send(_RECONNECTING)
    client.on_reconnected = lambda: send(_RECONNECTED)

    def run() -> None:
        """The SDK's client; it returns only when it could not connect (or gave up)."""
        code = 1
        try:
            client.start()
        except ClientException as exc:
            send(_REFUSED + json.dumps({"code": exc.code, "msg": str(exc.args[0])}).encode())
            code = 0
        except BaseException as exc:
            log.error("ingress_connection_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            sys.stderr.flush()
            os._exit(code)  # the bot sees its end of the socket close

    threading.Thread(target=run, name="ingress-ws", daemon=True).start()
    threading.Thread(target=_report_ready, args=(client, send), daemon=True).start()
    _receive(connection)  # until ``stop`` or the bot's end closes
    quiet_sdk_shutdown()
    sdk_compat.disable_auto_reconnect(client)
    if ws_loop.is_running():
        with contextlib.suppress(Exception):
            sdk_compat.schedule_disconnect(client, ws_loop).result(timeout=DISCONNECT_TIMEOUT_S)


def _report_ready(client: Any, send: Callable[[bytes], None]) -> None:  # pragma: no cover
    while getattr(client, "_conn", None) is None:
        time.sleep(READY_POLL_S)
    with contextlib.suppress(OSError):
        send(_CONNECTED)


def _receive(connection: Connection) -> bytes | None:
    try:
        return connection.recv_bytes()
    except (EOFError, OSError):
        return None


def _die_with_parent() -> None:  # pragma: no cover - Linux only, run in the child
    """Have the kernel kill this process when the bot dies, even by ``kill -9``."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the bot died before the line above
        os._exit(0)
