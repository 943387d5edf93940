"""End-to-end harness: the real bot as a subprocess, between a fake Feishu and a fake OpenAI.

The SDK allows one long-connection client per process, so the bot always runs as
``python -m bot run --config <tmp settings>``; the fakes run in threads of the test process and
the test controls them. Waits are on events with timeouts, never sleeps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.feishu_server import FakeFeishu, FakeFeishuThread, FakeMessage
from tests.fakes.openai_server import FakeOpenAI, FakeOpenAIThread
from tests.helpers import BOT_COMMAND, bot_environment, write_settings

LLM_KEY = "sk-test-e2e-key-000000000000000000000001"
USER_A = "ou_user_alice_0000000000000000000001"
USER_B = "ou_user_bob_00000000000000000000000002"


class BotProcess:
    """``python -m bot run`` with its output (JSON logs) collected on a thread."""

    def __init__(self, workdir: Path, settings: Path) -> None:
        self.workdir = workdir
        self.settings = settings
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BotProcess:
        self.lines = []
        self.process = subprocess.Popen(
            [*BOT_COMMAND, "run", "--config", str(self.settings), "--json-logs"],
            cwd=self.workdir,
            env=bot_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._pump, args=(self.process,), daemon=True).start()
        return self

    def _pump(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log records whose ``event`` is ``name``."""
        found = []
        with self._changed:
            lines = list(self.lines)
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def wait_for_event(
        self, name: str, count: int = 1, timeout: float = 20
    ) -> list[dict[str, Any]]:
        """Wait until the bot logged ``name`` at least ``count`` times."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: len(self.events(name)) >= count or self.exited(), timeout
            )
        records = self.events(name)
        if not done or len(records) < count:
            raise AssertionError(f"bot did not log {name!r} x{count}; output:\n{self.output}")
        return records

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def children(self) -> list[int]:
        """The pids of the bot's live child processes (its long connection's), whichever of
        its threads started them."""
        assert self.process is not None
        pids: list[int] = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            try:
                pids += [int(pid) for pid in (task / "children").read_text().split()]
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
        return sorted(pids)

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(30)
        finally:
            self.kill()


@dataclass
class World:
    """Fakes, settings and the bot process of one end-to-end test."""

    feishu: FakeFeishuThread
    openai: FakeOpenAIThread
    workdir: Path
    settings_path: Path
    bots: list[BotProcess] = field(default_factory=list)

    @property
    def fs(self) -> FakeFeishu:
        return self.feishu.fake

    @property
    def llm(self) -> FakeOpenAI:
        return self.openai.fake

    def start_bot(self) -> BotProcess:
        """Start the bot and wait until it is connected and ready."""
        # Counted as made, not as open: a bot killed just before may still look connected
        # until the fake notices the dropped socket.
        made = len(self.fs.connections)
        bot = BotProcess(self.workdir, self.settings_path).start()
        self.bots.append(bot)
        bot.wait_for_event("bot_ready")
        self.fs.wait_for_connections_blocking(1, timeout=20, after=made)
        return bot

    def send(self, sample: str = "p2p_text", **kwargs: Any) -> str:
        """Deliver a message event; return the Feishu message id."""
        frame_id = self.feishu.deliver(sample, **kwargs)
        message_id = self.fs.delivery(frame_id).message_id
        assert message_id is not None
        return message_id

    def frame_of(self, message_id: str) -> str:
        return next(f for f, d in self.fs.deliveries.items() if d.message_id == message_id)

    def replies(self, message_id: str) -> list[FakeMessage]:
        return self.fs.replies_to(message_id)

    def wait_for_final_reply(
        self, message_id: str, *, containing: str = "", timeout: float = 20
    ) -> str:
        """Wait for a complete reply to ``message_id`` (card closed, or plain text)."""

        def final() -> str | None:
            for reply in self.fs.replies_to(message_id):
                text: str | None = None
                if reply.card_id is None:
                    text = self.fs.message_text(reply.message_id)
                else:
                    card = self.fs.cards.get(reply.card_id)
                    text = card.text if card is not None and card.closed else None
                if text is not None and containing in text:
                    return text
            return None

        return self.fs.wait_until_blocking(final, timeout=timeout)


def make_world(tmp_path: Path, **settings: Any) -> Iterator[World]:
    """Start the fakes, write the settings; stop everything afterwards."""
    feishu = FakeFeishu(reconnect_interval=0.2).run_in_thread()
    openai = FakeOpenAI().run_in_thread()
    raw: dict[str, Any] = {
        "feishu": {
            "app_id": feishu.fake.app_id,
            "app_secret": feishu.fake.app_secret,
            "domain": feishu.domain,
            "connect_timeout_s": 10,
            "shutdown_grace_s": 5,
        },
        "llm": {"base_url": openai.base_url, "keys": [{"key": LLM_KEY}], "request_timeout_s": 10},
        # The footer ("gpt-4o-mini · 0.3 s") varies with time: tests that want it turn it on.
        "chat": {"stream_update_ms": 50, "footer": "off"},
        "store": {"url": "sqlite:///data/bot.db"},
    }
    for section, values in settings.items():
        raw.setdefault(section, {}).update(values)
    path = write_settings(tmp_path / "settings.yaml", raw)
    world = World(feishu, openai, tmp_path, path)
    try:
        yield world
    finally:
        for bot in world.bots:
            bot.kill()
        feishu.close()
        openai.close()
