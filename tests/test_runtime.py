"""The interpreter settings the bot applies before serving (bot/runtime.py)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from bot import runtime


@pytest.fixture
def restored() -> Iterator[None]:
    interval = sys.getswitchinterval()
    thresholds = gc.get_threshold()
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*thresholds)
    gc.unfreeze()


@pytest.mark.usefixtures("restored")
def test_serving_shortens_the_switch_interval_freezes_start_up_and_collects_less_often() -> None:
    built_at_start_up = [object() for _ in range(100)]
    gc.unfreeze()

    runtime.tune_for_serving()

    assert sys.getswitchinterval() == pytest.approx(runtime.SWITCH_INTERVAL_S)
    assert gc.get_freeze_count() >= len(built_at_start_up)
    assert not any(each is built_at_start_up for each in gc.get_objects(generation=2))
    assert gc.get_threshold() == runtime.GC_THRESHOLDS
