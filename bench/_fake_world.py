"""The fakes of bench/concurrency.py, set up for one scenario, and a watch on their health.

The fake Feishu and the fake OpenAI of ``tests/fakes`` run in two threads of the benchmark
process (one event loop each, one GIL between them). Every Feishu REST call pays one emulated
round trip (``Scenario.rtt_s``, a delay rule like bench/feishu_latency.py's); the fake LLM streams
a fixed answer with a first-token delay and a delay per chunk, and notes when it really sent the
first token and the end of each answer (:class:`TimedFakeOpenAI`).

:class:`FakeHealth` tells whether the fakes kept up during a burst: the CPU seconds of each fake's
thread, and how late each fake's event loop ran a callback posted to it every 50 ms (a loop that
is late delays every answer it serves, whichever bot is measured).

With ``feishu_limits`` the fake Feishu also refuses calls beyond the rate limits Feishu documents
(HTTP 429, code 99991400, with ``x-ogw-ratelimit-reset``): 50 per second and 1000 per minute per
app for each of the answer path's APIs (card create, element content, card settings, message
reply), 10 per second per card for the CardKit calls. The plain fake has no limits at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bench._procstat import process_cpu_s, thread_cpu_s
from tests.fakes.feishu_server import (
    FakeFeishu,
    FakeFeishuThread,
    RestCall,
    _Reply,
    _sample_error,
)
from tests.fakes.openai_server import (
    Behaviour,
    FakeOpenAI,
    FakeOpenAIThread,
    Gate,
    RequestRecord,
    _Effective,
)

ANSWER_WORDS = (
    "Sure! Here is what I know about it, in a few plain sentences with enough words to fill a "
    "real answer on a phone screen: the first part explains the idea, the second part gives an "
    "example, and the last part says what to watch out for when you try it yourself. "
)

#: Feishu's documented limits per app: (calls, window seconds), for each answer-path API
APP_LIMITS: dict[str, tuple[tuple[int, float], ...]] = dict.fromkeys(
    ("card_create", "card_element_content", "card_settings", "card_batch_update", "message_reply"),
    ((50, 1.0), (1000, 60.0)),
)
#: Feishu's documented limit per card entity for the card and element APIs
CARD_LIMIT = (10, 1.0)
PROBE_EVERY_S = 0.05


@dataclass(frozen=True)
class Scenario:
    """What the fakes do: the LLM's timing and answer, Feishu's round trip, the update spacing."""

    ttft_s: float = 0.4
    chunk_delay_s: float = 0.1
    chunks: int = 20
    chunk_chars: int = 24
    rtt_s: float = 0.03
    update_ms: int = 300

    @property
    def answer(self) -> str:
        """Exactly ``chunks`` chunks of ``chunk_chars`` characters."""
        size = self.chunks * self.chunk_chars
        return (ANSWER_WORDS * (size // len(ANSWER_WORDS) + 1))[: size - 1] + "."

    @property
    def first_chunk(self) -> str:
        """The text of the LLM's first chunk: a card showing it shows the answer has begun."""
        return self.answer[: self.chunk_chars].strip()

    @property
    def llm_answer_s(self) -> float:
        """The model's nominal time from request to last token."""
        return self.ttft_s + (self.chunks - 1) * self.chunk_delay_s


class LimitedFakeFeishu(FakeFeishu):
    """The fake Feishu, refusing calls over Feishu's documented rate limits (see above)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._windows: dict[tuple[str, float], deque[float]] = {}

    def _dispatch(self, call: RestCall) -> _Reply:
        # Runs under the fake's state lock, after the round-trip delay.
        now = time.monotonic()
        checks = [
            ((call.endpoint, window), calls, window)
            for calls, window in APP_LIMITS.get(call.endpoint, ())
        ]
        card_id = call.path_params.get("card_id")
        if card_id is not None:
            checks.append(((f"card:{card_id}", CARD_LIMIT[1]), CARD_LIMIT[0], CARD_LIMIT[1]))
        reset = 0.0
        for key, limit, window in checks:
            times = self._windows.setdefault(key, deque())
            while times and times[0] <= now - window:
                times.popleft()
            if len(times) >= limit:
                reset = max(reset, times[0] + window - now)
        if reset > 0:
            refused = _sample_error("rate_limited")
            refused.headers["x-ogw-ratelimit-reset"] = str(max(1, math.ceil(reset)))
            return refused
        for key, _, _ in checks:
            self._windows[key].append(now)
        return super()._dispatch(call)


class TimedFakeOpenAI(FakeOpenAI):
    """The fake OpenAI, noting when each answer's first token and its end were really sent.

    Its delays are ``asyncio`` sleeps on a loop shared by every stream, so under load the model
    runs late; these times are the LLM's own, to compare a bot's first and final text with.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first_token_at: dict[int, float] = {}
        """``RequestRecord.index -> time.monotonic()`` when the first-token delay was over."""
        self.finished_at: dict[int, float] = {}
        """``RequestRecord.index -> time.monotonic()`` when the answer was written out."""
        self._serving: dict[int, int] = {}  # id(request) -> its record's index

    async def _reply(
        self,
        request: web.Request,
        record: RequestRecord,
        effective: _Effective,
        behaviour: Behaviour | None,
        gate: Gate | None,
    ) -> web.StreamResponse:
        self._serving[id(request)] = record.index
        try:
            return await super()._reply(request, record, effective, behaviour, gate)
        finally:
            self._serving.pop(id(request), None)
            self.finished_at[record.index] = time.monotonic()

    async def _sleep(self, seconds: float, request: web.Request) -> None:
        # The first sleep of a reply is its first-token delay.
        await super()._sleep(seconds, request)
        index = self._serving.get(id(request))
        if index is not None:
            self.first_token_at.setdefault(index, time.monotonic())


@dataclass
class FakeWorld:
    """The two fakes of one bot run, their threads and loops."""

    feishu: FakeFeishuThread
    openai: FakeOpenAIThread
    openai_loop: asyncio.AbstractEventLoop
    threads: dict[str, int]
    """``fake name -> native thread id`` (for their CPU time)."""

    @property
    def fs(self) -> FakeFeishu:
        return self.feishu.fake

    @property
    def llm(self) -> TimedFakeOpenAI:
        assert isinstance(self.openai.fake, TimedFakeOpenAI)
        return self.openai.fake


def _new_thread(name: str, before: set[int]) -> int:
    for thread in threading.enumerate():
        ident = thread.native_id
        if thread.name == name and ident is not None and ident not in before:
            return ident
    raise RuntimeError(f"no new thread named {name!r}")


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@contextlib.contextmanager
def fake_world(scenario: Scenario, *, feishu_limits: bool) -> Iterator[FakeWorld]:
    """Start both fakes scripted for ``scenario``; stop them afterwards.

    The round-trip delay is not on yet (a bot's start should not pay it): call
    :func:`start_round_trips` once the bot is connected.
    """
    before = {t.native_id for t in threading.enumerate() if t.native_id is not None}
    fake: FakeFeishu = LimitedFakeFeishu() if feishu_limits else FakeFeishu()
    feishu = fake.run_in_thread()
    openai = TimedFakeOpenAI().run_in_thread()
    try:
        script = openai.fake.default
        script.reply = scenario.answer
        script.chunk_size = scenario.chunk_chars
        script.first_token_delay = scenario.ttft_s
        script.chunk_delay = scenario.chunk_delay_s
        threads = {
            "fake_feishu": _new_thread("FakeFeishuThread", before),
            "fake_openai": _new_thread("FakeOpenAIThread", before),
        }
        yield FakeWorld(feishu, openai, openai.call(_running_loop), threads)
    finally:
        feishu.close()
        openai.close()


def start_round_trips(world: FakeWorld, scenario: Scenario) -> None:
    """From now on every Feishu REST call waits ``rtt_s`` before it is answered."""
    world.fs.delay("/open-apis/*", scenario.rtt_s)


@dataclass
class HealthReport:
    """How the fakes fared during a burst."""

    cpu_s: dict[str, float]
    """CPU seconds of each fake's thread."""
    process_cpu_s: float
    """CPU seconds of this whole process (the fakes, the completion watch, the log readers)."""
    lags: dict[str, list[float]]
    """How late each fake's loop ran the probe callbacks, in seconds."""


def _record_lag(lags: list[float], posted: float) -> None:
    lags.append(time.monotonic() - posted)


@dataclass
class FakeHealth:
    """Measures the fakes' CPU and loop lag between :meth:`start` and :meth:`stop`."""

    world: FakeWorld
    _lags: dict[str, list[float]] = field(default_factory=dict)
    _cpu: dict[str, float] = field(default_factory=dict)
    _process_cpu: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._cpu = {name: thread_cpu_s(ident) for name, ident in self.world.threads.items()}
        self._process_cpu = process_cpu_s(os.getpid())
        loops = {"fake_feishu": self.world.fs.loop, "fake_openai": self.world.openai_loop}
        self._lags = {name: [] for name in loops}
        self._thread = threading.Thread(target=self._probe, args=(loops,), daemon=True)
        self._thread.start()

    def _probe(self, loops: dict[str, asyncio.AbstractEventLoop]) -> None:
        for tick in itertools.count():
            if self._stop.wait(PROBE_EVERY_S if tick else 0):
                return
            for name, loop in loops.items():
                posted = time.monotonic()
                lags = self._lags[name]
                with contextlib.suppress(RuntimeError):  # the loop closed
                    loop.call_soon_threadsafe(_record_lag, lags, posted)

    def stop(self) -> HealthReport:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        cpu = {
            name: thread_cpu_s(ident) - self._cpu[name]
            for name, ident in self.world.threads.items()
        }
        return HealthReport(
            cpu_s=cpu,
            process_cpu_s=process_cpu_s(os.getpid()) - self._process_cpu,
            lags={name: list(v) for name, v in self._lags.items()},
        )
