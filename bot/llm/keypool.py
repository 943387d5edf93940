"""The API key pool: which key serves a request, and what happens to a key when it fails.

States: ``active``; ``cooling`` until a time (rate limited, or repeatedly failing); ``disabled``
with a reason, set automatically (auth or quota errors) or manually (``enabled: false``).

Selection for a user: among the usable keys the user may use (a key listed in
``keys.reserved_for`` serves only its users), the user's own donated key first when
``keys.owner_first`` is on, else the user's sticky key, if not saturated; else the usable key with
the fewest requests in flight, then the fewest tokens used today, then the least recently used.
Stickiness is weighted rendezvous hashing of (user, key): it needs no storage, survives restarts
and is the same on every instance; a key that has used more tokens today than its fair share
weighs less, so some of its users move to less used keys (donated keys are used fairly) while
most users stay where they are. When a user's key cools down they move to another and come back
when it is active again.

State changes that need a person (a key disabled automatically, a key back in service) are
reported once per change through ``on_state_change``; ``recheck`` re-validates automatically
disabled keys (manual disables are never lifted automatically).

When every key is cooling, :meth:`KeyPool.acquire` waits for the earliest to become usable, bounded
by ``max_wait_s``, and tells the caller how long through ``on_wait`` so the user can be told.
State changes are persisted in the store; in-flight counts live in memory, counted by
:class:`Lease`, which is always released. Time comes from an injectable clock and sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from bot.config import KeyEntry
from bot.errors import AllKeysUnavailable
from bot.logging import get_logger, mask_key
from bot.store import KeySource, Store, StoredKey
from bot.timing import Clock, Sleep

WaitNotice = Callable[[float], Awaitable[None]]
StateChangeHook = Callable[["KeyStateChange"], Awaitable[None]]
#: validates a secret: True when it works again (used by :meth:`KeyPool.recheck`)
KeyChecker = Callable[[str], Awaitable[bool]]

log = get_logger(__name__)

#: consecutive transient failures (5xx, timeouts) after which a key rests briefly
FAILURES_BEFORE_REST = 3
REMOVED_FROM_SETTINGS = "no longer in settings"


def key_id_of(secret: str) -> str:
    """A short, stable, non-reversible id for a key (first 12 hex digits of its SHA-256)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class KeyView:
    """What may be shown about a key: never the secret."""

    key_id: str
    masked: str
    owner: str
    source: KeySource
    state: str
    reason: str | None
    until: float | None
    in_flight: int
    requests: int
    failures: int
    disabled_by: str | None = None
    tokens_today: int = 0


@dataclass(frozen=True)
class KeyStateChange:
    """A key left or re-entered service: what its owner and the admins are told."""

    key_id: str
    masked: str
    owner: str
    source: KeySource
    change: Literal["disabled", "enabled"]
    reason: str


class Lease:
    """One request's hold on a key. Release exactly once (``async with pool.lease(…)`` does)."""

    def __init__(self, pool: KeyPool, key_id: str, secret: str, masked: str) -> None:
        self._pool = pool
        self.key_id = key_id
        self.secret = secret
        self.masked = masked
        self.released = False

    def release(self) -> None:
        """Give the key back; calling it again does nothing."""
        if not self.released:
            self.released = True
            self._pool._release(self.key_id)

    def __repr__(self) -> str:
        return f"Lease(key_id={self.key_id!r}, masked={self.masked!r})"


class KeyPool:
    """Chooses keys for requests and tracks their health; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        max_wait_s: float = 30.0,
        saturation: int = 4,
        base_cooldown_s: float = 2.0,
        max_cooldown_s: float = 300.0,
        owner_first: bool = False,
        reserved_for: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sleep = sleep
        self.max_wait_s = max_wait_s
        self.saturation = saturation
        self.base_cooldown_s = base_cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._keys: dict[str, StoredKey] = {}
        self._in_flight: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._rate_limits: dict[str, int] = {}
        self._transient: dict[str, int] = {}
        self.owner_first = owner_first
        self._reserved = {key: frozenset(users) for key, users in (reserved_for or {}).items()}
        self._tokens_today: dict[str, int] = {}
        self._day = ""
        #: told once per change when a key leaves or re-enters service (owner, admins)
        self.on_state_change: StateChangeHook | None = None
        #: told every secret the pool holds (the log redactor masks them)
        self.on_secret: Callable[[str], None] | None = None

    # ---- loading and adding ----------------------------------------------------------------

    async def load(self, entries: Sequence[KeyEntry]) -> None:
        """Sync the configured keys into the store, then load every stored key.

        A configured key keeps its stored state and counters; ``enabled: false`` disables it
        manually and ``enabled: true`` lifts a manual disable (never an automatic one: a key
        refused by the provider stays out). Config or env keys no longer configured are removed;
        donated keys stay.
        """
        stored = {key.key_id: key for key in await self._store.load_keys()}
        configured: set[str] = set()
        now = self._clock()
        for entry in entries:
            secret = entry.key.get_secret_value()
            key_id = key_id_of(secret)
            configured.add(key_id)
            source: KeySource = "env" if entry.owner == "env" else "config"
            record = stored.get(key_id) or StoredKey(
                key_id=key_id,
                secret=secret,
                masked=mask_key(secret),
                owner=entry.owner,
                source=source,
                created_at=now,
            )
            record = replace(record, owner=entry.owner, source=source)
            auto_disabled = record.state == "disabled" and record.disabled_by == "auto"
            if not entry.enabled and not auto_disabled:  # keep the automatic reason
                record = replace(
                    record,
                    state="disabled",
                    reason="disabled in settings",
                    disabled_by="manual",
                    until=None,
                )
            elif entry.enabled and record.state == "disabled" and record.disabled_by == "manual":
                record = replace(record, state="active", reason=None, disabled_by=None, until=None)
            await self._store.save_key(record)
            stored[key_id] = record
        for key_id, record in list(stored.items()):
            if record.source == "donated" or key_id in configured or record.state == "disabled":
                continue
            # Taken out of settings.yaml or the environment: out of service, but kept (with its
            # usage) so putting it back restores it; `keys remove` deletes it for good.
            record = replace(
                record,
                state="disabled",
                reason=REMOVED_FROM_SETTINGS,
                disabled_by="manual",
                until=None,
            )
            await self._store.save_key(record)
            stored[key_id] = record
            log.info("key_deactivated", key=record.masked, reason=REMOVED_FROM_SETTINGS)
        self._keys = stored
        for record in stored.values():
            if self.on_secret is not None:
                self.on_secret(record.secret)
        await self._load_usage(now)
        log.info("keys_loaded", total=len(stored), usable=len(self._usable(now)))

    async def _load_usage(self, now: float) -> None:
        self._day = _day_of(now)
        self._tokens_today = {}
        for row in await self._store.usage_for_day(self._day):
            tokens = row.prompt_tokens + row.completion_tokens
            self._tokens_today[row.key_id] = self._tokens_today.get(row.key_id, 0) + tokens

    async def add(self, secret: str, *, owner: str, source: KeySource) -> KeyView:
        """Add a key (active) or return the existing one with the same secret."""
        key_id = key_id_of(secret)
        if key_id not in self._keys:
            record = StoredKey(
                key_id=key_id,
                secret=secret,
                masked=mask_key(secret),
                owner=owner,
                source=source,
                created_at=self._clock(),
            )
            await self._store.save_key(record)
            self._keys[key_id] = record
            if self.on_secret is not None:
                self.on_secret(secret)
            log.info("key_added", key=record.masked, owner=owner, source=source)
        return self._view(self._keys[key_id])

    def has(self, secret: str) -> KeyView | None:
        """The key with this secret, if the pool holds it."""
        record = self._keys.get(key_id_of(secret))
        return self._view(record) if record is not None else None

    async def remove(self, key_id: str) -> bool:
        """Delete a key for good; True when it existed."""
        record = self._keys.pop(key_id, None)
        if record is None:
            return False
        await self._store.delete_key(key_id)
        log.info("key_removed", key=record.masked)
        return True

    def count_tokens(self, key_id: str, tokens: int) -> None:
        """Add tokens a request on ``key_id`` cost today (for fair use of the keys)."""
        self._roll_day(self._clock())
        self._tokens_today[key_id] = self._tokens_today.get(key_id, 0) + max(0, tokens)

    def _roll_day(self, now: float) -> None:
        day = _day_of(now)
        if day != self._day:
            self._day, self._tokens_today = day, {}

    def keys(self) -> list[KeyView]:
        """Every key, masked, with its current state."""
        self._wake_cooled(self._clock())
        return [self._view(record) for record in self._keys.values()]

    def _view(self, record: StoredKey) -> KeyView:
        return KeyView(
            key_id=record.key_id,
            masked=record.masked,
            owner=record.owner,
            source=record.source,
            state=record.state,
            reason=record.reason,
            until=record.until,
            in_flight=self._in_flight.get(record.key_id, 0),
            requests=record.requests,
            failures=record.failures,
            disabled_by=record.disabled_by,
            tokens_today=self._tokens_today.get(record.key_id, 0),
        )

    # ---- selection -------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(
        self, user_id: str, *, on_wait: WaitNotice | None = None
    ) -> AsyncIterator[Lease]:
        """``async with pool.lease(user) as lease:`` — acquire a key and always release it."""
        held = await self.acquire(user_id, on_wait=on_wait)
        try:
            yield held
        finally:
            held.release()

    async def acquire(self, user_id: str, *, on_wait: WaitNotice | None = None) -> Lease:
        """Choose a key for ``user_id``; wait (bounded) while every key is cooling.

        Raises :class:`AllKeysUnavailable` when there is no key, every key is disabled, or the
        earliest cooling key would make the total wait exceed ``max_wait_s``.
        """
        waited = 0.0
        while True:
            now = self._clock()
            chosen = self._choose(user_id, now)
            if chosen is not None:
                self._in_flight[chosen.key_id] = self._in_flight.get(chosen.key_id, 0) + 1
                self._last_used[chosen.key_id] = now
                return Lease(self, chosen.key_id, chosen.secret, chosen.masked)
            cooling = [key.until or now for key in self._keys.values() if key.state == "cooling"]
            if not cooling:
                if not self._keys:
                    raise AllKeysUnavailable("no API key is configured yet")
                raise AllKeysUnavailable("every API key is disabled")
            delay = max(0.0, min(cooling) - now)
            if waited + delay > self.max_wait_s:
                raise AllKeysUnavailable(f"every API key is rate limited for another {delay:.0f} s")
            log.info("keys_all_cooling", wait_s=round(delay, 3), user=user_id)
            if on_wait is not None:
                await on_wait(delay)
            await self._sleep(delay)
            waited += delay

    def _choose(self, user_id: str, now: float) -> StoredKey | None:
        usable = [key for key in self._usable(now) if self._may_use(user_id, key.key_id)]
        if not usable:
            return None
        self._roll_day(now)
        free = [key for key in usable if self._in_flight.get(key.key_id, 0) < self.saturation]
        reserved = [key for key in free if key.key_id in self._reserved]
        if reserved:
            return reserved[0]  # a key kept for this user
        if self.owner_first:
            own = [key for key in free if key.source == "donated" and key.owner == user_id]
            if own:
                return own[0]
        fair = max(1.0, sum(self._tokens_today.get(k.key_id, 0) for k in usable) / len(usable))
        sticky = max(usable, key=lambda key: self._affinity(user_id, key.key_id, fair))
        if self._in_flight.get(sticky.key_id, 0) < self.saturation:
            return sticky
        return min(
            usable,
            key=lambda key: (
                self._in_flight.get(key.key_id, 0),
                self._tokens_today.get(key.key_id, 0),
                self._last_used.get(key.key_id, 0),
            ),
        )

    def _may_use(self, user_id: str, key_id: str) -> bool:
        users = self._reserved.get(key_id)
        return users is None or user_id in users

    def _affinity(self, user_id: str, key_id: str, fair: float) -> float:
        """Weighted rendezvous score: a key over its fair share of today's tokens weighs less."""
        weight = 1.0 / max(1.0, self._tokens_today.get(key_id, 0) / fair)
        return float(_uniform(user_id, key_id) ** (1.0 / weight))

    def _usable(self, now: float) -> list[StoredKey]:
        self._wake_cooled(now)
        return [key for key in self._keys.values() if key.state == "active"]

    def _wake_cooled(self, now: float) -> None:
        for key_id, record in self._keys.items():
            if record.state == "cooling" and (record.until or 0) <= now:
                self._keys[key_id] = replace(record, state="active", until=None, reason=None)

    def _release(self, key_id: str) -> None:
        remaining = self._in_flight.get(key_id, 0) - 1
        if remaining < 0:
            raise RuntimeError(f"key {key_id} released more often than leased")
        self._in_flight[key_id] = remaining

    def in_flight(self, key_id: str) -> int:
        """Requests currently holding this key."""
        return self._in_flight.get(key_id, 0)

    # ---- outcomes --------------------------------------------------------------------------

    async def report_success(self, key_id: str) -> None:
        """The key served a request: reset its failure streaks and count the request."""
        self._rate_limits.pop(key_id, None)
        self._transient.pop(key_id, None)
        await self._update(key_id, requests_delta=1, last_used_at=self._clock())

    async def cool(self, key_id: str, retry_after_s: float | None, reason: str) -> float:
        """Rest a rate-limited key for ``retry_after_s`` (else exponentially); return the rest.

        A key already cooling keeps the later of its current and the new end, and the 429s of
        one burst of concurrent requests count as one step of the exponential backoff.
        """
        record = self._keys.get(key_id)
        if record is None or record.state == "disabled":
            return 0.0
        now = self._clock()
        already_cooling = record.state == "cooling" and (record.until or 0) > now
        streak = self._rate_limits.get(key_id, 0)
        if not already_cooling:
            self._rate_limits[key_id] = streak + 1
        rest: float
        if retry_after_s is None:
            rest = self.base_cooldown_s * float(2 ** min(streak, 30))
        else:
            rest = max(0.0, retry_after_s)
        rest = min(rest, self.max_cooldown_s)
        until = now + rest
        if already_cooling and record.until is not None:
            until = max(until, record.until)
            rest = max(rest, record.until - now)
        await self._update(key_id, state="cooling", until=until, reason=reason, failures_delta=1)
        log.warning("key_cooled", key=record.masked, seconds=round(rest, 3), reason=reason)
        return rest

    async def report_transient_failure(self, key_id: str, reason: str) -> None:
        """A 5xx, timeout or connection error: count it; rest the key after a streak."""
        if key_id not in self._keys or self._is_disabled(key_id):
            return
        streak = self._transient.get(key_id, 0) + 1
        self._transient[key_id] = streak
        if streak >= FAILURES_BEFORE_REST:
            self._transient[key_id] = 0
            record = self._keys[key_id]
            until = self._clock() + self.base_cooldown_s
            if record.state == "cooling":
                until = max(until, record.until or 0)  # never cut a rate-limit rest short
            await self._update(
                key_id, state="cooling", until=until, reason=reason, failures_delta=1
            )
            log.warning("key_rested", key=self._masked(key_id), failures=streak, reason=reason)
        else:
            await self._update(key_id, failures_delta=1)

    async def disable(self, key_id: str, reason: str, *, by: str = "auto") -> None:
        """Take a key out of rotation until re-enabled (auth, quota, or by hand)."""
        record = self._keys.get(key_id)
        if record is None:
            return
        was_disabled = record.state == "disabled"
        disabled_by = "manual" if by == "manual" else "auto"
        await self._update(
            key_id,
            state="disabled",
            until=None,
            reason=reason,
            disabled_by=disabled_by,
            failures_delta=1 if disabled_by == "auto" else 0,  # a person is no failure
        )
        log.warning("key_disabled", key=record.masked, reason=reason, by=disabled_by)
        if not was_disabled and disabled_by == "auto":
            await self._announce(key_id, "disabled", reason)

    async def enable(self, key_id: str, *, reason: str = "enabled by hand") -> None:
        """Put a disabled or cooling key back into rotation."""
        record = self._keys.get(key_id)
        if record is None:
            return
        self._rate_limits.pop(key_id, None)
        self._transient.pop(key_id, None)
        await self._update(key_id, state="active", until=None, reason=None, disabled_by=None)
        log.info("key_enabled", key=record.masked, reason=reason)
        if record.state == "disabled" and record.disabled_by == "auto":
            await self._announce(key_id, "enabled", reason)

    async def recheck(self, works: KeyChecker) -> int:
        """Validate every automatically disabled key again; re-enable those that work.
        Manual disables are left alone. Return how many came back."""
        revived = 0
        for record in list(self._keys.values()):
            if record.state != "disabled" or record.disabled_by != "auto":
                continue
            try:
                ok = await works(record.secret)
            except Exception as exc:  # a check that failed proves nothing: try next time
                log.warning("key_recheck_failed", key=record.masked, error=type(exc).__name__)
                continue
            if ok:
                await self.enable(record.key_id, reason="works again (health check)")
                revived += 1
        return revived

    async def _announce(
        self, key_id: str, change: Literal["disabled", "enabled"], why: str
    ) -> None:
        record = self._keys[key_id]
        if self.on_state_change is None:
            return
        event = KeyStateChange(key_id, record.masked, record.owner, record.source, change, why)
        try:
            await self.on_state_change(event)
        except Exception as exc:  # telling people must never break serving requests
            log.warning("key_change_not_announced", key=record.masked, error=repr(exc))

    def _is_disabled(self, key_id: str) -> bool:
        record = self._keys.get(key_id)
        return record is not None and record.state == "disabled"

    def _masked(self, key_id: str) -> str:
        record = self._keys.get(key_id)
        return record.masked if record else key_id

    async def _update(
        self,
        key_id: str,
        *,
        requests_delta: int = 0,
        failures_delta: int = 0,
        **changes: object,
    ) -> None:
        record = self._keys.get(key_id)
        if record is None:
            return
        updated = replace(
            record,
            requests=record.requests + requests_delta,
            failures=record.failures + failures_delta,
            **changes,  # type: ignore[arg-type]
        )
        self._keys[key_id] = updated
        await self._store.save_key(updated)


def _uniform(user_id: str, key_id: str) -> float:
    """A stable pseudo-random number in (0, 1) for (user, key)."""
    digest = hashlib.blake2b(f"{user_id}\x00{key_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 2)


def _day_of(moment: float) -> str:
    """The local calendar day usage is counted under (as the conversation service does)."""
    return datetime.fromtimestamp(moment).strftime("%Y-%m-%d")
