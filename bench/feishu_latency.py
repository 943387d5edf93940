"""Print measured Feishu reply latencies of the real bot between the fake Feishu and fake OpenAI.

Runs ``python -m bot run`` (one process per configuration) with tests/e2e_harness.py and prints:

1. first visible text: fake event delivery -> first CardKit content update that shows the LLM's
   first chunk, next to the budget TTFT + one Feishu round trip + 50 ms, with a per-stage
   breakdown from the fakes' own records;
2. the ACK -> inbox write window (a crash inside it loses an ACKed message) and the ACK latency;
3. the card update rate of a long streamed answer against ``chat.stream_update_ms``.

Numbers only, no thresholds. Every timestamp is ``time.monotonic()`` (CLOCK_MONOTONIC is
system-wide on Linux, so the bot's ``accepted_at`` compares with the fakes' records).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

STAGES: list[tuple[str, str, str]] = [
    ("fake delivers event -> ACK frame recorded", "delivered", "ack"),
    ("ACK -> inbox write done (accepted_at)", "ack", "accepted"),
    ("inbox write -> card create arrives", "accepted", "card_create"),
    ("card create arrives -> reply w/ card answered", "card_create", "card_sent"),
    ("reply w/ card answered -> LLM request arrives", "card_sent", "llm_request"),
    ("LLM request arrives -> first text update recorded", "llm_request", "first_text"),
]


@dataclass
class Sample:
    """Monotonic timestamps of one message's way from the fake Feishu to the first text."""

    delivered: float
    ack: float
    accepted: float
    card_create: float
    card_sent: float
    llm_request: float
    first_text: float

    @property
    def first_text_latency(self) -> float:
        return self.first_text - self.delivered


# ---- statistics and formatting --------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


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
    assert card_sent.finished_at is not None
    return Sample(
        delivered=delivery.created,
        ack=delivery.acks[0].time,
        accepted=float(accepted["accepted_at"]),
        card_create=card_create.time,
        card_sent=card_sent.finished_at,
        llm_request=request.time,
        first_text=first.time,
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
    updates: int
    streamed_s: float
    gaps: list[float]
    chars: int


def run_update_rate(world: World) -> RateResult:
    body = "The quick brown fox jumps over the lazy dog. "
    answer = (body * (LONG_ANSWER_CHARS // len(body) + 1))[:LONG_ANSWER_CHARS]
    world.llm.default.reply = answer
    world.llm.default.chunk_size = CHUNK
    world.llm.default.first_token_delay = 0.0
    world.llm.default.chunk_delay = LONG_CHUNK_DELAY_S
    _, message_id, _ = ask(world, 9000, "tell me a long story")
    request = next(r for r in world.llm.requests if r.last_user_text == "tell me a long story")
    card = reply_card(world, message_id)
    updates = card.content_updates
    times = [u.time for u in updates]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return RateResult(
        updates=len(updates),
        streamed_s=times[-1] - request.time,
        gaps=gaps,
        chars=len(str(updates[-1].content)),
    )


# ---- report ---------------------------------------------------------------------------------


def print_header() -> None:
    print(
        "Feishu reply latency of `python -m bot run` between in-process fakes (loopback HTTP and"
        " WebSocket,\nfakes in threads of this process, bot in a subprocess; a 2-core machine:"
        " read the numbers as\nrelative, not as production figures)."
        f" TTFT = fake OpenAI first_token_delay {TTFT_S * 1000:.0f} ms;"
        f"\nRTT = fake Feishu delay {RTT_S * 1000:.0f} ms on every /open-apis/* call."
        f" {N_MESSAGES} sequential p2p messages per configuration"
        " (one sender each, 1 warm-up\nexcluded), each configuration in its own bot process."
    )


def print_first_text(results: dict[str, list[Sample]]) -> None:
    print()
    print(
        "1. First visible text: fake delivers the event -> first card content update containing"
        f" the\n   LLM's first chunk {FIRST_CHUNK!r}. Budget = TTFT + RTT + 50 ms ="
        f" {BUDGET_S * 1000:.0f} ms; overhead = latency - TTFT - RTT. All ms."
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
            f"   {ms3(overheads).lstrip():>28}  {within:>4}/{len(latencies):<4}"
        )
    print()
    print("   Where the time goes (median ms per stage, from the fakes' records and the bot log):")
    names = list(results)
    print(f"   {'stage':50}" + "".join(f" {name.split()[0]:>7}" for name in names))
    for label, start, end in STAGES:
        row = "".join(
            f" {percentile([getattr(s, end) - getattr(s, start) for s in results[n]], 50) * 1000:7.1f}"
            for n in names
        )
        print(f"   {label:50}{row}")
    total = "".join(
        f" {percentile([s.first_text_latency for s in results[n]], 50) * 1000:7.1f}"
        for n in names
    )
    print(f"   {'total (median of the sums)':50}{total}")


def print_ack_window(results: dict[str, list[Sample]]) -> None:
    print()
    print(
        "2. ACK -> inbox write: fake records the ACK frame -> bot's `message_accepted`"
        " accepted_at\n   (atomic dedup + inbox write done). A crash inside this window loses"
        " an ACKed message.\n   ACK latency: fake delivers the event -> ACK frame recorded. All ms."
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
        f"3. Update rate: one {LONG_ANSWER_CHARS}-character answer (chunks of {CHUNK} chars every"
        f" {LONG_CHUNK_DELAY_S * 1000:g} ms), configuration a\n   (chat.stream_update_ms ="
        f" {DEFAULT_UPDATE_MS} -> at most ~{limit:.1f} updates/s). Streamed = LLM request"
        " arrives -> last content update."
    )
    print(
        f"   {'content updates':>15} {'streamed s':>10} {'updates/s':>9} {'limit/s':>7}"
        f"   {'gap min ms':>10} {'median':>7} {'max':>7} {'final chars':>11}"
    )
    steady = rate.gaps[:-1] or rate.gaps  # the last gap ends in the forced final update
    print(
        f"   {rate.updates:15d} {rate.streamed_s:10.2f} {rate.updates / rate.streamed_s:9.2f}"
        f" {limit:7.2f}   {min(steady) * 1000:10.1f} {percentile(steady, 50) * 1000:7.1f}"
        f" {max(steady) * 1000:7.1f} {rate.chars:11d}"
    )
    print(
        f"   (gaps exclude the last one, {rate.gaps[-1] * 1000:.1f} ms: the final text is pushed"
        " as soon as the answer ends.)"
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

