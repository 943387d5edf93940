"""The API key pool: which key serves a request, and what happens to a key when it fails.

States: ``active``; ``cooling`` until a time (rate limited, or repeatedly failing); ``disabled``
with a reason, set automatically (auth or quota errors) or manually (``enabled: false``).

Selection for a user: the user's sticky key if it is usable and not saturated, else the usable key
with the fewest requests in flight, ties to the least recently used. Stickiness is rendezvous
hashing of (user, key), so it needs no storage, survives restarts and is the same on every instance;
when a user's key cools down they move to another and come back when it is active again.

When every key is cooling, :meth:`KeyPool.acquire` waits for the earliest to become usable, bounded
by ``max_wait_s``, and tells the caller how long through ``on_wait`` so the user can be told.
State changes are persisted in the store; in-flight counts live in memory, counted by
:class:`Lease`, which is always released. Time comes from an injectable clock and sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from bot.config import KeyEntry
from bot.errors import AllKeysUnavailable
from bot.logging import get_logger, mask_key
from bot.store import KeySource, Store, StoredKey
from bot.timing import Clock, Sleep

WaitNotice = Callable[[float], Awaitable[None]]

log = get_logger(__name__)

#: consecutive transient failures (5xx, timeouts) after which a key rests briefly
FAILURES_BEFORE_REST = 3


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
            if record.source != "donated" and key_id not in configured:
                await self._store.delete_key(key_id)
                del stored[key_id]
                log.info("key_removed", key=record.masked, reason="no longer configured")
        self._keys = stored
        log.info("keys_loaded", total=len(stored), usable=len(self._usable(now)))

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
            log.info("key_added", key=record.masked, owner=owner, source=source)
        return self._view(self._keys[key_id])

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
        usable = self._usable(now)
        if not usable:
            return None
        sticky = max(usable, key=lambda key: _affinity(user_id, key.key_id))
        if self._in_flight.get(sticky.key_id, 0) < self.saturation:
            return sticky
        return min(
            usable,
            key=lambda key: (
                self._in_flight.get(key.key_id, 0),
                self._last_used.get(key.key_id, 0),
            ),
        )

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
        disabled_by = "manual" if by == "manual" else "auto"
        await self._update(
            key_id,
            state="disabled",
            until=None,
            reason=reason,
            disabled_by=disabled_by,
            failures_delta=1,
        )
        log.warning("key_disabled", key=self._masked(key_id), reason=reason, by=disabled_by)

    async def enable(self, key_id: str) -> None:
        """Put a disabled or cooling key back into rotation."""
        self._rate_limits.pop(key_id, None)
        self._transient.pop(key_id, None)
        await self._update(key_id, state="active", until=None, reason=None, disabled_by=None)
        log.info("key_enabled", key=self._masked(key_id))

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


def _affinity(user_id: str, key_id: str) -> int:
    digest = hashlib.blake2b(f"{user_id}\x00{key_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
