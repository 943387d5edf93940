"""The three bots bench/concurrency.py compares, each started as a subprocess against the fakes.

* ``bot``: this project, ``python -m bot run --json-logs`` with a settings file (SQLite store in a
  temporary directory), as tests/e2e_harness.py starts it.
* ``reference``: :mod:`bench._reference_bot`, the same Feishu calls as lean as they get.
* ``nonstreaming``: :mod:`bench._nonstreaming_bot`, one text reply once the answer is complete.

Each prints JSON lines on stdout and logs ``bot_ready`` once its long connection is up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Final, Literal

from bench._fake_world import FakeWorld, Scenario
from tests.e2e_harness import LLM_KEY, BotProcess
from tests.fakes.feishu_server import FakeFeishu
from tests.helpers import bot_environment, write_settings

BotKind = Literal["bot", "reference", "nonstreaming"]
BOT_KINDS: Final[tuple[BotKind, ...]] = ("bot", "reference", "nonstreaming")
READY_TIMEOUT_S = 60.0


class CommandProcess(BotProcess):
    """:class:`BotProcess` (output collected, JSON events, stop) for any command line."""

    def __init__(self, workdir: Path, command: list[str]) -> None:
        super().__init__(workdir, settings=Path(os.devnull))  # the command carries its options
        self.command = command

    def start(self) -> CommandProcess:
        self.lines = []
        self.process = subprocess.Popen(
            self.command,
            cwd=self.workdir,
            env=bot_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._pump, args=(self.process,), daemon=True).start()
        return self


def _bot_settings(workdir: Path, world: FakeWorld, scenario: Scenario) -> Path:
    fs = world.fs
    return write_settings(
        workdir / "settings.yaml",
        {
            "feishu": {
                "app_id": fs.app_id,
                "app_secret": fs.app_secret,
                "domain": fs.domain,
                "connect_timeout_s": 20,
                "shutdown_grace_s": 5,
            },
            "llm": {
                "base_url": world.llm.base_url,
                "keys": [{"key": LLM_KEY}],
                "request_timeout_s": 60,
            },
            "chat": {"stream_update_ms": scenario.update_ms},
            "store": {"url": "sqlite:///data/bot.db"},
        },
    )


def feishu_options(fs: FakeFeishu) -> list[str]:
    """The command-line options that point a bench bot at the fake Feishu ``fs``."""
    return ["--domain", fs.domain, "--app-id", fs.app_id, "--app-secret", fs.app_secret]


def start_bot(kind: BotKind, world: FakeWorld, scenario: Scenario, workdir: Path) -> BotProcess:
    """Start a bot of ``kind``; return once it is connected to the fake Feishu."""
    process: BotProcess
    if kind == "bot":
        process = BotProcess(workdir, _bot_settings(workdir, world, scenario))
    else:
        fs = world.fs
        command = [
            sys.executable,
            "-m",
            f"bench._{kind}_bot",
            *feishu_options(fs),
            "--llm-base-url",
            world.llm.base_url,
            "--llm-key",
            LLM_KEY,
            "--update-ms",
            str(scenario.update_ms),
        ]
        process = CommandProcess(workdir, command)
    process.start()
    try:
        process.wait_for_event("bot_ready", timeout=READY_TIMEOUT_S)
        world.fs.wait_for_connections_blocking(1, timeout=READY_TIMEOUT_S)
    except BaseException:
        process.kill()
        raise
    return process


def bot_pid(process: BotProcess) -> int:
    assert process.process is not None
    return process.process.pid
