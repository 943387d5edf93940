"""Helpers shared by test modules (import them; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from bot.store import SQLiteStore

REPO_ROOT = Path(__file__).resolve().parent.parent
BOT_COMMAND = [sys.executable, "-m", "bot"]
BOT_ENVIRONMENT = (
    "BOT_CONFIG",
    "BOT_SECRET_KEY",
    "BOT_STORE_URL",
    "FEISHU_APP_ID",
    "FEISHU_APP_SECRET",
    "OPENAI_API_KEYS",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
)


def bot_environment(**extra: str) -> dict[str, str]:
    """The environment for a bot subprocess: ours minus bot variables, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in BOT_ENVIRONMENT}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_bot(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bot ARGS`` to completion and capture its output."""
    return subprocess.run(
        [*BOT_COMMAND, *args],
        cwd=cwd,
        env=env if env is not None else bot_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_python(source: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -c SOURCE`` in a fresh interpreter from the project's root, the bot's
    environment, and capture its output (what a module imports is seen only there)."""
    return subprocess.run(
        [sys.executable, "-c", source],
        cwd=REPO_ROOT,
        env=bot_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_settings(path: Path, settings: dict[str, object]) -> Path:
    """Write a settings mapping as YAML and return the path."""
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def holding_the_store_thread(store: SQLiteStore) -> Iterator[None]:
    """Keep the store's write thread busy for the duration of the block."""
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        release.wait(10)

    assert store._executor is not None
    held = store._executor.submit(hold)
    try:
        assert busy.wait(5)
        yield
    finally:
        release.set()
        held.result(5)
