"""The injectable time every module takes: a wall clock and an async sleep.

Tests pass fakes of both, so retries, cooldowns and timeouts run without waiting. A leaf module
(it imports nothing of the bot), so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

Clock: TypeAlias = Callable[[], float]
"""Seconds since the epoch, like :func:`time.time`."""

Sleep: TypeAlias = Callable[[float], Awaitable[None]]
"""Wait that many seconds, like :func:`asyncio.sleep`."""
