"""Print how the key pool holds up when demand meets the provider's per-key rate limit.

K keys, each limited by the fake OpenAI server to R requests per (rolling) minute, answering 429
``rate_limit_exceeded`` with Retry-After beyond it. Simulated users, one new user id per request,
arrive at a steady rate of 0.9 and 1.5 times the pool's capacity K·R per minute for a fixed
window. Each demand level is served twice, by the real :class:`bot.llm.keypool.KeyPool` and by a
naive round-robin pool; both sit under the same real :class:`bot.llm.client.LLMClient` (the real
``openai`` SDK, the default ``llm.max_attempts`` and ``max_wait_s``), so only the pool differs.

Time is simulated so that a minute lasts a few real seconds: the fake's rpm window always spans
60 seconds of its clock (the length is a constant, the clock is injectable), so the fake, the
pool (its clock and sleep) and the client's retry sleep all run on one clock that moves
``SPEEDUP`` times faster than the real one. Retry-After values, cool-downs and ``max_wait_s`` are
therefore in simulated seconds. Work that really takes time (loopback HTTP, the SDK, the SQLite
writes, the fake's first-token delay) takes real time and so weighs ``SPEEDUP`` times more in
simulated seconds than it would in production.

Numbers only, no thresholds. Everything talks to 127.0.0.1 only; every run is bounded in
requests and in time.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import percentile
from bot.config import KeyEntry, LLMSettings
from bot.errors import LLMError
from bot.llm.client import LLMClient
from bot.llm.events import ChatMessage, TextDelta, WaitingForKey
from bot.llm.keypool import KeyPool, Lease, WaitNotice
from bot.logging import configure_logging, mask_key
from bot.store import SQLiteStore
from tests.fakes.openai_server import RPM_WINDOW_SECONDS, FakeOpenAI, RequestRecord

K = 5  # keys
R = 20  # requests per simulated minute per key (the fake's rpm_limit)
SPEEDUP = 10.0  # simulated seconds per real second: a simulated minute lasts 6 s
WINDOW_MIN = 2.0  # simulated minutes of arrivals per run
DEMANDS = (0.9, 1.5)  # arrivals per minute, as a multiple of K·R
FIRST_TOKEN_S = 0.1  # real seconds: the fake's first_token_delay (1 simulated second)
DRAIN_LIMIT_S = 30.0  # real seconds a run may take after its last arrival before it is cut
REPLY = "ok"
KEYS = tuple(f"sk-bench-keypool-{index:02d}-{'x' * 16}" for index in range(K))
DEFAULTS = LLMSettings()  # llm.max_attempts and llm.max_wait_s as shipped
ERRORS = {
    "LLMError": f"LLMError (all {DEFAULTS.max_attempts} attempts failed)",
    "AllKeysUnavailable": "AllKeysUnavailable (the wait would pass max_wait_s)",
}


class SimTime:
    """One clock for the fake, the pool and the client: ``SPEEDUP`` times real time."""

    def __init__(self) -> None:
        self._origin = time.monotonic()
        self._base = 1_000_000.0

    def now(self) -> float:
        return self._base + (time.monotonic() - self._origin) * SPEEDUP

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / SPEEDUP)


# ---- the naive pool -------------------------------------------------------------------------


class _RoundRobinLease:
    def __init__(self, secret: str) -> None:
        self.key_id = secret[-20:]
        self.secret = secret
        self.masked = mask_key(secret)

    def release(self) -> None:
        pass


class RoundRobinPool:
    """Hands out the keys in turn; never cools, never waits.

    Duck-types the few :class:`KeyPool` methods :class:`LLMClient` calls, so the client's
    retry (next attempt at once, on the next key, within ``max_attempts``) is the same.
    """

    def __init__(self, secrets: Sequence[str]) -> None:
        self._turn = itertools.cycle(secrets)

    async def acquire(self, user_id: str, *, on_wait: WaitNotice | None = None) -> _RoundRobinLease:
        return _RoundRobinLease(next(self._turn))

    async def cool(self, key_id: str, retry_after_s: float | None, reason: str) -> float:
        return 0.0

    async def disable(self, key_id: str, reason: str) -> None:
        pass

    async def report_transient_failure(self, key_id: str, reason: str) -> None:
        pass

    async def report_success(self, key_id: str) -> None:
        pass


# ---- one run --------------------------------------------------------------------------------


@dataclass
class Request:
    """One simulated user's request, in real monotonic seconds."""

    start: float
    first_token: float | None = None
    waited: bool = False
    error: str | None = None
    done: bool = False


@dataclass
class Upstream:
    """Simulated arrival times of the requests the fake admitted (past its rpm check)."""

    admitted: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, record: RequestRecord) -> str:
        # Called by the fake only for requests that passed its rpm check.
        with self.lock:
            self.admitted.append(record.time)
        return REPLY


@dataclass
class RunResult:
    pool: str
    demand: float
    requests: list[Request]
    admitted: list[float]
    upstream_calls: int
    sim_start: float
    real_s: float
    # KeyPool only: its 429s by what led to them (see classify_429s)
    causes: dict[str, int] = field(default_factory=dict)

    @property
    def successes(self) -> int:
        return sum(r.done and r.error is None for r in self.requests)

    @property
    def failures(self) -> list[Request]:
        return [r for r in self.requests if r.error is not None]

    @property
    def unfinished(self) -> int:
        return sum(not r.done for r in self.requests)

    @property
    def throughput(self) -> float:
        """Admitted upstream requests that arrived in the window / the window's K·R."""
        end = self.sim_start + WINDOW_MIN * RPM_WINDOW_SECONDS
        inside = sum(self.sim_start <= t < end for t in self.admitted)
        return inside / (K * R * WINDOW_MIN)

    @property
    def rate_limited(self) -> int:
        return self.upstream_calls - len(self.admitted)

    def added_latency_sim(self) -> list[float]:
        return [
            (r.first_token - r.start - FIRST_TOKEN_S) * SPEEDUP
            for r in self.requests
            if r.first_token is not None
        ]


async def ask(llm: LLMClient, user_id: str, request: Request) -> None:
    messages = [ChatMessage("user", f"question from {user_id}")]
    try:
        async for event in llm.stream(messages, user_id=user_id):
            if isinstance(event, WaitingForKey):
                request.waited = True
            elif isinstance(event, TextDelta) and request.first_token is None:
                request.first_token = time.monotonic()
    except LLMError as exc:
        request.error = type(exc).__name__
    request.done = True


_woke: contextvars.ContextVar[bool] = contextvars.ContextVar("woke", default=False)

CAUSE_WOKE = "after waiting for a key"
CAUSE_IN_FLIGHT = "key already cooling"
CAUSE_FIRST = "first 429 of a full key"


def classify_429s(pool: KeyPool, result: RunResult) -> None:
    """Wrap ``pool.acquire`` and ``pool.cool`` to sort the 429s the pool is told about.

    An attempt's acquire and its 429 run in the same task, so a context variable carries
    whether that acquire slept because every key was cooling. Causes, first match wins:
    the attempt had waited for a key (it woke with the other waiters when the earliest rest
    ended); the key was already cooling when the 429 came back (the request was sent before
    an earlier 429 of the same key cooled it); else the first 429 of a key that was full.
    """
    acquire, cool = pool.acquire, pool.cool

    async def timed_acquire(user_id: str, *, on_wait: WaitNotice | None = None) -> Lease:
        slept = False

        async def notice(seconds: float) -> None:
            nonlocal slept
            slept = True
            if on_wait is not None:
                await on_wait(seconds)

        lease = await acquire(user_id, on_wait=notice)
        _woke.set(slept)
        return lease

    async def counted_cool(key_id: str, retry_after_s: float | None, reason: str) -> float:
        views = pool.keys()  # also wakes keys whose rest is over, as the pool's next step would
        if _woke.get():
            cause = CAUSE_WOKE
        elif any(view.key_id == key_id and view.state == "cooling" for view in views):
            cause = CAUSE_IN_FLIGHT
        else:
            cause = CAUSE_FIRST
        result.causes[cause] = result.causes.get(cause, 0) + 1
        return await cool(key_id, retry_after_s, reason)

    pool.acquire = timed_acquire  # type: ignore[method-assign]
    pool.cool = counted_cool  # type: ignore[method-assign]


async def drive(llm: LLMClient, demand: float, requests: list[Request]) -> None:
    """Start the arrivals at a steady rate, then wait (bounded) for every request to end."""
    count = round(demand * K * R * WINDOW_MIN)
    interval = RPM_WINDOW_SECONDS / (demand * K * R) / SPEEDUP  # real seconds between arrivals
    started = time.monotonic()
    window_s = WINDOW_MIN * RPM_WINDOW_SECONDS / SPEEDUP
    try:
        async with asyncio.timeout(window_s + DRAIN_LIMIT_S), asyncio.TaskGroup() as group:
            for index in range(count):
                await asyncio.sleep(max(0.0, started + index * interval - time.monotonic()))
                request = Request(start=time.monotonic())
                requests.append(request)
                group.create_task(ask(llm, f"ou_bench_user_{index:05d}", request))
    except TimeoutError:
        pass  # the unfinished requests are reported as such


async def run(pool_name: str, demand: float) -> RunResult:
    clock = SimTime()
    upstream = Upstream()
    fake = FakeOpenAI(clock=clock.now)
    fake.default.rpm_limit = R
    fake.default.reply = upstream.reply
    fake.default.first_token_delay = FIRST_TOKEN_S
    fake.default.chunk_size = 64
    server = fake.run_in_thread()
    requests: list[Request] = []
    try:
        settings = LLMSettings(
            base_url=fake.base_url,
            keys=[KeyEntry(key=SecretStr(secret)) for secret in KEYS],
        )
        with tempfile.TemporaryDirectory(prefix="bench-keypool-") as tmp:
            store = SQLiteStore(Path(tmp) / "bot.db", clock=clock.now)
            await store.open()
            result = RunResult(pool_name, demand, requests, upstream.admitted, 0, 0.0, 0.0)
            try:
                pool: KeyPool
                if pool_name == "KeyPool":
                    pool = KeyPool(
                        store, clock=clock.now, sleep=clock.sleep, max_wait_s=settings.max_wait_s
                    )
                    await pool.load(settings.keys)
                    classify_429s(pool, result)
                else:
                    pool = cast(KeyPool, RoundRobinPool(KEYS))  # duck-typed, see its docstring
                llm = LLMClient(settings, pool, sleep=clock.sleep)
                try:
                    started = time.monotonic()
                    result.sim_start = clock.now()
                    await drive(llm, demand, requests)
                    result.real_s = time.monotonic() - started
                finally:
                    await llm.aclose()
            finally:
                await store.close()
        result.upstream_calls = len(fake.requests)
        return result
    finally:
        server.close()


# ---- report ---------------------------------------------------------------------------------


def print_header() -> None:
    minute_s = RPM_WINDOW_SECONDS / SPEEDUP
    demands = " and ".join(f"{d:g}·K·R = {d * K * R:g}/min" for d in DEMANDS)
    lines = [
        f"Key pool under rate limits: K = {K} keys, each limited by the fake OpenAI to R = {R}",
        "requests per rolling minute (429 rate_limit_exceeded + Retry-After beyond it);"
        f" K·R = {K * R}/min.",
        "Simulated time: the fake's rpm window is a fixed 60 s of its injectable clock; that",
        "clock, the pool's clock and sleep and the client's retry sleep all run"
        f" {SPEEDUP:g}x real time,",
        f"so a simulated minute lasts {minute_s:g} real s. Times are simulated s unless marked"
        " real.",
        f"Arrivals: one new user id per request, evenly spaced, for {WINDOW_MIN:g} simulated"
        " minutes",
        f"at {demands}; then the run drains (cut after {DRAIN_LIMIT_S:g} real s).",
        f"LLMClient (real openai SDK) with the default llm.max_attempts = {DEFAULTS.max_attempts},"
        f" max_wait_s = {DEFAULTS.max_wait_s:g}.",
        "KeyPool: SQLiteStore in a temp dir, other parameters default. Naive pool: keys in turn,",
        "on 429 the next attempt takes the next key, no cooling, no waiting; same client and",
        f"attempt budget. Fake first_token_delay {FIRST_TOKEN_S * 1000:g} real ms"
        f" ({FIRST_TOKEN_S * SPEEDUP:g} simulated s).",
        f"Machine: {os.cpu_count()} cores, loopback HTTP to 127.0.0.1, the fake in a thread of"
        " this process.",
        f"Real-time costs (HTTP, SDK, SQLite) weigh {SPEEDUP:g}x in simulated seconds:"
        f" 0.1 s simulated = {100 / SPEEDUP:g} ms real.",
    ]
    print("\n".join(lines))


def print_results(results: Sequence[RunResult]) -> None:
    print()
    print(
        f"{'pool':9} {'demand':>6} {'reqs':>5} {'ok':>4} {'failed':>6} {'unfin':>5}"
        f" {'thru/KR':>7} {'429s':>5} {'429/ok':>6} {'waited':>6}"
        f" {'added p50':>9} {'p99':>6} {'max':>6} {'real s':>6}"
    )
    for result in results:
        latency = result.added_latency_sim()
        ok = result.successes
        per_success = result.rate_limited / ok if ok else float("nan")
        top = max(latency) if latency else float("nan")
        print(
            f"{result.pool:9} {result.demand:5.1f}x {len(result.requests):5d} {ok:4d}"
            f" {len(result.failures):6d} {result.unfinished:5d} {result.throughput:7.3f}"
            f" {result.rate_limited:5d} {per_success:6.2f}"
            f" {sum(r.waited for r in result.requests):6d}"
            f" {percentile(latency, 50):9.2f} {percentile(latency, 99):6.2f} {top:6.2f}"
            f" {result.real_s:6.1f}"
        )
    notes = [
        "thru/KR = upstream requests the fake admitted that arrived inside the window"
        f" / (K·R·{WINDOW_MIN:g} min);",
        "reqs = requests started; ok = successful ones, also those served while draining;",
        "failed = ones that ended in an error after all attempts (user-visible); unfin = cut by",
        "the time bound; 429s = rate-limited upstream calls of the whole run; waited = requests",
        "told to wait for a key (WaitingForKey); added = request start -> first token minus the",
        "fake's first_token_delay, simulated s, over the successful requests.",
    ]
    print("\n".join(notes))
    print()
    print("User-visible failures by error:")
    for result in results:
        kinds: dict[str, int] = {}
        for request in result.failures:
            assert request.error is not None
            kinds[request.error] = kinds.get(request.error, 0) + 1
        named = ", ".join(f"{ERRORS.get(k, k)}: {n}" for k, n in sorted(kinds.items())) or "none"
        print(f"  {result.pool:9} {result.demand:3.1f}x  {named}")
    print()
    print(
        "KeyPool's 429s by cause, first match wins: after waiting for a key = the attempt had"
        " slept\nbecause every key was cooling, and woke with the other waiters; key already"
        " cooling = sent\nbefore an earlier 429 of the same key cooled it; else the first 429"
        " of a full key."
    )
    causes = (CAUSE_WOKE, CAUSE_IN_FLIGHT, CAUSE_FIRST)
    print(f"  {'':14}" + "".join(f" {cause:>24}" for cause in causes))
    for result in results:
        if result.pool == "KeyPool":
            cells = "".join(f" {result.causes.get(cause, 0):24d}" for cause in causes)
            print(f"  {result.pool:9} {result.demand:3.1f}x{cells}")


def main() -> None:
    configure_logging(level="error")  # the pool's warnings (key_cooled…) would flood the output
    started = time.monotonic()
    print_header()
    runs: list[tuple[str, float]] = [(p, d) for d in DEMANDS for p in ("KeyPool", "naive RR")]
    results: list[RunResult] = []
    for pool_name, demand in runs:
        results.append(asyncio.run(run(pool_name, demand)))
    print_results(results)
    print(f"\n(total benchmark time {time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
