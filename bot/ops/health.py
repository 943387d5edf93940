"""Health checks: is the bot able to answer right now?

Three checks, each cheap and bounded: ``feishu`` (the long connection is up), ``store`` (it takes
a write: a dedup mark of a probe key that expires after a minute, within :data:`STORE_TIMEOUT_S`)
and ``keys`` (at least one key is active or only cooling; disabled keys do not count). The bot is
healthy when all three pass.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from bot.errors import StoreError
from bot.llm.keypool import KeyView
from bot.store import Store

#: longest wait for the probe write
STORE_TIMEOUT_S: Final = 2.0
#: the probe marks expire soon and are purged with the other expired marks
PROBE_TTL_S: Final = 60.0


@dataclass(frozen=True)
class Check:
    """One check's result; ``detail`` says what was seen, for people."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    """Every check by name."""

    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())

    @property
    def failing(self) -> list[str]:
        return [name for name, check in self.checks.items() if not check.ok]

    def to_json(self) -> dict[str, object]:
        """``{"status": "ok"|"failing", "failing": [...], "checks": {name: {ok, detail}}}``."""
        return {
            "status": "ok" if self.ok else "failing",
            "failing": self.failing,
            "checks": {
                name: {"ok": check.ok, "detail": check.detail}
                for name, check in self.checks.items()
            },
        }


class HealthChecks:
    """Runs the checks against the live parts of the bot."""

    def __init__(
        self,
        *,
        connection: Callable[[], str],
        store: Store,
        keys: Callable[[], Iterable[KeyView]],
        store_timeout_s: float = STORE_TIMEOUT_S,
    ) -> None:
        self._connection = connection
        self._store = store
        self._keys = keys
        self._store_timeout_s = store_timeout_s
        self._probes = itertools.count(1)
        self._pid = os.getpid()

    async def run(self) -> HealthReport:
        """Run every check (the store write is bounded by its timeout)."""
        return HealthReport(
            {"feishu": self.feishu(), "store": await self.store(), "keys": self.keys()}
        )

    def feishu(self) -> Check:
        state = self._connection()
        return Check(state == "connected", state)

    async def store(self) -> Check:
        key = f"ops:probe:{self._pid}:{next(self._probes)}"
        try:
            await asyncio.wait_for(self._store.mark_seen(key, PROBE_TTL_S), self._store_timeout_s)
        except TimeoutError:
            return Check(False, f"a write did not finish within {self._store_timeout_s:g} s")
        except StoreError as exc:
            return Check(False, f"a write failed: {exc}")
        return Check(True, "writable")

    def keys(self) -> Check:
        states = [view.state for view in self._keys()]
        if not states:
            return Check(False, "no API key: add llm.keys or OPENAI_API_KEYS, or share one")
        counts = {state: states.count(state) for state in ("active", "cooling", "disabled")}
        detail = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
        usable = counts["active"] + counts["cooling"]
        if not usable:
            return Check(False, f"every key is disabled ({detail})")
        return Check(True, detail)
