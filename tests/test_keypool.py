"""The API key pool: which key serves a request, and what happens to a key when it fails.

Every test drives a real :class:`KeyPool` with a fake clock and a fake sleep that moves that clock
and records what was asked of it, so nothing here sleeps or reads the wall clock. The examples use
a real SQLite store; the property test at the end uses a small in-memory store for speed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pydantic import SecretStr

from bot.config import KeyEntry
from bot.errors import AllKeysUnavailable
from bot.llm.keypool import (
    FAILURES_BEFORE_REST,
    KeyPool,
    KeyStateChange,
    KeyView,
    Lease,
    key_id_of,
)
from bot.store import SQLiteStore, Store, StoredKey, Usage
from tests.store_contract import FakeClock

SECRET_A = "sk-test-aaaaaaaaaaaaaaaaaaaa1111"
SECRET_B = "sk-test-bbbbbbbbbbbbbbbbbbbb2222"
SECRET_C = "sk-test-cccccccccccccccccccc3333"
SECRET_D = "sk-test-dddddddddddddddddddd4444"
DONATED = "sk-donated-eeeeeeeeeeeeeeeee5555"

T = TypeVar("T")
PoolFactory = Callable[..., KeyPool]


def entry(secret: str, *, owner: str = "config", enabled: bool = True) -> KeyEntry:
    return KeyEntry(key=SecretStr(secret), owner=owner, enabled=enabled)


def id_of(secret: str) -> str:
    """The key id the pool documents: the first 12 hex digits of the secret's SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


class FakeSleep:
    """An async sleep that moves the fake clock instead of waiting, and records each delay."""

    def __init__(self, clock: FakeClock, events: list[tuple[str, float]] | None = None) -> None:
        self.clock = clock
        self.delays: list[float] = []
        self.events = events if events is not None else []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.events.append(("sleep", seconds))
        self.clock.advance(seconds)


class WaitNotices:
    """Records the ``on_wait`` notices a caller would show the user."""

    def __init__(self, events: list[tuple[str, float]] | None = None) -> None:
        self.seconds: list[float] = []
        self.events = events if events is not None else []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)
        self.events.append(("notice", seconds))


class MemoryStore:
    """Just the key methods of :class:`bot.store.Store` the pool uses, kept in a dict."""

    def __init__(self) -> None:
        self.keys: dict[str, StoredKey] = {}

    async def load_keys(self) -> list[StoredKey]:
        return sorted(self.keys.values(), key=lambda key: (key.created_at, key.key_id))

    async def save_key(self, key: StoredKey) -> None:
        self.keys[key.key_id] = key

    async def delete_key(self, key_id: str) -> bool:
        return self.keys.pop(key_id, None) is not None

    async def usage_for_day(self, day: str) -> list[Usage]:
        return []


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    return FakeSleep(clock)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SQLiteStore]:
    sqlite_store = SQLiteStore(tmp_path / "data" / "bot.db", clock=clock)
    await sqlite_store.open()
    yield sqlite_store
    await sqlite_store.close()


@pytest.fixture
def make_pool(store: SQLiteStore, clock: FakeClock, sleep: FakeSleep) -> PoolFactory:
    def build(**options: Any) -> KeyPool:
        return KeyPool(store, clock=clock, sleep=sleep, **options)

    return build


async def loaded_pool(make_pool: PoolFactory, *secrets: str, **options: float) -> KeyPool:
    pool = make_pool(**options)
    await pool.load([entry(secret) for secret in secrets])
    return pool


def shown(pool: KeyPool) -> dict[str, KeyView]:
    """What the pool shows about its keys (as an admin command would), by key id."""
    listed = pool.keys()
    return {key.key_id: key for key in listed}


def view(pool: KeyPool, key_id: str) -> KeyView:
    return shown(pool)[key_id]


async def stored(store: SQLiteStore, key_id: str) -> StoredKey:
    (found,) = [key for key in await store.load_keys() if key.key_id == key_id]
    return found


async def sticky_key_of(user: str, *secrets: str) -> str:
    """The key ``user`` sticks to, asked of another, idle pool: stickiness needs no shared state."""
    probe = KeyPool(cast(Store, MemoryStore()), clock=FakeClock(), sleep=FakeSleep(FakeClock()))
    await probe.load([entry(secret) for secret in secrets])
    lease = await probe.acquire(user)
    lease.release()
    return lease.key_id


async def user_sticky_to(key_id: str, *secrets: str) -> str:
    """Some user whose sticky key is ``key_id``."""
    for index in range(1000):
        user = f"ou_user_{index}"
        if await sticky_key_of(user, *secrets) == key_id:
            return user
    raise AssertionError(f"no user sticks to {key_id}")


async def use(pool: KeyPool, user: str) -> str:
    """One short request: acquire a key, release it, say which key served."""
    async with pool.lease(user) as lease:
        return lease.key_id


# ---- loading -------------------------------------------------------------------------------


async def test_configured_keys_are_stored_under_short_hash_ids_and_shown_masked(
    make_pool: PoolFactory, store: SQLiteStore
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, SECRET_B)

    views = shown(pool)
    assert set(views) == {id_of(SECRET_A), id_of(SECRET_B)}
    assert all(len(key_id) == 12 for key_id in views)
    assert views[id_of(SECRET_A)].masked == "sk-…1111"
    assert views[id_of(SECRET_B)].masked == "sk-…2222"
    assert {key.state for key in views.values()} == {"active"}
    assert {key.source for key in views.values()} == {"config"}
    assert {key.key_id for key in await store.load_keys()} == set(views)


async def test_the_secret_never_appears_in_a_key_view_a_lease_repr_or_a_stored_key_repr(
    make_pool: PoolFactory, store: SQLiteStore
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    shown = pool.keys()[0]
    lease = await pool.acquire("ou_alice")

    assert SECRET_A not in repr(shown)
    assert all(SECRET_A not in str(getattr(shown, field.name)) for field in fields(shown))
    assert SECRET_A not in repr(lease)
    assert SECRET_A not in repr(await store.load_keys())
    assert lease.secret == SECRET_A  # only the lease, which makes the call, holds it
    lease.release()


async def test_a_key_owned_by_env_is_recorded_as_coming_from_the_environment(
    make_pool: PoolFactory,
) -> None:
    pool = make_pool()
    await pool.load([entry(SECRET_A, owner="env"), entry(SECRET_B, owner="alice")])

    sources = {key.key_id: (key.source, key.owner) for key in shown(pool).values()}
    assert sources == {id_of(SECRET_A): ("env", "env"), id_of(SECRET_B): ("config", "alice")}


async def test_a_key_removed_from_config_is_deactivated_and_a_donated_key_survives_reload(
    make_pool: PoolFactory, store: SQLiteStore
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, SECRET_B)
    donated = await pool.add(DONATED, owner="ou_bob", source="donated")
    assert donated.source == "donated"
    assert donated.masked == "sk-…5555"

    await pool.load([entry(SECRET_A)])

    states = {key_id: (key.state, key.reason) for key_id, key in shown(pool).items()}
    assert states == {
        id_of(SECRET_A): ("active", None),
        id_of(SECRET_B): ("disabled", "no longer in settings"),
        donated.key_id: ("active", None),
    }
    assert {key.key_id for key in await store.load_keys()} == set(states)
    await pool.load([entry(SECRET_A), entry(SECRET_B)])  # put back: in service again
    assert {key.state for key in shown(pool).values()} == {"active"}


async def test_adding_a_known_secret_returns_the_existing_key_unchanged(
    make_pool: PoolFactory,
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    await pool.disable(id_of(SECRET_A), "invalid api key")

    again = await pool.add(SECRET_A, owner="ou_bob", source="donated")

    assert again.key_id == id_of(SECRET_A)
    assert (again.source, again.owner, again.state) == ("config", "config", "disabled")
    assert len(pool.keys()) == 1


async def test_a_key_disabled_in_config_is_disabled_manually_and_never_chosen(
    make_pool: PoolFactory, store: SQLiteStore
) -> None:
    pool = make_pool()
    await pool.load([entry(SECRET_A, enabled=False), entry(SECRET_B)])

    shown = view(pool, id_of(SECRET_A))
    assert (shown.state, shown.reason) == ("disabled", "disabled in settings")
    assert (await stored(store, id_of(SECRET_A))).disabled_by == "manual"
    for index in range(50):
        assert await use(pool, f"ou_user_{index}") == id_of(SECRET_B)


async def test_re_enabling_a_key_in_config_lifts_its_manual_disable(make_pool: PoolFactory) -> None:
    pool = make_pool()
    await pool.load([entry(SECRET_A, enabled=False)])

    await pool.load([entry(SECRET_A, enabled=True)])

    shown = view(pool, id_of(SECRET_A))
    assert (shown.state, shown.reason) == ("active", None)
    assert await use(pool, "ou_alice") == id_of(SECRET_A)


async def test_re_enabling_a_key_in_config_does_not_lift_an_automatic_disable(
    make_pool: PoolFactory, store: SQLiteStore
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    await pool.disable(id_of(SECRET_A), "invalid api key")

    await pool.load([entry(SECRET_A, enabled=True)])

    shown = view(pool, id_of(SECRET_A))
    assert (shown.state, shown.reason) == ("disabled", "invalid api key")
    assert (await stored(store, id_of(SECRET_A))).disabled_by == "auto"
    with pytest.raises(AllKeysUnavailable, match="disabled"):
        await pool.acquire("ou_alice")


async def test_key_state_and_counters_survive_a_restart(
    make_pool: PoolFactory, store: SQLiteStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    config = [entry(SECRET_A), entry(SECRET_B), entry(SECRET_C)]
    first = make_pool()
    await first.load(config)
    key_a, key_b, key_c = id_of(SECRET_A), id_of(SECRET_B), id_of(SECRET_C)
    await first.report_success(key_c)
    await first.report_success(key_c)
    await first.report_transient_failure(key_c, "HTTP 502")
    await first.cool(key_a, 60, "HTTP 429")
    await first.disable(key_b, "insufficient_quota")
    cooled_until = clock.now + 60
    await store.close()

    reopened = SQLiteStore(store.path, clock=clock)
    await reopened.open()
    try:
        second = KeyPool(reopened, clock=clock, sleep=sleep)
        await second.load(config)

        a, b, c = view(second, key_a), view(second, key_b), view(second, key_c)
        assert (a.state, a.until, a.reason, a.failures) == ("cooling", cooled_until, "HTTP 429", 1)
        assert (b.state, b.reason, b.failures) == ("disabled", "insufficient_quota", 1)
        assert (c.state, c.requests, c.failures) == ("active", 2, 1)
        assert {await use(second, f"ou_user_{index}") for index in range(30)} == {key_c}
        clock.advance(60)
        assert key_a in {await use(second, f"ou_user_{index}") for index in range(30)}
    finally:
        await reopened.close()


# ---- selection -----------------------------------------------------------------------------


async def test_the_same_user_keeps_getting_the_same_key_while_it_is_usable_and_not_saturated(
    make_pool: PoolFactory, clock: FakeClock
) -> None:
    secrets = (SECRET_A, SECRET_B, SECRET_C, SECRET_D)
    pool = await loaded_pool(make_pool, *secrets, saturation=4)
    sticky = await sticky_key_of("ou_alice", *secrets)

    for _ in range(20):
        clock.advance(1)
        assert await use(pool, "ou_alice") == sticky

    held = []
    for _ in range(pool.saturation):
        held.append(await pool.acquire("ou_alice"))
    assert {lease.key_id for lease in held} == {sticky}
    for lease in held:
        lease.release()


async def test_different_users_are_spread_over_every_key(make_pool: PoolFactory) -> None:
    secrets = (SECRET_A, SECRET_B, SECRET_C, SECRET_D)
    pool = await loaded_pool(make_pool, *secrets)

    served: dict[str, int] = {}
    for index in range(400):
        key_id = await use(pool, f"ou_user_{index}")
        served[key_id] = served.get(key_id, 0) + 1

    assert set(served) == {id_of(secret) for secret in secrets}
    assert min(served.values()) >= 40  # rendezvous hashing: roughly 100 each


async def test_a_saturated_sticky_key_sends_the_user_to_the_key_with_fewest_requests_in_flight(
    make_pool: PoolFactory, clock: FakeClock
) -> None:
    secrets = (SECRET_A, SECRET_B, SECRET_C)
    key_a, key_b, key_c = (id_of(secret) for secret in secrets)
    alice = await user_sticky_to(key_a, *secrets)
    bob = await user_sticky_to(key_b, *secrets)
    pool = await loaded_pool(make_pool, *secrets, saturation=2)

    clock.advance(1)
    bobs = await pool.acquire(bob)
    clock.advance(1)
    alices = [await pool.acquire(alice), await pool.acquire(alice)]
    assert [lease.key_id for lease in alices] == [key_a, key_a]

    clock.advance(1)
    overflow = await pool.acquire(alice)

    assert overflow.key_id == key_c  # a: 2 (saturated), b: 1, c: 0
    assert [pool.in_flight(key) for key in (key_a, key_b, key_c)] == [2, 1, 1]
    for lease in [bobs, *alices, overflow]:
        lease.release()


@pytest.mark.parametrize("recent", ["b", "c"])
async def test_among_equally_loaded_keys_the_least_recently_used_is_chosen(
    make_pool: PoolFactory, clock: FakeClock, recent: str
) -> None:
    secrets = (SECRET_A, SECRET_B, SECRET_C)
    key_a, key_b, key_c = (id_of(secret) for secret in secrets)
    alice = await user_sticky_to(key_a, *secrets)
    bob = await user_sticky_to(key_b, *secrets)
    carol = await user_sticky_to(key_c, *secrets)
    pool = await loaded_pool(make_pool, *secrets, saturation=1)
    earlier, later = (carol, bob) if recent == "b" else (bob, carol)

    clock.advance(1)
    await use(pool, earlier)
    clock.advance(1)
    await use(pool, later)
    clock.advance(1)
    saturating = await pool.acquire(alice)
    clock.advance(1)
    overflow = await pool.acquire(alice)

    assert saturating.key_id == key_a
    assert overflow.key_id == (key_c if recent == "b" else key_b)
    saturating.release()
    overflow.release()


async def test_a_cooling_key_is_not_chosen_before_its_until_and_is_chosen_again_after(
    make_pool: PoolFactory, clock: FakeClock
) -> None:
    secrets = (SECRET_A, SECRET_B, SECRET_C)
    pool = await loaded_pool(make_pool, *secrets)
    sticky = await use(pool, "ou_alice")

    await pool.cool(sticky, 10, "HTTP 429")
    while_cooling = await use(pool, "ou_alice")
    clock.advance(9.999)
    almost_done = await use(pool, "ou_alice")
    clock.advance(0.002)
    rested = await use(pool, "ou_alice")

    assert while_cooling != sticky
    assert almost_done == while_cooling
    assert rested == sticky
    assert view(pool, sticky).state == "active"


async def test_a_disabled_key_is_never_chosen(make_pool: PoolFactory) -> None:
    secrets = (SECRET_A, SECRET_B, SECRET_C)
    pool = await loaded_pool(make_pool, *secrets)
    await pool.disable(id_of(SECRET_B), "invalid api key")

    served = {await use(pool, f"ou_user_{index}") for index in range(200)}

    assert served == {id_of(SECRET_A), id_of(SECRET_C)}
    assert view(pool, id_of(SECRET_B)).state == "disabled"


async def test_a_key_enabled_again_by_hand_returns_to_rotation(make_pool: PoolFactory) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    await pool.disable(id_of(SECRET_A), "invalid api key", by="manual")

    await pool.enable(id_of(SECRET_A))

    assert await use(pool, "ou_alice") == id_of(SECRET_A)


async def test_a_lease_is_released_even_when_the_request_raises(make_pool: PoolFactory) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    key_a = id_of(SECRET_A)

    seen: list[tuple[Lease, int]] = []

    async def request_that_breaks() -> None:
        async with pool.lease("ou_alice") as lease:
            seen.append((lease, pool.in_flight(key_a)))
            raise RuntimeError("stream broke")

    with pytest.raises(RuntimeError, match="stream broke"):
        await request_that_breaks()

    ((lease, in_flight_during),) = seen
    assert in_flight_during == 1
    assert lease.released
    assert pool.in_flight(key_a) == 0


async def test_releasing_a_lease_twice_does_nothing(make_pool: PoolFactory) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    key_a = id_of(SECRET_A)
    first = await pool.acquire("ou_alice")
    second = await pool.acquire("ou_bob")

    first.release()
    first.release()

    assert pool.in_flight(key_a) == 1
    second.release()
    assert pool.in_flight(key_a) == 0


async def test_in_flight_counts_held_leases_and_returns_to_zero(make_pool: PoolFactory) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, SECRET_B)
    leases = [await pool.acquire(f"ou_user_{index}") for index in range(10)]

    counted = {key_id: key.in_flight for key_id, key in shown(pool).items()}
    assert sum(counted.values()) == 10
    for key_id, count in counted.items():
        assert count == sum(lease.key_id == key_id for lease in leases)
    for lease in leases:
        lease.release()
    assert [key.in_flight for key in shown(pool).values()] == [0, 0]


# ---- rate limits and failures --------------------------------------------------------------


async def test_a_rate_limited_key_rests_exactly_its_retry_after(
    make_pool: PoolFactory, store: SQLiteStore, clock: FakeClock
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    key_a = id_of(SECRET_A)

    rest = await pool.cool(key_a, 7.5, "HTTP 429")

    assert rest == 7.5
    shown = view(pool, key_a)
    assert (shown.state, shown.until, shown.reason, shown.failures) == (
        "cooling",
        clock.now + 7.5,
        "HTTP 429",
        1,
    )
    saved = await stored(store, key_a)
    assert (saved.state, saved.until) == ("cooling", clock.now + 7.5)


async def test_a_retry_after_longer_than_the_maximum_cooldown_is_capped(
    make_pool: PoolFactory, clock: FakeClock
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, max_cooldown_s=120)

    rest = await pool.cool(id_of(SECRET_A), 3600, "HTTP 429")

    assert rest == 120
    assert view(pool, id_of(SECRET_A)).until == clock.now + 120


async def test_a_negative_retry_after_rests_not_at_all(make_pool: PoolFactory) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)

    rest = await pool.cool(id_of(SECRET_A), -5, "HTTP 429")

    assert rest == 0
    assert await use(pool, "ou_alice") == id_of(SECRET_A)


async def test_without_retry_after_the_rest_doubles_per_consecutive_rate_limit_up_to_the_cap(
    make_pool: PoolFactory, clock: FakeClock
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, base_cooldown_s=2, max_cooldown_s=50)
    key_a = id_of(SECRET_A)

    rests = []
    for _ in range(7):
        rests.append(await pool.cool(key_a, None, "HTTP 429"))
        clock.advance(rests[-1])  # the next 429 comes after the rest

    assert rests == [2, 4, 8, 16, 32, 50, 50]
    assert view(pool, key_a).failures == 7


async def test_a_success_resets_the_rate_limit_streak(
    make_pool: PoolFactory, clock: FakeClock
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, base_cooldown_s=2)
    key_a = id_of(SECRET_A)
    clock.advance(await pool.cool(key_a, None, "HTTP 429"))
    clock.advance(await pool.cool(key_a, None, "HTTP 429"))

    await pool.report_success(key_a)

    assert await pool.cool(key_a, None, "HTTP 429") == 2
    assert view(pool, key_a).requests == 1


async def test_cooling_a_disabled_key_leaves_it_disabled(
    make_pool: PoolFactory, clock: FakeClock
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    key_a = id_of(SECRET_A)
    await pool.disable(key_a, "invalid api key")

    rest = await pool.cool(key_a, 5, "HTTP 429")
    clock.advance(10)

    assert rest == 0
    shown = view(pool, key_a)
    assert (shown.state, shown.reason, shown.until) == ("disabled", "invalid api key", None)
    with pytest.raises(AllKeysUnavailable, match="disabled"):
        await pool.acquire("ou_alice")


async def test_transient_failures_rest_the_key_after_a_streak(
    make_pool: PoolFactory, clock: FakeClock
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, base_cooldown_s=3)
    key_a = id_of(SECRET_A)

    for _ in range(FAILURES_BEFORE_REST - 1):
        await pool.report_transient_failure(key_a, "HTTP 502")
    before_rest = view(pool, key_a)
    await pool.report_transient_failure(key_a, "HTTP 502")
    resting = view(pool, key_a)

    assert (before_rest.state, before_rest.failures) == ("active", FAILURES_BEFORE_REST - 1)
    assert (resting.state, resting.until, resting.reason, resting.failures) == (
        "cooling",
        clock.now + 3,
        "HTTP 502",
        FAILURES_BEFORE_REST,
    )


async def test_a_success_between_transient_failures_restarts_the_streak(
    make_pool: PoolFactory,
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    key_a = id_of(SECRET_A)

    for _ in range(FAILURES_BEFORE_REST - 1):
        await pool.report_transient_failure(key_a, "timeout")
    await pool.report_success(key_a)
    for _ in range(FAILURES_BEFORE_REST - 1):
        await pool.report_transient_failure(key_a, "timeout")

    assert view(pool, key_a).state == "active"


async def test_a_transient_failure_of_a_disabled_key_changes_nothing(
    make_pool: PoolFactory,
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    key_a = id_of(SECRET_A)
    await pool.disable(key_a, "invalid api key")

    for _ in range(FAILURES_BEFORE_REST):
        await pool.report_transient_failure(key_a, "timeout")

    shown = view(pool, key_a)
    assert (shown.state, shown.failures) == ("disabled", 1)


# ---- waiting for a key ---------------------------------------------------------------------


async def test_when_every_key_is_cooling_acquire_tells_the_caller_then_waits_for_the_earliest(
    store: SQLiteStore, clock: FakeClock
) -> None:
    events: list[tuple[str, float]] = []
    sleep, notices = FakeSleep(clock, events), WaitNotices(events)
    pool = KeyPool(store, clock=clock, sleep=sleep, max_wait_s=30)
    await pool.load([entry(SECRET_A), entry(SECRET_B)])
    await pool.cool(id_of(SECRET_A), 12, "HTTP 429")
    await pool.cool(id_of(SECRET_B), 5, "HTTP 429")

    lease = await pool.acquire("ou_alice", on_wait=notices)

    assert lease.key_id == id_of(SECRET_B)
    assert events == [("notice", 5), ("sleep", 5)]
    assert pool.in_flight(id_of(SECRET_B)) == 1
    lease.release()


async def test_a_wait_longer_than_max_wait_fails_at_once_without_sleeping(
    store: SQLiteStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    notices = WaitNotices()
    pool = KeyPool(store, clock=clock, sleep=sleep, max_wait_s=30)
    await pool.load([entry(SECRET_A), entry(SECRET_B)])
    await pool.cool(id_of(SECRET_A), 31, "HTTP 429")
    await pool.cool(id_of(SECRET_B), 45, "HTTP 429")

    with pytest.raises(AllKeysUnavailable, match="rate limited for another 31 s"):
        await pool.acquire("ou_alice", on_wait=notices)

    assert sleep.delays == []
    assert notices.seconds == []
    assert [key.in_flight for key in shown(pool).values()] == [0, 0]


async def test_a_disabled_key_does_not_stop_acquire_waiting_for_a_cooling_one(
    make_pool: PoolFactory, sleep: FakeSleep
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, SECRET_B)
    await pool.disable(id_of(SECRET_A), "invalid api key")
    await pool.cool(id_of(SECRET_B), 4, "HTTP 429")

    async with pool.lease("ou_alice") as lease:
        assert lease.key_id == id_of(SECRET_B)

    assert sleep.delays == [4]


async def test_with_no_keys_acquire_says_no_api_key_is_configured(
    make_pool: PoolFactory, sleep: FakeSleep
) -> None:
    pool = make_pool()
    await pool.load([])

    with pytest.raises(AllKeysUnavailable, match="no API key"):
        await pool.acquire("ou_alice")
    assert sleep.delays == []


async def test_with_every_key_disabled_acquire_says_they_are_disabled(
    make_pool: PoolFactory, sleep: FakeSleep
) -> None:
    pool = make_pool()
    await pool.load([entry(SECRET_A, enabled=False), entry(SECRET_B)])
    await pool.disable(id_of(SECRET_B), "insufficient_quota")

    with pytest.raises(AllKeysUnavailable, match="disabled"):
        await pool.acquire("ou_alice")
    assert sleep.delays == []


# ---- properties ----------------------------------------------------------------------------

PROPERTY_SECRETS = (SECRET_A, SECRET_B, SECRET_C)
PROPERTY_KEYS = tuple(id_of(secret) for secret in PROPERTY_SECRETS)
USERS = tuple(f"ou_user_{index}" for index in range(6))
MAX_WAIT_S = 30.0
BASE_COOLDOWN_S = 2.0
MAX_COOLDOWN_S = 100.0
SATURATION = 2


class KeyPoolMachine(RuleBasedStateMachine):
    """Random requests and outcomes against one pool, checked against a plain model of the keys.

    The model knows each key's state (active, cooling until, disabled), its failure streaks and
    which leases are held; after every step the pool must agree with it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.sleep = FakeSleep(self.clock)
        self.pool = KeyPool(
            cast(Store, MemoryStore()),
            clock=self.clock,
            sleep=self.sleep,
            max_wait_s=MAX_WAIT_S,
            saturation=SATURATION,
            base_cooldown_s=BASE_COOLDOWN_S,
            max_cooldown_s=MAX_COOLDOWN_S,
        )
        self.leases: list[Lease] = []
        self.disabled: set[str] = set()
        self.cooling_until: dict[str, float] = {}
        self.rate_limit_streak: dict[str, int] = dict.fromkeys(PROPERTY_KEYS, 0)
        self.transient_streak: dict[str, int] = dict.fromkeys(PROPERTY_KEYS, 0)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    async def attempt(self, user: str) -> Lease | AllKeysUnavailable:
        try:
            return await self.pool.acquire(user)
        except AllKeysUnavailable as exc:
            return exc

    def teardown(self) -> None:
        for lease in self.leases:
            lease.release()
        self.loop.close()

    # -- the model --

    def usable(self, key_id: str) -> bool:
        return key_id not in self.disabled and self.cooling_until.get(key_id, 0) <= self.clock.now

    def held(self, key_id: str) -> int:
        return sum(not lease.released and lease.key_id == key_id for lease in self.leases)

    # -- rules --

    @initialize()
    def load_keys(self) -> None:
        self.run(self.pool.load([entry(secret) for secret in PROPERTY_SECRETS]))

    @rule(user=st.sampled_from(USERS))
    def acquire(self, user: str) -> None:
        before = {key_id: self.held(key_id) for key_id in PROPERTY_KEYS}
        started, slept = self.clock.now, len(self.sleep.delays)
        none_usable = not any(self.usable(key_id) for key_id in PROPERTY_KEYS)
        lease = self.run(self.attempt(user))
        if isinstance(lease, AllKeysUnavailable):
            assert none_usable
            waits = [
                until - started
                for key_id, until in self.cooling_until.items()
                if key_id not in self.disabled
            ]
            if waits:
                assert min(waits) > MAX_WAIT_S
                assert "rate limited" in str(lease)
            else:
                assert "disabled" in str(lease)
            assert self.sleep.delays[slept:] == []
            return
        waited = self.sleep.delays[slept:]
        assert sum(waited) <= MAX_WAIT_S
        assert bool(waited) == none_usable
        if waited:
            assert self.clock.now == min(
                until
                for key_id, until in self.cooling_until.items()
                if key_id not in self.disabled and until > started
            )
        chosen = lease.key_id
        assert chosen not in self.disabled, "chose a disabled key"
        assert self.cooling_until.get(chosen, 0) <= self.clock.now, "chose a key still cooling"
        usable_load = [before[key_id] for key_id in PROPERTY_KEYS if self.usable(key_id)]
        assert before[chosen] < SATURATION or before[chosen] == min(usable_load)
        self.leases.append(lease)

    @rule(index=st.integers(min_value=0, max_value=50), twice=st.booleans())
    def release(self, index: int, twice: bool) -> None:
        if not self.leases:
            return
        lease = self.leases[index % len(self.leases)]
        lease.release()
        if twice:
            lease.release()

    @rule(
        key=st.sampled_from(PROPERTY_KEYS),
        retry_after=st.none() | st.floats(min_value=-1, max_value=2 * MAX_COOLDOWN_S),
    )
    def cool(self, key: str, retry_after: float | None) -> None:
        rest = self.run(self.pool.cool(key, retry_after, "HTTP 429"))
        if key in self.disabled:
            assert rest == 0
            return
        now = self.clock.now
        until_before = self.cooling_until.get(key)
        already_cooling = until_before is not None and until_before > now
        streak = self.rate_limit_streak[key]
        wanted = BASE_COOLDOWN_S * 2**streak if retry_after is None else max(0.0, retry_after)
        fresh = min(wanted, MAX_COOLDOWN_S)
        if already_cooling:
            assert until_before is not None
            # a cooldown never shrinks, and a burst of 429s is one step of the backoff
            assert rest == max(fresh, until_before - now)
            self.cooling_until[key] = max(now + fresh, until_before)
        else:
            assert rest == fresh
            self.rate_limit_streak[key] = streak + 1
            self.cooling_until[key] = now + fresh

    @rule(key=st.sampled_from(PROPERTY_KEYS))
    def transient_failure(self, key: str) -> None:
        self.run(self.pool.report_transient_failure(key, "HTTP 503"))
        if key in self.disabled:
            return
        self.transient_streak[key] += 1
        if self.transient_streak[key] >= FAILURES_BEFORE_REST:
            self.transient_streak[key] = 0
            previous = self.cooling_until.get(key, 0.0)
            self.cooling_until[key] = max(self.clock.now + BASE_COOLDOWN_S, previous)

    @rule(key=st.sampled_from(PROPERTY_KEYS))
    def success(self, key: str) -> None:
        self.run(self.pool.report_success(key))
        self.rate_limit_streak[key] = 0
        self.transient_streak[key] = 0

    @rule(key=st.sampled_from(PROPERTY_KEYS))
    def disable(self, key: str) -> None:
        self.run(self.pool.disable(key, "invalid api key"))
        self.disabled.add(key)
        self.cooling_until.pop(key, None)

    @rule(key=st.sampled_from(PROPERTY_KEYS))
    def enable(self, key: str) -> None:
        self.run(self.pool.enable(key))
        self.disabled.discard(key)
        self.cooling_until.pop(key, None)
        self.rate_limit_streak[key] = 0
        self.transient_streak[key] = 0

    @rule(key=st.sampled_from(PROPERTY_KEYS), tokens=st.integers(min_value=0, max_value=10**6))
    def count_tokens(self, key: str, tokens: int) -> None:
        self.pool.count_tokens(key, tokens)  # fair use moves users, never the rules above

    @rule(works=st.booleans())
    def health_check(self, works: bool) -> None:
        async def check(secret: str) -> bool:
            return works

        self.run(self.pool.recheck(check))
        if works:  # every disable here is automatic: a working key comes back
            for key in self.disabled:
                self.cooling_until.pop(key, None)
                self.rate_limit_streak[key] = 0
                self.transient_streak[key] = 0
            self.disabled.clear()

    @rule(seconds=st.floats(min_value=0, max_value=2 * MAX_COOLDOWN_S))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- invariants --

    @invariant()
    def no_key_is_ever_lost(self) -> None:
        assert set(shown(self.pool)) == set(PROPERTY_KEYS)

    @invariant()
    def in_flight_equals_unreleased_leases_per_key(self) -> None:
        for key_id in PROPERTY_KEYS:
            assert self.pool.in_flight(key_id) == self.held(key_id) >= 0

    @invariant()
    def every_key_shows_the_state_the_model_expects(self) -> None:
        for key_id, key in shown(self.pool).items():
            if key_id in self.disabled:
                assert key.state == "disabled"
            elif self.usable(key_id):
                assert key.state == "active"
            else:
                assert (key.state, key.until) == ("cooling", self.cooling_until[key_id])
            assert key.in_flight == self.held(key_id)


KeyPoolMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestKeyPoolUnderRandomOutcomes = KeyPoolMachine.TestCase


# ---- regressions: cooldowns never shrink, bursts and config toggles --------------------------

FINDINGS_SECRET = "sk-test-aaaaaaaaaaaaaaaaaaaa1111"


async def one_key_pool(clock: FakeClock) -> KeyPool:
    pool = KeyPool(cast(Store, MemoryStore()), clock=clock, sleep=FakeSleep(clock))
    await pool.load([KeyEntry(key=SecretStr(FINDINGS_SECRET))])
    return pool


async def test_a_long_streak_of_rate_limits_without_retry_after_does_not_crash_cool() -> None:
    clock = FakeClock()
    pool = await one_key_pool(clock)
    for _ in range(1100):
        rest = await pool.cool(key_id_of(FINDINGS_SECRET), None, "HTTP 429")
        assert rest <= pool.max_cooldown_s
        clock.advance(rest + 1)


async def test_a_shorter_retry_after_does_not_cut_an_existing_cooldown_short() -> None:
    clock = FakeClock()
    pool = await one_key_pool(clock)
    await pool.cool(key_id_of(FINDINGS_SECRET), 60, "HTTP 429")
    await pool.cool(
        key_id_of(FINDINGS_SECRET), 1, "HTTP 429"
    )  # a request that was already in flight
    assert pool.keys()[0].until == clock.now + 60


async def test_transient_failures_do_not_cut_a_rate_limit_cooldown_short() -> None:
    clock = FakeClock()
    pool = await one_key_pool(clock)
    await pool.cool(key_id_of(FINDINGS_SECRET), 60, "HTTP 429")
    for _ in range(FAILURES_BEFORE_REST):  # in-flight requests timing out
        await pool.report_transient_failure(key_id_of(FINDINGS_SECRET), "timeout")
    assert pool.keys()[0].until == clock.now + 60


async def test_concurrent_rate_limits_from_one_burst_count_as_one_step_of_backoff() -> None:
    clock = FakeClock()
    pool = await one_key_pool(clock)
    leases = [await pool.acquire(f"ou_user_{index}") for index in range(8)]
    rests = [await pool.cool(lease.key_id, None, "HTTP 429") for lease in leases]
    for lease in leases:
        lease.release()
    assert max(rests) <= 2 * pool.base_cooldown_s  # actually [2, 4, 8, ..., 256]


async def test_toggling_enabled_in_config_does_not_revive_an_automatically_disabled_key() -> None:
    pool = await one_key_pool(FakeClock())
    await pool.disable(key_id_of(FINDINGS_SECRET), "invalid api key")
    await pool.load([KeyEntry(key=SecretStr(FINDINGS_SECRET), enabled=False)])
    await pool.load([KeyEntry(key=SecretStr(FINDINGS_SECRET), enabled=True)])
    assert pool.keys()[0].state == "disabled"


# ---- sharing the pool: owners, reservations, fair use, recovery -------------------------------


async def test_owner_first_sends_a_donor_to_their_own_key(make_pool: PoolFactory) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, SECRET_B, SECRET_C)
    donated = await pool.add(DONATED, owner="ou_donor", source="donated")
    pool.owner_first = False
    others = {await use(pool, f"ou_someone_{n}") for n in range(40)}
    assert len(others) > 1  # without the option the donor's key is just one of the pool
    pool.owner_first = True
    assert {await use(pool, "ou_donor") for _ in range(5)} == {donated.key_id}


async def test_a_reserved_key_serves_only_its_users(make_pool: PoolFactory) -> None:
    reserved = {id_of(SECRET_A): ["ou_vip"]}
    pool = await loaded_pool(make_pool, SECRET_A, SECRET_B, reserved_for=reserved)  # type: ignore[arg-type]
    assert await use(pool, "ou_vip") == id_of(SECRET_A)
    assert {await use(pool, f"ou_user_{n}") for n in range(50)} == {id_of(SECRET_B)}


async def test_a_key_over_its_fair_share_of_todays_tokens_loses_some_users(
    make_pool: PoolFactory,
) -> None:
    secrets = (SECRET_A, SECRET_B, SECRET_C, SECRET_D)
    pool = await loaded_pool(make_pool, *secrets)
    users = [f"ou_user_{n}" for n in range(200)]
    before = {user: await use(pool, user) for user in users}
    heavy = id_of(SECRET_A)
    pool.count_tokens(heavy, 90_000)  # one key did most of today's work
    for key in secrets[1:]:
        pool.count_tokens(id_of(key), 10_000)
    after = {user: await use(pool, user) for user in users}
    on_heavy_before = sum(1 for key in before.values() if key == heavy)
    on_heavy_after = sum(1 for key in after.values() if key == heavy)
    assert on_heavy_after < on_heavy_before * 0.6
    moved = [user for user in users if before[user] != after[user]]
    assert all(before[user] == heavy for user in moved)  # only the heavy key's users move


async def test_an_automatically_disabled_key_is_announced_once_and_revived_by_the_check(
    make_pool: PoolFactory,
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    donated = await pool.add(DONATED, owner="ou_donor", source="donated")
    changes: list[tuple[str, str, str]] = []

    async def hook(change: KeyStateChange) -> None:
        changes.append((change.key_id, change.change, change.owner))

    pool.on_state_change = hook
    await pool.disable(donated.key_id, "401 invalid_api_key")
    await pool.disable(donated.key_id, "401 invalid_api_key")  # the same state: no new notice
    assert changes == [(donated.key_id, "disabled", "ou_donor")]

    async def still_dead(secret: str) -> bool:
        return False

    assert await pool.recheck(still_dead) == 0
    assert view(pool, donated.key_id).state == "disabled"

    checked: list[str] = []

    async def works_again(secret: str) -> bool:
        checked.append(secret)
        return True

    assert await pool.recheck(works_again) == 1
    assert checked == [DONATED]
    assert view(pool, donated.key_id).state == "active"
    assert changes[-1] == (donated.key_id, "enabled", "ou_donor")


async def test_a_manual_disable_is_never_lifted_by_the_check(make_pool: PoolFactory) -> None:
    pool = await loaded_pool(make_pool, SECRET_A, SECRET_B)
    await pool.disable(id_of(SECRET_A), "disabled by an admin", by="manual")

    async def works(secret: str) -> bool:
        return True

    assert await pool.recheck(works) == 0
    assert view(pool, id_of(SECRET_A)).state == "disabled"


async def test_a_removed_key_is_gone_from_pool_and_store(
    make_pool: PoolFactory, store: SQLiteStore
) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    donated = await pool.add(DONATED, owner="ou_donor", source="donated")
    assert await pool.remove(donated.key_id) is True
    assert await pool.remove(donated.key_id) is False
    assert donated.key_id not in shown(pool)
    assert donated.key_id not in {key.key_id for key in await store.load_keys()}


async def test_todays_tokens_survive_a_restart(make_pool: PoolFactory, store: SQLiteStore) -> None:
    pool = await loaded_pool(make_pool, SECRET_A)
    day = datetime.fromtimestamp(FakeClock().now).strftime("%Y-%m-%d")
    await store.add_usage(day, "ou_user", id_of(SECRET_A), 100, 23)
    again = await loaded_pool(make_pool, SECRET_A)
    assert view(again, id_of(SECRET_A)).tokens_today == 123
    assert view(pool, id_of(SECRET_A)).tokens_today == 0  # loaded before the usage existed
