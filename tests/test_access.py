"""Access control: who is allowed, the once-a-day refusal, and the daily quotas (fake clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.chat.access import AccessControl, day_of, describe_wait, until_midnight
from bot.config import AccessSettings
from bot.store import SQLiteStore
from tests.store_contract import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_764_000_000.0)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "bot.db", clock=clock)
    await store.open()
    yield store
    await store.close()


def access(store: SQLiteStore, clock: FakeClock, **settings: object) -> AccessControl:
    return AccessControl(AccessSettings.model_validate(settings), store, clock=clock)


async def test_an_empty_allow_list_lets_everyone_in(store: SQLiteStore, clock: FakeClock) -> None:
    assert access(store, clock).allows(["ou_anyone"], "oc_any")


async def test_allow_names_open_ids_user_ids_or_chats_and_admins_always_pass(
    store: SQLiteStore, clock: FakeClock
) -> None:
    gate = access(store, clock, allow=["ou_alice", "e12345", "oc_team"], admins=["ou_boss"])
    assert gate.allows(["ou_alice"], "oc_elsewhere")
    assert gate.allows(["ou_bob", "e12345"], "oc_elsewhere")  # by Feishu user_id
    assert gate.allows(["ou_bob"], "oc_team")  # everyone in a listed chat
    assert gate.allows(["ou_boss"], "")
    assert not gate.allows(["ou_bob"], "oc_elsewhere")
    assert not gate.allows(["ou_bob"], "")


async def test_the_refusal_is_said_once_a_day(store: SQLiteStore, clock: FakeClock) -> None:
    gate = access(store, clock, allow=["ou_alice"])
    assert await gate.refuse_today("ou_bob")
    assert not await gate.refuse_today("ou_bob")
    assert await gate.refuse_today("ou_carol")  # per user
    clock.advance(until_midnight(clock.now) - 1)
    assert not await gate.refuse_today("ou_bob")  # still the same day
    clock.advance(2)
    assert await gate.refuse_today("ou_bob")  # past midnight: once more
    assert not await gate.refuse_today("ou_bob")


async def test_the_refusal_mark_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    for expected in (True, False):
        store = SQLiteStore(tmp_path / "bot.db", clock=clock)
        await store.open()
        try:
            assert await access(store, clock, allow=["x"]).refuse_today("ou_bob") is expected
        finally:
            await store.close()


async def test_quotas_count_todays_usage_and_reset_at_midnight(
    store: SQLiteStore, clock: FakeClock
) -> None:
    gate = access(
        store, clock, daily_requests_per_user=2, daily_tokens_per_user=1000, admins=["ou_a"]
    )
    day = day_of(clock.now)
    assert await gate.quota_exceeded("ou_u", []) is None
    await store.add_usage(day, "ou_u", "k1", 10, 10)
    assert await gate.quota_exceeded("ou_u", []) is None
    await store.add_usage(day, "ou_u", "k2", 10, 10)  # requests count across keys
    message = await gate.quota_exceeded("ou_u", [])
    assert message is not None
    assert message.startswith("You have used your 2 requests for today.")
    assert f"in {describe_wait(until_midnight(clock.now))}" in message
    await store.add_usage(day, "ou_a", "k1", 5000, 5000)
    await store.add_usage(day, "ou_a", "k1", 1, 1)
    assert await gate.quota_exceeded("ou_a", []) is None  # admins are exempt
    clock.advance(until_midnight(clock.now) + 1)
    assert await gate.quota_exceeded("ou_u", []) is None


async def test_the_token_quota(store: SQLiteStore, clock: FakeClock) -> None:
    gate = access(store, clock, daily_tokens_per_user=100)
    await store.add_usage(day_of(clock.now), "ou_u", "k1", 60, 39)
    assert await gate.quota_exceeded("ou_u", []) is None
    await store.add_usage(day_of(clock.now), "ou_u", "k1", 1, 0)
    message = await gate.quota_exceeded("ou_u", ["e1"])
    assert message is not None
    assert message.startswith("You have used your 100 tokens for today (100 so far).")


def test_waits_read_naturally() -> None:
    assert describe_wait(30) == "less than a minute"
    assert describe_wait(5 * 60 + 59) == "5 min"
    assert describe_wait(3 * 3600 + 12 * 60) == "3 h 12 min"
