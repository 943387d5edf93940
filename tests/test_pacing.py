"""Model requests first: cards wait while answers prepare their model requests, not longer."""

from __future__ import annotations

import asyncio

from bot.chat.pacing import ModelRequestsFirst


async def test_with_nothing_being_prepared_a_card_does_not_wait() -> None:
    gate = ModelRequestsFirst(max_wait_s=60)
    await asyncio.wait_for(gate.wait(), 5)
    assert gate.preparing_now == 0


async def test_a_card_waits_until_every_request_being_prepared_went_out() -> None:
    gate = ModelRequestsFirst(max_wait_s=60)
    first, second = gate.preparing(), gate.preparing()
    waiting = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    first.done()
    await asyncio.sleep(0)
    assert not waiting.done()
    assert gate.preparing_now == 1
    second.done()
    await asyncio.wait_for(waiting, 5)
    assert gate.preparing_now == 0


async def test_done_twice_counts_once() -> None:
    gate = ModelRequestsFirst(max_wait_s=60)
    first = gate.preparing()
    first.done()
    first.done()
    later = gate.preparing()
    assert gate.preparing_now == 1
    later.done()
    assert gate.preparing_now == 0


async def test_a_card_waits_no_longer_than_the_longest_wait() -> None:
    gate = ModelRequestsFirst(max_wait_s=0.01)
    stuck = gate.preparing()  # say a transcription that takes seconds
    await asyncio.wait_for(gate.wait(), 5)
    assert gate.preparing_now == 1
    stuck.done()
