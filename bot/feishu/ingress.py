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

A process that dies on its own ends the bot's long connection for good: :class:`ChildWsClient`
reports it and the gateway stops the bot (exit 1) for its supervisor to start it again; what
the process had acknowledged is in the journal and answered at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
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


class IngressProcess:
    """The bot's handle on the long-connection process."""

    def __init__(self, process: subprocess.Popen[bytes], connection: Connection) -> None:
        self._process = process
        self._connection = connection
        self._send_lock = threading.Lock()

    @property
    def pid(self) -> int:
        """The process's pid."""
        return self._process.pid

    @classmethod
    def spawn(cls, config: IngressConfig) -> IngressProcess:
        """Start the long-connection process and hand it ``config``; it waits for ``connect``."""
        ours, theirs = socket.socketpair()
        with theirs:
            child = [sys.executable, "-m", "bot.feishu.ingress_child"]
            process = subprocess.Popen(  # noqa: S603 - this interpreter, the bot's own module
                [*child, str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        ingress = cls(process, Connection(ours.detach()))
        ingress.send(CONFIG + json.dumps(asdict(config)).encode())
        log.debug("ingress_started", pid=process.pid)
        return ingress

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
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._connection.close()


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
        self._stopping = False
        self.on_reconnecting: Callable[[], None] = lambda: None
        self.on_reconnected: Callable[[], None] = lambda: None

    def start(self) -> None:
        """Connect through the child, then hand over events until the child is gone.

        The SDK's client retries a first connection that failed for another reason than a
        refusal, saying ``reconnecting`` before it is connected: only the child's ``connected``
        makes the channel see the connection up.
        """
        from lark_oapi.ws.exception import ClientException

        self._ingress.send(CONNECT)
        connected = False
        while (message := self._ingress.receive()) is not None:
            if message == CONNECTED:
                connected = True
                self._conn = self._ingress
            elif message.startswith(REFUSED):
                refusal = json.loads(message[1:])
                raise ClientException(int(refusal["code"]), str(refusal["msg"]))
            else:
                self._take(message)
        self._conn = None
        if self._stopping:
            return
        status = self._ingress.exit_status(wait_s=EXIT_TIMEOUT_S)
        if not connected:
            raise IngressExited(f"the long-connection process ended ({status})")
        log.error("ingress_exited", status=status)
        self._on_exit(status)

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
