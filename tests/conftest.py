"""Shared fixtures: every test runs in its own directory with a clean environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.feishu import sdk_loader
from tests.helpers import BOT_ENVIRONMENT

# As `python -m bot` does (bot.cli.main): the tests load the SDK the way the bot does.
sdk_loader.load_api_services_on_demand()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temp dir with no bot variables set, so no test touches the user's files."""
    for name in BOT_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.chdir(tmp_path)
    return tmp_path
