"""The bot's side of the long-connection process (bot/feishu/ingress.py), over a real socket.

A thread plays the child's part of the protocol; the end-to-end tests (test_e2e_ingress.py)
run the real forked process.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import structlog
from lark_oapi.ws.exception import ClientException

from bot.config import Settings
from bot.feishu.ingress import (
    ChildWsClient,
    IngressConfig,
    IngressExited,
    IngressProcess,
    RestartBudget,
)
from bot.feishu.ingress_child import EventForwarder, message_id_of
from tests.helpers import run_python

SAMPLES = Path(__file__).parent / "fakes" / "samples"


def sample(name: str) -> bytes:
    return (SAMPLES / f"{name}.json").read_bytes()


class Dispatcher:
    """Records what the stand-in hands to the channel's dispatcher."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.payloads: list[bytes] = []
        self.arrived = threading.Event()
        self._fail_on = fail_on

    def _do_without_validation(self, payload: bytes) -> None:
        if payload == self._fail_on:
            raise ValueError("no processor for this event")
        self.payloads.append(payload)
        self.arrived.set()


class Peer:
    """The process's end of the socket, played by the test, with a stand-in process that ends
    when the peer closes (as the real one closes its end by ending)."""

    def __init__(self, connection: Connection, process: subprocess.Popen[bytes]) -> None:
        self.connection = connection
        self._process = process

    def send(self, message: bytes) -> None:
        self.connection.send_bytes(message)

    def receive(self) -> bytes:
        return self.connection.recv_bytes()

    def die(self) -> None:
        """The stand-in process dies as a killed long-connection process does."""
        self._process.kill()
        self._process.wait()
        self.connection.close()

    def close(self) -> None:
        self.connection.close()
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()  # the stand-in ends with 0


@pytest.fixture
def pair() -> Iterator[tuple[IngressProcess, Peer]]:
    ours, theirs = socket.socketpair()
    stand_in_process = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    ingress = IngressProcess(stand_in_process, Connection(ours.detach()))
    peer = Peer(Connection(theirs.detach()), stand_in_process)
    yield ingress, peer
    peer.close()
    ingress.close()


class Restartable:
    """An :class:`IngressProcess` that starts a new stand-in process (and its peer) each time
    it is restarted, as the real one starts a new long-connection process."""

    def __init__(self) -> None:
        self.peers: queue.Queue[Peer] = queue.Queue()
        self._all: list[tuple[IngressProcess, Peer]] = []
        process, connection = self._start()
        self.ingress = IngressProcess(process, connection, starter=self._start)

    def _start(self) -> tuple[subprocess.Popen[bytes], Connection]:
        ours, theirs = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        self.peers.put(Peer(Connection(theirs.detach()), process))
        return process, Connection(ours.detach())

    def next_peer(self) -> Peer:
        """The peer of the process started next (or already started), in start order."""
        peer = self.peers.get(timeout=5)
        self._all.append((self.ingress, peer))
        return peer

    def close(self) -> None:
        for _, peer in self._all:
            peer.close()
        self.ingress.close()


@pytest.fixture
def restartable() -> Iterator[Restartable]:
    handle = Restartable()
    yield handle
    handle.close()


def run_client(client: ChildWsClient) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            client.start()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread, errors


def stop_as_the_channel_does(client: ChildWsClient, peer: Peer, thread: threading.Thread) -> None:
    """The channel's stop: the process is asked to stop and ends; ``start`` returns."""
    client.stop()
    assert peer.receive() == b"stop"
    peer.close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def stand_in(
    ingress: IngressProcess,
    dispatcher: Dispatcher,
    exits: list[str],
    *,
    restarts: RestartBudget | None = None,
    on_restarted: Callable[[], None] = lambda: None,
) -> ChildWsClient:
    # Called the way the channel calls the SDK's client (the gateway adds on_restarted).
    return ChildWsClient(
        ingress,
        exits.append,
        "cli_app",
        "secret",
        log_level=None,
        event_handler=dispatcher,
        domain="http://127.0.0.1:1",
        auto_reconnect=True,
        on_restarted=on_restarted,
        restarts=restarts,
    )


def test_a_process_that_dies_is_started_again_and_the_channel_hears_a_reconnect(
    restartable: Restartable,
) -> None:
    dispatcher, exits, signals, restarted = Dispatcher(), [], [], threading.Event()
    client = stand_in(restartable.ingress, dispatcher, exits, on_restarted=restarted.set)
    client.on_reconnecting = lambda: signals.append("reconnecting")
    client.on_reconnected = lambda: signals.append("reconnected")
    thread, errors = run_client(client)
    first = restartable.next_peer()
    assert first.receive() == b"connect"
    first.send(b"C")
    first.send(b"E" + sample("p2p_text"))
    first.die()  # what it sent before it died is handed over first
    second = restartable.next_peer()
    assert second.receive() == b"connect"  # the new process, asked to connect
    assert restarted.wait(5)
    assert client._conn is None  # not connected until the new process says so
    second.send(b"C")
    second.send(b"E" + sample("p2p_post"))
    stop_as_the_channel_does(client, second, thread)
    assert errors == []
    assert exits == []
    assert dispatcher.payloads == [sample("p2p_text"), sample("p2p_post")]
    assert signals == ["reconnecting", "reconnected"]


def test_a_process_that_keeps_dying_ends_the_connection_once_the_restarts_are_spent(
    restartable: Restartable,
) -> None:
    exits: list[str] = []
    budget = RestartBudget(limit=2, window_s=60, clock=lambda: 0.0)
    with structlog.testing.capture_logs() as logs:
        thread, errors = run_client(
            stand_in(restartable.ingress, Dispatcher(), exits, restarts=budget)
        )
        for _ in range(3):  # the first process and two restarts
            peer = restartable.next_peer()
            assert peer.receive() == b"connect"
            peer.send(b"C")
            peer.die()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert errors == []
    assert exits == ["killed by signal 9"]
    assert [entry["event"] for entry in logs if entry["event"].startswith("ingress_")] == [
        "ingress_restarted",
        "ingress_restarted",
        "ingress_exited",
    ]
    assert restartable.peers.empty()  # no fourth process


def test_a_new_process_that_feishu_refuses_ends_the_connection_with_the_reason(
    restartable: Restartable,
) -> None:
    exits: list[str] = []
    thread, errors = run_client(stand_in(restartable.ingress, Dispatcher(), exits))
    first = restartable.next_peer()
    assert first.receive() == b"connect"
    first.send(b"C")
    first.die()
    second = restartable.next_peer()
    assert second.receive() == b"connect"
    second.send(b"F" + json.dumps({"code": 1000040351, "msg": "app not found"}).encode())
    thread.join(timeout=5)
    assert errors == []
    assert exits == ["Feishu refused its connection: app not found (code 1000040351)"]


def test_a_closed_handle_starts_no_new_process(restartable: Restartable) -> None:
    restartable.next_peer()
    restartable.ingress.close()
    assert not restartable.ingress.restart()
    assert restartable.peers.empty()


def test_the_restart_budget_counts_the_restarts_of_the_last_window() -> None:
    now = [0.0]
    budget = RestartBudget(limit=2, window_s=60, clock=lambda: now[0])
    assert budget.take()
    now[0] = 30
    assert budget.take()
    assert not budget.take()  # a third within 60 s
    now[0] = 60  # the first has left the window
    assert budget.take()
    assert not budget.take()
    now[0] = 200
    assert budget.take()


def test_events_reach_the_channels_dispatcher_in_order_with_the_reconnect_signals(
    pair: tuple[IngressProcess, Peer],
) -> None:
    ingress, peer = pair
    dispatcher, exits, signals = Dispatcher(), [], []
    client = stand_in(ingress, dispatcher, exits)
    client.on_reconnecting = lambda: signals.append("reconnecting")
    client.on_reconnected = lambda: signals.append("reconnected")
    thread, errors = run_client(client)
    assert peer.receive() == b"connect"
    peer.send(b"C")
    for message in (b"E" + sample("p2p_text"), b"R", b"r", b"E" + sample("p2p_post")):
        peer.send(message)
    peer.close()  # the child ended on its own
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert errors == []
    assert dispatcher.payloads == [sample("p2p_text"), sample("p2p_post")]
    assert signals == ["reconnecting", "reconnected"]
    assert exits == ["exit code 0"]  # reported once, with how the child ended


def test_the_channel_sees_the_connection_only_once_the_child_says_connected(
    pair: tuple[IngressProcess, Peer],
) -> None:
    ingress, peer = pair
    dispatcher = Dispatcher()
    client = stand_in(ingress, dispatcher, [])
    thread, _ = run_client(client)
    assert peer.receive() == b"connect"
    assert client._conn is None
    peer.send(b"C")
    peer.send(b"E" + sample("p2p_text"))  # handled after the connected mark was set
    assert dispatcher.arrived.wait(5)
    assert client._conn is not None
    stop_as_the_channel_does(client, peer, thread)
    assert client._conn is None  # gone again once the process ended


def test_a_refused_connection_raises_the_sdks_client_exception(
    pair: tuple[IngressProcess, Peer],
) -> None:
    ingress, peer = pair
    exits: list[str] = []
    thread, errors = run_client(stand_in(ingress, Dispatcher(), exits))
    assert peer.receive() == b"connect"
    peer.send(b"F" + json.dumps({"code": 1000040351, "msg": "app not found"}).encode())
    thread.join(timeout=5)
    assert len(errors) == 1
    assert isinstance(errors[0], ClientException)
    assert str(errors[0]) == "1000040351: app not found"
    assert exits == []


def test_a_child_that_ends_before_connecting_is_an_error_not_a_hang(
    pair: tuple[IngressProcess, Peer],
) -> None:
    ingress, peer = pair
    thread, errors = run_client(stand_in(ingress, Dispatcher(), []))
    assert peer.receive() == b"connect"
    peer.close()
    thread.join(timeout=5)
    assert len(errors) == 1
    assert isinstance(errors[0], IngressExited)


def test_a_stopped_connection_is_not_reported_as_the_child_dying(
    pair: tuple[IngressProcess, Peer],
) -> None:
    ingress, peer = pair
    exits: list[str] = []
    client = stand_in(ingress, Dispatcher(), exits)
    thread, errors = run_client(client)
    assert peer.receive() == b"connect"
    peer.send(b"C")
    stop_as_the_channel_does(client, peer, thread)
    assert errors == []
    assert exits == []


def test_an_event_the_dispatcher_refuses_does_not_stop_the_next(
    pair: tuple[IngressProcess, Peer],
) -> None:
    ingress, peer = pair
    dispatcher = Dispatcher(fail_on=sample("p2p_sticker"))
    thread, errors = run_client(stand_in(ingress, dispatcher, []))
    assert peer.receive() == b"connect"
    for message in (b"C", b"E" + sample("p2p_sticker"), b"E" + sample("p2p_text")):
        peer.send(message)
    peer.close()
    thread.join(timeout=5)
    assert errors == []
    assert dispatcher.payloads == [sample("p2p_text")]


def sample_message_id(name: str) -> str:
    return str(json.loads(sample(name))["event"]["message"]["message_id"])


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (sample("p2p_text"), sample_message_id("p2p_text")),
        (sample("group_thread_reply"), sample_message_id("group_thread_reply")),
        (sample("bot_added"), None),
        (sample("p2p_chat_entered"), None),
        (b"not json", None),
        (b'{"header": {"event_type": "im.message.receive_v1"}, "event": {}}', None),
        (b"[]", None),
    ],
    ids=["message", "thread-reply", "bot-added", "chat-entered", "garbage", "no-message", "list"],
)
def test_only_message_events_are_journaled_by_their_message_id(
    payload: bytes, expected: str | None
) -> None:
    assert message_id_of(payload) == expected


def test_the_process_gets_the_journal_next_to_the_store_and_the_bots_logging(
    tmp_path: Path,
) -> None:
    settings = Settings.model_validate(
        {
            "feishu": {"app_id": "cli_a", "app_secret": "s3cret", "domain": "http://127.0.0.1:9"},
            "store": {"url": f"sqlite:///{tmp_path}/data/bot.db"},
            "log": {"sdk_level": "debug"},
        }
    )
    config = IngressConfig.from_settings(settings, log_level="debug", log_json=True)
    assert config.journal == str(tmp_path / "data" / "bot.db.arrivals")
    assert (config.app_id, config.app_secret, config.domain) == (
        "cli_a",
        "s3cret",
        "http://127.0.0.1:9",
    )
    assert (config.log_level, config.log_json, config.sdk_level) == ("debug", True, "debug")
    assert "s3cret" not in repr(config)


# ---- the long-connection process's handler -----------------------------------------------------


def journal_rows(path: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(path)) as connection:
        return [
            (row[0], row[1]) for row in connection.execute("SELECT message_id, event FROM arrivals")
        ]


def test_a_message_event_is_journaled_as_feishu_sent_it_before_it_is_passed_on(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "bot.db.arrivals"
    journaled_when_passed_on: list[list[tuple[str, str]]] = []

    def send(message: bytes) -> None:
        journaled_when_passed_on.append(journal_rows(journal))
        passed_on.append(message)

    passed_on: list[bytes] = []
    payload = sample("p2p_text")
    assert EventForwarder(send, journal)._do_without_validation(payload) is None  # a plain ACK

    assert passed_on == [b"E" + payload]
    assert journaled_when_passed_on == [[(sample_message_id("p2p_text"), payload.decode("utf-8"))]]


def test_other_events_are_passed_on_without_journaling(tmp_path: Path) -> None:
    journal = tmp_path / "bot.db.arrivals"
    passed_on: list[bytes] = []
    forwarder = EventForwarder(passed_on.append, journal)
    forwarder._do_without_validation(sample("bot_added"))
    forwarder._do_without_validation(sample("p2p_chat_entered"))
    assert passed_on == [b"E" + sample("bot_added"), b"E" + sample("p2p_chat_entered")]
    assert not journal.exists()  # opened at the first message event only


def test_an_event_the_journal_cannot_take_is_still_passed_on_and_said_so(tmp_path: Path) -> None:
    passed_on: list[bytes] = []
    forwarder = EventForwarder(passed_on.append, tmp_path / "no such directory" / "j")
    with structlog.testing.capture_logs() as logs:
        forwarder._do_without_validation(sample("p2p_text"))
    assert passed_on == [b"E" + sample("p2p_text")]
    warnings = [(entry["event"], entry.get("message_id")) for entry in logs]
    assert ("arrival_not_journaled", sample_message_id("p2p_text")) in warnings


def test_how_the_child_ended_is_told_once_it_has(pair: tuple[IngressProcess, Peer]) -> None:
    ingress, _ = pair
    assert ingress.exit_status() == "running"
    os.kill(ingress.pid, signal.SIGKILL)
    assert ingress.exit_status(wait_s=10) == "killed by signal 9"
    assert ingress.exit_status() == "killed by signal 9"  # remembered once reaped


def test_a_first_connection_being_retried_is_not_taken_for_connected(
    pair: tuple[IngressProcess, Peer],
) -> None:
    # The SDK's client says "reconnecting" when its first attempt failed and it tries again.
    ingress, peer = pair
    signals: list[str] = []
    retried = threading.Event()
    client = stand_in(ingress, Dispatcher(), [])
    client.on_reconnecting = lambda: signals.append("reconnecting")
    client.on_reconnected = lambda: (signals.append("reconnected"), retried.set())
    thread, errors = run_client(client)
    assert peer.receive() == b"connect"
    peer.send(b"R")
    peer.send(b"r")
    assert retried.wait(5)
    assert client._conn is None  # only the child's "connected" says so
    peer.send(b"C")
    stop_as_the_channel_does(client, peer, thread)
    assert errors == []
    assert signals == ["reconnecting", "reconnected"]


def test_the_process_loads_the_sdks_websocket_client_and_little_else() -> None:
    # A fresh interpreter, as the bot starts it: none of the SDK's 9,700 API modules, no
    # settings models, no LLM client; the client it needs is all there.
    code = (
        "import sys\n"
        "import bot.feishu.ingress_child\n"
        "from bot.feishu import sdk_compat\n"
        "ws = sdk_compat.import_ws_client_alone()\n"
        "from lark_oapi.core.enum import LogLevel\n"
        "ws.Client('cli_a', 's', log_level=LogLevel.INFO, event_handler=None)\n"
        "heavy = ('lark_oapi.api', 'lark_oapi.channel', 'pydantic', 'openai', 'aiohttp',\n"
        "         'pkg_resources')\n"
        "print(sorted({m for m in sys.modules if m.startswith(heavy)}))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
