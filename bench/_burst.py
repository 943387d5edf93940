"""One burst of concurrent conversations against one bot, read back from the fakes' records.

A fresh pair of fakes and a fresh bot process per burst (so the bot's peak RSS belongs to that
burst). After the bot is connected, one warm-up message is answered (first-use costs excluded);
then ``n`` p2p text messages from ``n`` distinct users are sent back to back on the long
connection, and the burst ends when every answer is complete: its card closed (streaming mode
off) or, for the non-streaming bot, its text reply sent. Completion is watched by scanning the
fake's call list without its lock (a list slice is atomic under the GIL), so the watch does not
slow the fake down.

Every time is ``time.monotonic()``, system-wide on Linux, so the fakes' records (taken in this
process) compare with the bot's ``accepted_at`` (taken in its own).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._bots import BotKind, bot_pid, start_bot
from bench._fake_world import (
    FakeHealth,
    FakeWorld,
    HealthReport,
    Scenario,
    fake_world,
    start_round_trips,
)
from bench._procstat import children, private_mib, tree_cpu_s, tree_peak_mib
from tests.e2e_harness import BotProcess
from tests.fakes.feishu_server import FakeFeishu, RestCall

POLL_S = 0.1
#: the Feishu calls an answer makes (tokens, bot info and the long connection are not counted)
ANSWER_ENDPOINTS = frozenset(
    {
        "card_create",
        "message_reply",
        "card_element_content",
        "card_settings",
        "card_batch_update",
        "card_update",
        "message_patch",
        "message_create",
    }
)
CODE_RATE_LIMITED = 99991400
#: this bot's log events worth counting: an event ACKed before its journal write, a retried
#: Feishu call, a skipped card update
COUNTED_EVENTS = ("arrival_not_journaled", "feishu_call_retried", "card_update_skipped")
#: log events that say an answer went wrong (the reference bots' and this bot's)
FAILURE_EVENTS = (
    "answer_failed",
    "llm_failed",
    "message_not_accepted",
    "reply_failed",
    "reply_not_delivered",
    "reply_undeliverable",
)


@dataclass
class Sample:
    """One answered message, as the fakes (and for the bot its log) recorded it."""

    sent: float
    """The fake sent the event frame."""
    ack_latency: float | None
    """Frame sent -> ACK frame back (the fake's ``AckRecord.latency``)."""
    llm_request: float | None
    """The LLM request arrived at the fake OpenAI."""
    llm_first_token: float | None
    """The fake OpenAI's first-token delay was over (it sent the first chunk)."""
    llm_done: float | None
    """The fake OpenAI had written the whole answer."""
    first_text: float | None
    """The first card update showing answer text was applied (text reply: when sent)."""
    final_text: float | None
    """The complete answer was on screen."""
    done: float | None
    """The card was closed (text reply: when sent)."""
    calls: int
    """Feishu REST calls made for this answer (refused ones included)."""
    gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive content updates of its card before the final text."""
    accepted: float | None = None
    """The bot's ``message_accepted`` ``accepted_at`` (inbox write done); bot only."""


@dataclass
class BurstResult:
    """What one burst of ``concurrency`` messages to one bot measured."""

    kind: BotKind
    concurrency: int
    samples: list[Sample]
    incomplete: int
    started: float
    finished: float
    cpu_s: float
    rss_mib: float
    children_mib: float
    rate_limited: int
    calls_peak_per_s: int
    content_peak_per_s: int
    connections: int
    """Distinct client sockets the answer-path calls came over (kept-alive ones count once)."""
    health: HealthReport
    failures: list[str]
    log_counts: dict[str, int]
    """How often the bot logged each of :data:`COUNTED_EVENTS` (this bot only)."""

    @property
    def wall_s(self) -> float:
        return self.finished - self.started


def _card_of_reply(call: RestCall) -> str | None:
    body = call.json if isinstance(call.json, dict) else {}
    if body.get("msg_type") != "interactive":
        return None
    content = json.loads(body.get("content") or "{}")
    card_id = (content.get("data") or {}).get("card_id") if content.get("type") == "card" else None
    return str(card_id) if card_id else None


def _closes_card(call: RestCall) -> bool:
    body = call.json if isinstance(call.json, dict) else {}
    if call.endpoint == "card_batch_update":
        actions = json.loads(body.get("actions") or "[]")
        settings = [
            a["params"].get("settings") or {}
            for a in actions
            if a.get("action") == "partial_update_setting"
        ]
    else:
        settings = [json.loads(body.get("settings") or "{}")]
    return any((each.get("config") or {}).get("streaming_mode") is False for each in settings)


def _ok(call: RestCall) -> bool:
    return call.finished_at is not None and call.status == 200


class CompletionWatch:
    """Which answers are complete: their card closed, or a text reply sent.

    Reads the fake's call list incrementally and without its lock (slicing a list is atomic
    under the GIL); each call is looked at until it is answered, then parsed once. Cheap enough
    to poll often without taking the GIL from the fakes for long.
    """

    def __init__(self, fs: FakeFeishu) -> None:
        self._fs = fs
        self._seen = 0
        self._open: list[RestCall] = []
        self._replied_cards: dict[str, str] = {}  # card id -> the message it answers
        self._closed: set[str] = set()
        self._done: set[str] = set()

    def poll(self) -> set[str]:
        calls = self._fs.calls
        new = calls[self._seen :]
        self._seen += len(new)
        watching = self._open + [c for c in new if c.endpoint in _COMPLETING]
        self._open = []
        for call in watching:
            if call.finished_at is None:
                self._open.append(call)
            elif call.status == 200:
                self._take(call)
        return self._done

    def _take(self, call: RestCall) -> None:
        if call.endpoint == "message_reply":
            card_id = _card_of_reply(call)
            target = call.path_params["message_id"]
            if card_id is None or card_id in self._closed:
                self._done.add(target)
            else:
                self._replied_cards[card_id] = target
        elif _closes_card(call):
            card_id = call.path_params["card_id"]
            self._closed.add(card_id)
            if card_id in self._replied_cards:
                self._done.add(self._replied_cards[card_id])


_CLOSING = frozenset({"card_settings", "card_batch_update"})
_COMPLETING = frozenset({"message_reply", *_CLOSING})


def _questions(tag: str, n: int) -> list[str]:
    return [f"question {index} of {tag}" for index in range(n)]


def _events(fs: FakeFeishu, tag: str, questions: Sequence[str]) -> list[dict[str, Any]]:
    return [
        fs.build_event(
            "p2p_text",
            text=question,
            sender_open_id=f"ou_bench_{tag}_{index:04d}",
            chat_id=f"oc_bench_{tag}_{index:04d}",
        )
        for index, question in enumerate(questions)
    ]


async def _deliver_all(fs: FakeFeishu, events: list[dict[str, Any]]) -> list[str]:
    # On the fake's loop: one frame after the other, as fast as the socket takes them. A send
    # rarely has to wait for the socket, so without the sleep(0) the loop would send the whole
    # burst before reading any ACK, and every ACK latency would include the rest of the burst.
    frames = []
    for event in events:
        frames.append(await fs.deliver(event))
        await asyncio.sleep(0)
    return frames


def _send(world: FakeWorld, events: list[dict[str, Any]]) -> list[str]:
    """Deliver the events back to back; return their frame ids."""
    return world.feishu.call(lambda: _deliver_all(world.fs, events), timeout=120)


def _wait_done(
    world: FakeWorld, process: BotProcess, message_ids: Sequence[str], timeout_s: float
) -> None:
    wanted = set(message_ids)
    watch = CompletionWatch(world.fs)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not process.exited():
        if wanted <= watch.poll():
            return
        time.sleep(POLL_S)


def _message_ids(world: FakeWorld, frames: Sequence[str]) -> list[str]:
    ids = [world.fs.delivery(frame).message_id for frame in frames]
    return [mid for mid in ids if mid is not None]


def peak_per_second(times: Iterable[float]) -> int:
    """The most events in any one-second window."""
    ordered = sorted(times)
    best = start = 0
    for end, now in enumerate(ordered):
        while ordered[start] <= now - 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def _rate_limited(call: RestCall) -> bool:
    response = call.response if isinstance(call.response, dict) else {}
    return call.status == 429 or response.get("code") == CODE_RATE_LIMITED


def _created_card(call: RestCall) -> str | None:
    response = call.response if isinstance(call.response, dict) else {}
    card_id = (response.get("data") or {}).get("card_id")
    return str(card_id) if card_id else None


def _samples(
    world: FakeWorld,
    scenario: Scenario,
    frames: Sequence[str],
    questions: Sequence[str],
    calls: Sequence[RestCall],
    accepted: dict[str, float],
) -> list[Sample]:
    fs = world.fs
    by_card: dict[str, list[RestCall]] = {}
    replies: dict[str, list[RestCall]] = {}
    for call in calls:
        card_id = call.path_params.get("card_id") or (
            _created_card(call) if call.endpoint == "card_create" else None
        )
        if card_id is not None:
            by_card.setdefault(card_id, []).append(call)
        elif call.endpoint == "message_reply":
            replies.setdefault(call.path_params["message_id"], []).append(call)
    llm = world.llm
    requests = {r.last_user_text: r for r in llm.requests}
    samples = []
    for frame, question in zip(frames, questions, strict=True):
        delivery = fs.delivery(frame)
        message_id = delivery.message_id or ""
        own = replies.get(message_id, [])
        request = requests.get(question)
        sample = Sample(
            sent=delivery.attempts[0].time,
            ack_latency=delivery.acks[0].latency if delivery.acks else None,
            llm_request=request.time if request else None,
            llm_first_token=llm.first_token_at.get(request.index) if request else None,
            llm_done=llm.finished_at.get(request.index) if request else None,
            first_text=None,
            final_text=None,
            done=None,
            calls=len(own),
            accepted=accepted.get(message_id),
        )
        for reply in (r for r in own if _ok(r)):
            card_id = _card_of_reply(reply)
            if card_id is None:  # a text reply: everything at once
                sample.first_text = sample.final_text = sample.done = reply.finished_at
                continue
            sample.calls += len(by_card.get(card_id, []))
            _read_card(sample, fs, card_id, by_card.get(card_id, []), scenario)
        samples.append(sample)
    return samples


def _read_card(
    sample: Sample, fs: FakeFeishu, card_id: str, calls: list[RestCall], scenario: Scenario
) -> None:
    updates = fs.card(card_id).content_updates
    shown = [u for u in updates if scenario.first_chunk in str(u.content)]
    complete = [u for u in updates if scenario.answer in str(u.content)]
    sample.first_text = shown[0].time if shown else None
    sample.final_text = complete[0].time if complete else None
    streaming = updates[: updates.index(complete[0])] if complete else updates
    sample.gaps = [b.time - a.time for a, b in itertools.pairwise(streaming)]
    closing = [c.finished_at for c in calls if c.endpoint in _CLOSING and _ok(c)]
    sample.done = max((t for t in closing if t is not None), default=None)


def _settle_this_process() -> None:
    """Keep what this process already holds out of the collector's way during the burst.

    The fakes run in this process, next to the records of every burst run before. Without
    this, the collections the fakes' allocations set off walked all of them, and in a complete
    run the fake model sent the answers of the bot measured first at 200 about 0.3 s late
    (``fake_openai_late_p99``) where the others got 0.05 s.
    """
    gc.collect()
    gc.freeze()


def run_burst(
    kind: BotKind, n: int, scenario: Scenario, *, feishu_limits: bool = False
) -> BurstResult:
    """Start fresh fakes and a fresh ``kind`` bot, answer one warm-up message, then a burst of
    ``n``; return what the fakes and the bot process recorded."""
    timeout_s = 60 + 0.5 * n
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-concurrency-{kind}-") as tmp,
        fake_world(scenario, feishu_limits=feishu_limits) as world,
    ):
        process = start_bot(kind, world, scenario, Path(tmp))
        try:
            start_round_trips(world, scenario)
            fs = world.fs
            warm_up = _message_ids(world, _send(world, _events(fs, "warmup", _questions("w", 1))))
            _wait_done(world, process, warm_up, timeout_s)
            _settle_this_process()
            mark = fs.mark()
            questions = _questions(f"burst {kind} {n}", n)
            events = _events(fs, f"c{n}", questions)
            pid = bot_pid(process)
            health = FakeHealth(world)
            cpu_before = tree_cpu_s(pid)
            health.start()
            frames = _send(world, events)
            message_ids = _message_ids(world, frames)
            _wait_done(world, process, message_ids, timeout_s)
            if process.exited():
                tail = "\n".join(process.output.splitlines()[-20:])
                raise RuntimeError(f"the {kind} bot exited during the burst:\n{tail}")
            cpu_s = tree_cpu_s(pid) - cpu_before
            report = health.stop()
            rss = tree_peak_mib(pid)
            children_mib = sum(private_mib(child) for child in children(pid))
            calls = fs.calls_to(since=mark)
            accepted = {
                str(r.get("message_id")): float(r["accepted_at"])
                for r in process.events("message_accepted")
                if "accepted_at" in r
            }
            samples = _samples(world, scenario, frames, questions, calls, accepted)
            failures = [
                str(r.get("error")) for name in FAILURE_EVENTS for r in process.events(name)
            ]
            log_counts = {name: len(process.events(name)) for name in COUNTED_EVENTS}
        finally:
            process.stop()
    answer_calls = [c for c in calls if c.endpoint in ANSWER_ENDPOINTS]
    done = [s.done for s in samples if s.done is not None]
    return BurstResult(
        kind=kind,
        concurrency=n,
        samples=samples,
        incomplete=n - len(done),
        started=min(s.sent for s in samples),
        finished=max(done, default=math.nan),
        cpu_s=cpu_s,
        rss_mib=rss,
        children_mib=children_mib,
        rate_limited=sum(_rate_limited(c) for c in calls),
        calls_peak_per_s=peak_per_second(c.time for c in answer_calls),
        content_peak_per_s=peak_per_second(
            c.time for c in answer_calls if c.endpoint == "card_element_content"
        ),
        connections=len({c.peer for c in answer_calls}),
        health=report,
        failures=failures,
        log_counts=log_counts if kind == "bot" else {},
    )
