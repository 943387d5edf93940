"""The long connection in a process of its own: frames are journaled and acknowledged there.

Why a process: Feishu redelivers an event whose ACK is late, and the SDK writes the ACK only
after the event handler returned, on the WebSocket client's thread. In the bot's process that
thread shares the GIL with the loop answering every conversation, the channel's background loop
and the store's thread: at 200 concurrent conversations its ACK p99 was 0.3-0.5 s, 10-17x the
minimal reference bot's, while the SDK's bare WebSocket client journaling in a process with
nothing else to do stays below the reference (``bench/ack_floor.py``, rows ``ws_journal`` and
``bot``; ``bench/RESULTS.md``).

How: ``python -m bot run`` starts :mod:`bot.feishu.ingress_child` early
(:meth:`IngressProcess.spawn`, which hands it its configuration), so it is ready by the time the
gateway's channel starts its long connection. There it runs the SDK's own WebSocket client
with a handler that journals each message event (:mod:`bot.journal`) and passes the payload to
the bot, before the SDK acknowledges it. In the bot, :class:`ChildWsClient` stands in for the
SDK's WebSocket client inside the ``FeishuChannel`` (see
:func:`bot.feishu.sdk_compat.use_ws_client`): it hands each payload to the channel's dispatcher
exactly as the SDK's client would, so the channel's normalisation, policies and the bot's
handlers work unchanged. The protocol between the two is in :mod:`bot.feishu.ingress_child`.

A process that dies on its own (the out-of-memory killer, a crash) is started again in its
place by :class:`ChildWsClient`, which the channel sees as a reconnect; nothing it had
acknowledged is lost, since it journals an event and passes it on before the SDK acknowledges
it: what it passed on is read to the end first, and the gateway replays the journal once the
new process is started. A process that keeps dying (more than :data:`RESTARTS_PER_WINDOW`
times within :data:`RESTART_WINDOW_S`) ends the bot's long connection for good: the gateway
stops the bot (exit 1) for its supervisor to start it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

from bot.config import Settings
from bot.feishu.ingress_child import (
    CONFIG,
    CONNECT,
    CONNECTED,
    EVENT,
    RECONNECTED,
    RECONNECTING,
    REFUSED,
    STOP,
    receive,
)
from bot.journal import journal_path
from bot.logging import get_logger

log = get_logger(__name__)

#: how long the bot waits for the process to end when asked, or to be gone once its socket is
EXIT_TIMEOUT_S: Final = 5.0
#: how often a process that died on its own is started again within :data:`RESTART_WINDOW_S`
RESTARTS_PER_WINDOW: Final = 3
#: the window of :data:`RESTARTS_PER_WINDOW`, in seconds
RESTART_WINDOW_S: Final = 60.0

#: starts a long-connection process: the process, and the bot's end of its socket
Starter = Callable[[], tuple["subprocess.Popen[bytes]", Connection]]


class IngressExited(Exception):
    """The long-connection process ended before it connected (its exit is in the message)."""


@dataclass(frozen=True)
class IngressConfig:
    """What the long-connection process needs: the app, the domain, the journal's file, and
    how to log (as the bot does)."""

    app_id: str
    app_secret: str = field(repr=False)
    domain: str
    journal: str
    log_level: str = "info"
    log_json: bool = False
    sdk_level: str = "info"

    @classmethod
    def from_settings(cls, settings: Settings, *, log_level: str, log_json: bool) -> IngressConfig:
        """The configuration of the bot's settings (the journal next to the SQLite store) and
        its logging (level and format, which the command line may override)."""
        feishu = settings.feishu
        return cls(
            app_id=feishu.app_id,
            app_secret=feishu.app_secret.get_secret_value(),
            domain=feishu.domain,
            journal=str(journal_path(settings.store.sqlite_path())),
            log_level=log_level,
            log_json=log_json,
            sdk_level=settings.log.sdk_level,
        )


class RestartBudget:
    """How often a long-connection process that died on its own may be started again: at most
    ``limit`` times within any ``window_s`` seconds."""

    def __init__(
        self,
        limit: int = RESTARTS_PER_WINDOW,
        window_s: float = RESTART_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._restarts: deque[float] = deque()

    def take(self) -> bool:
        """Count one restart now; False (and not counted) when the budget is spent."""
        now = self._clock()
        while self._restarts and now - self._restarts[0] >= self._window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self._limit:
            return False
        self._restarts.append(now)
        return True


class IngressProcess:
    """The bot's handle on the long-connection process (the one running now: :meth:`restart`
    replaces a process that ended by a new one)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        connection: Connection,
        *,
        starter: Starter | None = None,
    ) -> None:
        self._process = process
        self._connection = connection
        self._starter = starter
        self._send_lock = threading.Lock()
        self._closed = False

    @property
    def pid(self) -> int:
        """The process's pid."""
        return self._process.pid

    @classmethod
    def spawn(cls, config: IngressConfig) -> IngressProcess:
        """Start the long-connection process and hand it ``config``; it waits for ``connect``."""

        def start() -> tuple[subprocess.Popen[bytes], Connection]:
            return _start_process(config)

        process, connection = start()
        return cls(process, connection, starter=start)

    @property
    def restartable(self) -> bool:
        """Whether :meth:`restart` can start a new process (the handle knows how)."""
        return self._starter is not None

    def restart(self) -> bool:
        """Start a new process in place of the one that ended, with the same configuration;
        False when the handle is closed (the bot is stopping) or cannot start one."""
        with self._send_lock:
            if self._closed or self._starter is None:
                return False
            self._connection.close()
            self._process, self._connection = self._starter()
            return True

    def send(self, message: bytes) -> None:
        """Send one message to the process (any thread); quietly nothing once it is gone."""
        with self._send_lock, contextlib.suppress(OSError):
            self._connection.send_bytes(message)

    def receive(self) -> bytes | None:
        """Block until the process's next message; ``None`` once it is gone."""
        return receive(self._connection)

    def exit_status(self, wait_s: float = 0.0) -> str:
        """How the process ended, for a log line or an error, waiting at most ``wait_s`` for it
        to end (``running`` if it has not)."""
        try:
            code = self._process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return "running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def close(self, timeout_s: float = EXIT_TIMEOUT_S) -> None:
        """Ask the process to stop, wait for it (then kill it), release the socket."""
        self.send(STOP)
        with self._send_lock:
            self._closed = True  # from now on no restart
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._connection.close()


def _start_process(config: IngressConfig) -> tuple[subprocess.Popen[bytes], Connection]:
    """Start ``python -m bot.feishu.ingress_child`` and send it ``config``."""
    ours, theirs = socket.socketpair()
    with theirs:
        child = [sys.executable, "-m", "bot.feishu.ingress_child"]
        process = subprocess.Popen(  # noqa: S603 - this interpreter, the bot's own module
            [*child, str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
    connection = Connection(ours.detach())
    with contextlib.suppress(OSError):  # a process that died at once is seen at its first read
        connection.send_bytes(CONFIG + json.dumps(asdict(config)).encode())
    log.debug("ingress_started", pid=process.pid)
    return process, connection


class ChildWsClient:
    """Stands in for ``lark_oapi.ws.Client`` inside the ``FeishuChannel``: the connection is the
    child's; this hands what it receives to the channel's dispatcher.

    The channel builds it with the SDK client's arguments and calls :meth:`start` on its start
    thread (blocking, as the SDK's does) and :meth:`stop` when it stops; it polls ``_conn`` to
    learn that the connection is up. A child that dies on its own after connecting is started
    again (within ``restarts``; the channel hears ``reconnecting``, then ``reconnected``, and
    ``on_restarted()`` is called once the new child is asked to connect); when the budget is
    spent, or the new child is refused, ``on_exit(status)`` is called and :meth:`start` returns.
    """

    def __init__(
        self,
        ingress: IngressProcess,
        on_exit: Callable[[str], None],
        *_: Any,
        event_handler: Any,
        on_restarted: Callable[[], None] = lambda: None,
        restarts: RestartBudget | None = None,
        **__: Any,
    ) -> None:
        self._ingress = ingress
        self._on_exit = on_exit
        self._on_restarted = on_restarted
        self._restarts = restarts or RestartBudget()
        self._event_handler = event_handler
        self._conn: object | None = None  # read by the channel: not None once connected
        self._stopping = False
        self.on_reconnecting: Callable[[], None] = lambda: None
        self.on_reconnected: Callable[[], None] = lambda: None

    def start(self) -> None:
        """Connect through the child, then hand over events until it is gone for good.

        The SDK's client retries a first connection that failed for another reason than a
        refusal, saying ``reconnecting`` before it is connected: only the child's ``connected``
        makes the channel see the connection up.
        """
        self._ingress.send(CONNECT)
        connected_once = False
        while True:
            refusal = self._relay(first=not connected_once)
            connected_once = connected_once or self._conn is not None
            self._conn = None
            if self._stopping:
                return
            status = refusal or self._ingress.exit_status(wait_s=EXIT_TIMEOUT_S)
            if not connected_once:
                raise IngressExited(f"the long-connection process ended ({status})")
            if refusal is not None or not self._ingress.restartable or not self._restarts.take():
                log.error("ingress_exited", status=status)
                self._on_exit(status)
                return
            log.warning("ingress_restarted", status=status)
            self.on_reconnecting()
            if not self._ingress.restart():  # closed meanwhile: the bot is stopping
                return
            self._ingress.send(CONNECT)
            self._on_restarted()

    def _relay(self, *, first: bool) -> str | None:
        """Hand over what the current child sends until it is gone; return why it was refused
        (``None``: it was not). A refusal of the first connection raises the SDK's exception."""
        from lark_oapi.ws.exception import ClientException

        while (message := self._ingress.receive()) is not None:
            if message == CONNECTED:
                self._conn = self._ingress
                if not first:
                    self.on_reconnected()
            elif message.startswith(REFUSED):
                refusal = json.loads(message[1:])
                if first:
                    raise ClientException(int(refusal["code"]), str(refusal["msg"]))
                return f"Feishu refused its connection: {refusal['msg']} (code {refusal['code']})"
            else:
                self._take(message)
        return None

    def stop(self) -> None:
        """Ask the child to disconnect and end (the channel's stop calls this)."""
        self._stopping = True
        self._ingress.send(STOP)

    def _take(self, message: bytes) -> None:
        tag, body = message[:1], message[1:]
        try:
            if tag == EVENT:
                self._event_handler._do_without_validation(body)
            elif tag == RECONNECTING:
                self.on_reconnecting()
            elif tag == RECONNECTED:
                self.on_reconnected()
        except Exception as exc:  # one bad event must not stop the others
            log.error("event_not_handled", error=f"{type(exc).__name__}: {exc}")
