"""Print measured Feishu reply latencies of the real bot between the fake Feishu and fake OpenAI.

Runs ``python -m bot run`` (one process per configuration) with tests/e2e_harness.py and prints:

1. first visible text: fake event delivery -> first CardKit content update that shows the LLM's
   first chunk, next to the budget TTFT + one Feishu round trip + 50 ms, with a per-stage
   breakdown from the fakes' own records;
2. the ACK -> inbox write window (covered by the arrival journal written before the ACK) and the
   ACK latency (which includes that journal write);
3. the card update rate of a long streamed answer against ``chat.stream_update_ms``.

Numbers only, no thresholds. Every timestamp is ``time.monotonic()`` (CLOCK_MONOTONIC is
system-wide on Linux, so the bot's ``accepted_at`` compares with the fakes' records).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import percentile
from tests.e2e_harness import BotProcess, World, make_world
from tests.fakes.feishu_server import FakeCard

N_MESSAGES = 15
TTFT_S = 0.2  # fake OpenAI first_token_delay
RTT_S = 0.03  # fake Feishu delay on every /open-apis/* call: one emulated round trip
SLACK_S = 0.05
BUDGET_S = TTFT_S + RTT_S + SLACK_S
CHUNK = 5
FIRST_CHUNK = "Sure!"
ANSWER = "Sure! Here is a short answer, streamed in small pieces."
LONG_ANSWER_CHARS = 3000
LONG_CHUNK_DELAY_S = 0.005
DEFAULT_UPDATE_MS = 300

CONFIGS: list[tuple[str, dict[str, int]]] = [
    ("a defaults (burst 0)", {"merge_burst_ms": 0, "stream_update_ms": DEFAULT_UPDATE_MS}),
    ("b merge_burst_ms=600", {"merge_burst_ms": 600, "stream_update_ms": DEFAULT_UPDATE_MS}),
]


@dataclass
class Sample:
    """Monotonic timestamps of one message's way from the fake Feishu to the first text."""

    delivered: float
    ack: float
    accepted: float
    card_create: float
    card_created: float
    card_reply: float
    card_sent: float
    llm_request: float
    first_text: float
    updates: int  # content updates of the reply card
    complete_updates: int  # of them, the ones carrying the complete answer

    @property
    def first_text_latency(self) -> float:
        return self.first_text - self.delivered


# ---- statistics and formatting --------------------------------------------------------------


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, p90 and max, in milliseconds."""
    return percentile(values, 50) * 1000, percentile(values, 90) * 1000, max(values) * 1000


def ms3(values: Sequence[float]) -> str:
    median, p90, top = summary(values)
    return f"{median:7.1f} {p90:7.1f} {top:7.1f}"


# ---- driving the bot ------------------------------------------------------------------------


@contextlib.contextmanager
def bot_world(chat: dict[str, int]) -> Iterator[tuple[World, BotProcess]]:
    """A fresh fake Feishu, fake OpenAI and bot process; everything stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-feishu-") as tmp:
        worlds = make_world(Path(tmp), chat=chat)
        try:
            world = next(worlds)
            bot = world.start_bot()
            world.fs.delay("/open-apis/*", RTT_S)  # after the start: only replies pay it
            yield world, bot
        finally:
            worlds.close()


def reply_card(world: World, message_id: str) -> FakeCard:
    (reply,) = world.replies(message_id)
    assert reply.card_id is not None, "the reply is not a card"
    return world.fs.card(reply.card_id)


def ask(world: World, index: int, text: str) -> tuple[str, str, int]:
    """Send one p2p text from a sender of its own; wait for the closed card."""
    mark = world.fs.mark()
    frame = world.feishu.deliver(
        "p2p_text",
        text=text,
        sender_open_id=f"ou_bench_sender_{index:04d}",
        chat_id=f"oc_bench_chat_{index:04d}",
    )
    message_id = world.fs.delivery(frame).message_id
    assert message_id is not None
    world.wait_for_final_reply(message_id, timeout=30)
    return frame, message_id, mark


def measure(world: World, bot: BotProcess, index: int) -> Sample:
    text = f"benchmark question {index}"
    frame, message_id, mark = ask(world, index, text)
    delivery = world.fs.delivery(frame)
    accepted = next(
        r for r in bot.wait_for_event("message_accepted") if r.get("message_id") == message_id
    )
    calls = world.fs.calls_to(since=mark)
    card_create = next(c for c in calls if c.endpoint == "card_create")
    card_sent = next(
        c
        for c in calls
        if c.endpoint == "message_reply" and c.path_params.get("message_id") == message_id
    )
    request = next(r for r in world.llm.requests if r.last_user_text == text)
    card = reply_card(world, message_id)
    first = next(u for u in card.content_updates if FIRST_CHUNK in str(u.content))
    assert card_create.finished_at is not None
    assert card_sent.finished_at is not None
    return Sample(
        delivered=delivery.created,
        ack=delivery.acks[0].time,
        accepted=float(accepted["accepted_at"]),
        card_create=card_create.time,
        card_created=card_create.finished_at,
        card_reply=card_sent.time,
        card_sent=card_sent.finished_at,
        llm_request=request.time,
        first_text=first.time,
        updates=len(card.content_updates),
        complete_updates=sum(u.content == ANSWER for u in card.content_updates),
    )


def run_first_text(world: World, bot: BotProcess) -> list[Sample]:
    world.llm.default.reply = ANSWER
    world.llm.default.chunk_size = CHUNK
    world.llm.default.first_token_delay = TTFT_S
    world.llm.default.chunk_delay = 0.01
    measure(world, bot, 0)  # warm-up: first-use costs (connection pools, imports) excluded
    return [measure(world, bot, index) for index in range(1, N_MESSAGES + 1)]


@dataclass
class RateResult:
    """Content updates of one long answer, split into throttled ones and the final text."""

    llm_request: float
    streaming: list[float]  # times of updates sent while the answer was still coming
    final: list[float]  # times of updates that carry the complete answer
    chars: int


def run_update_rate(world: World) -> RateResult:
    body = "The quick brown fox jumps over the lazy dog. "
    answer = (body * (LONG_ANSWER_CHARS // len(body) + 1))[:LONG_ANSWER_CHARS]
    world.llm.default.reply = answer
    world.llm.default.chunk_size = CHUNK
    world.llm.default.first_token_delay = 0.0
    world.llm.default.chunk_delay = LONG_CHUNK_DELAY_S
    question = "tell me a long story"
    _, message_id, _ = ask(world, 9000, question)
    request = next(r for r in world.llm.requests if r.last_user_text == question)
    updates = reply_card(world, message_id).content_updates
    return RateResult(
        llm_request=request.time,
        streaming=[u.time for u in updates if u.content != answer],
        final=[u.time for u in updates if u.content == answer],
        chars=len(str(updates[-1].content)),
    )


def client_build_ms() -> list[float]:
    """Seconds to build and close a default httpx.AsyncClient (lark-oapi builds one per call)."""

    async def build() -> list[float]:
        times = []
        for _ in range(6):
            started = time.perf_counter()
            async with httpx.AsyncClient():
                pass
            times.append(time.perf_counter() - started)
        return times[1:]  # the first one also pays imports and the CA bundle's first read

    return asyncio.run(build())


# ---- report ---------------------------------------------------------------------------------


def print_header() -> None:
    print(
        "Feishu reply latency of `python -m bot run` between the test fakes: loopback plain\n"
        "HTTP and WebSocket, the fakes in threads of this process, the bot in a subprocess, on a\n"
        "2-core machine. Compare the numbers; they are no production figures (no TLS, no real\n"
        f"network). TTFT = fake OpenAI first_token_delay {TTFT_S * 1000:.0f} ms; RTT = fake Feishu"
        f" delay of {RTT_S * 1000:.0f} ms\non every /open-apis/* call. {N_MESSAGES} sequential p2p"
        " messages per configuration (one sender\neach, after 1 warm-up), each configuration in a"
        " bot process of its own."
    )


def med(values: Sequence[float]) -> float:
    return percentile(values, 50) * 1000


def print_first_text(results: dict[str, list[Sample]]) -> None:
    print()
    print(
        "1. First visible text: fake delivers the event -> first card content update that"
        f" contains\n   the LLM's first chunk {FIRST_CHUNK!r}. Budget = TTFT + RTT + 50 ms ="
        f" {BUDGET_S * 1000:.0f} ms; overhead =\n   latency - TTFT - RTT. All ms."
    )
    print(
        f"   {'configuration':22} {'median':>7} {'p90':>7} {'max':>7} {'budget':>7}"
        f"   {'overhead med':>12} {'p90':>7} {'max':>7}  {'in budget':>9}"
    )
    for name, samples in results.items():
        latencies = [s.first_text_latency for s in samples]
        overheads = [value - TTFT_S - RTT_S for value in latencies]
        within = sum(value <= BUDGET_S for value in latencies)
        print(
            f"   {name:22} {ms3(latencies)} {BUDGET_S * 1000:7.0f}"
            f"   {ms3(overheads).lstrip():>28}  {within:>5}/{len(latencies)}"
        )
    for name, samples in results.items():
        repeated = sum(s.complete_updates > 1 for s in samples)
        print(
            f"   {name:22} content updates per reply: median"
            f" {percentile([s.updates for s in samples], 50):.0f}; the complete text sent"
            f" twice: {repeated}/{len(samples)}"
        )
    names = list(results)
    rows: list[tuple[str, Callable[[Sample], float] | None]] = [
        ("critical path:", None),
        ("  fake delivers event -> ACK frame recorded", lambda s: s.ack - s.delivered),
        ("  ACK -> inbox write done (bot's accepted_at)", lambda s: s.accepted - s.ack),
        (
            "  inbox write -> LLM request arrives at fake OpenAI",
            lambda s: s.llm_request - s.accepted,
        ),
        (
            "  LLM request -> first text applied at fake Feishu",
            lambda s: s.first_text - s.llm_request,
        ),
        (
            "    of which beyond TTFT + RTT (bot side)",
            lambda s: s.first_text - s.llm_request - TTFT_S - RTT_S,
        ),
        ('card opening (the "Thinking…" card):', None),
        ("  inbox write -> card create arrives", lambda s: s.card_create - s.accepted),
        ("  card create arrives -> answered (RTT)", lambda s: s.card_created - s.card_create),
        ("  card create answered -> card reply arrives", lambda s: s.card_reply - s.card_created),
        ("  card reply arrives -> answered (RTT)", lambda s: s.card_sent - s.card_reply),
        (
            "  card on screen -> first token due (slack)",
            lambda s: s.llm_request + TTFT_S - s.card_sent,
        ),
    ]
    print()
    print("   Where the time goes (median ms; fakes' records and the bot's log):")
    print(f"   {'stage':52}" + "".join(f" {name.split()[0]:>7}" for name in names))
    for label, stage in rows:
        if stage is None:
            print(f"   {label}")
            continue
        cells = "".join(f" {med([stage(s) for s in results[n]]):7.1f}" for n in names)
        print(f"   {label:52}{cells}")
    builds = client_build_ms()
    print(
        f"   (context: building + closing one httpx.AsyncClient() here takes {med(builds):.1f} ms"
        " median;\n   lark-oapi 1.7.5's Transport.aexecute builds one per REST call; the bot lends"
        " it one\n   kept-alive client per event loop instead: bot/feishu/http_pool.py.)"
    )


def print_ack_window(results: dict[str, list[Sample]]) -> None:
    print()
    print(
        "2. ACK -> inbox write: fake records the ACK frame -> bot's `message_accepted`"
        " accepted_at\n   (atomic dedup + inbox write done); the event was journaled before the"
        " ACK, so a crash\n   inside this window loses nothing. ACK latency: fake delivers the"
        " event -> ACK frame recorded\n   (includes the journal write). All ms."
    )
    print(
        f"   {'configuration':22} {'ACK->inbox med':>14} {'p90':>7} {'max':>7}"
        f"   {'ACK latency med':>15} {'p90':>7} {'max':>7}"
    )
    for name, samples in results.items():
        window = ms3([s.accepted - s.ack for s in samples])
        latency = ms3([s.ack - s.delivered for s in samples])
        print(f"   {name:22} {window:>30}   {latency:>31}")


def print_update_rate(rate: RateResult) -> None:
    print()
    limit = 1000 / DEFAULT_UPDATE_MS
    print(
        f"3. Update rate: one {LONG_ANSWER_CHARS}-character answer in chunks of {CHUNK} chars"
        f" every {LONG_CHUNK_DELAY_S * 1000:g} ms,\n   configuration a (chat.stream_update_ms ="
        f" {DEFAULT_UPDATE_MS}: at most ~{limit:.2f} updates/s while streaming).\n"
        "   Times are when the fake applied the updates."
    )
    times = sorted(rate.streaming + rate.final)
    span = times[-1] - rate.llm_request
    streaming = rate.streaming
    gaps = [b - a for a, b in itertools.pairwise(streaming)]
    steady = (len(streaming) - 1) / (streaming[-1] - streaming[0]) if len(streaming) > 1 else 0.0
    print(
        f"   {'updates':>7} {'streaming':>9} {'final':>5} {'answer s':>8} {'all/s':>6}"
        f" {'streaming/s':>11} {'limit/s':>7}   {'gap min ms':>10} {'median':>7} {'max':>7}"
    )
    print(
        f"   {len(times):7d} {len(streaming):9d} {len(rate.final):5d} {span:8.2f}"
        f" {len(times) / span:6.2f} {steady:11.2f} {limit:7.2f}"
        f"   {min(gaps) * 1000:10.1f} {med(gaps):7.1f} {max(gaps) * 1000:7.1f}"
    )
    final_gaps = ", ".join(f"{(b - a) * 1000:.0f}" for a, b in itertools.pairwise(times[-3:]))
    print(
        "   answer s = LLM request arrives -> last content update; streaming/s and gaps ="
        " updates sent\n   while the answer was coming; final = updates carrying the complete"
        f" {rate.chars}-character text\n   (gaps between the last three updates: {final_gaps}"
        " ms)."
    )


def main() -> None:
    started = time.monotonic()
    print_header()
    results: dict[str, list[Sample]] = {}
    rate: RateResult | None = None
    for name, chat in CONFIGS:
        with bot_world(chat) as (world, bot):
            results[name] = run_first_text(world, bot)
            if rate is None:
                rate = run_update_rate(world)
    print_first_text(results)
    print_ack_window(results)
    assert rate is not None
    print_update_rate(rate)
    print(f"\n(total benchmark time {time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
