"""Delivering replies into Feishu: every REST failure on the answer path, and what the user sees.

The real SDK client talks to the fake Feishu (own thread) over sockets; the reply events come
from a generator the test controls. Retry waits are injected (no real backoff), so the suite is
fast and deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from bot.chat.replies import AnswerInfo, ReplyDelta, ReplyEvent, ReplyFailed, ReplyFinished
from bot.feishu.api import FeishuApi
from bot.feishu.replier import (
    APOLOGY,
    CUT_SHORT_NOTE,
    MOVED_NOTE,
    SUPERSEDED_NOTE,
    CardReplier,
    DeliveryRecord,
    ReplyTarget,
    StreamedReply,
)
from bot.llm.events import TokenUsage
from bot.logging import configure_logging
from bot.ops.metrics import Metrics
from tests.fakes.feishu_server import FakeFeishu, FakeFeishuThread
from tests.feishu_clients import feishu_api


@dataclass
class Setup:
    """The fake, a replier wired to it, and a message of a user to reply to."""

    thread: FakeFeishuThread
    replier: CardReplier
    sleeps: list[float]
    api: FeishuApi
    saved: list[str] = field(default_factory=list)

    def use_replier(self, **options: Any) -> CardReplier:
        """Replace the replier with one built with ``options`` (footer, clock, metrics…)."""
        self.replier = CardReplier(self.api, update_interval_s=0.01, **options)
        return self.replier

    @property
    def fs(self) -> FakeFeishu:
        return self.thread.fake

    def user_message(self, sample: str = "p2p_text") -> ReplyTarget:
        frame = self.thread.deliver(sample, text="hello")  # no connection: recorded, not sent
        delivery = self.fs.delivery(frame)
        message_id = delivery.message_id or ""
        chat_id = str(delivery.event["event"]["message"]["chat_id"])
        return ReplyTarget(chat_id=chat_id, message_id=message_id, in_thread=sample != "p2p_text")

    async def persist(self, record: DeliveryRecord) -> None:
        self.saved.append(record.to_json())

    async def stream(
        self,
        target: ReplyTarget,
        events: AsyncIterator[ReplyEvent],
        record: DeliveryRecord | None = None,
        stop: asyncio.Event | None = None,
        started_at: float | None = None,
    ) -> StreamedReply:
        return await self.replier.stream(
            target,
            events,
            record=record or DeliveryRecord(),
            persist=self.persist,
            stop=stop,
            started_at=started_at,
        )

    def card_text(self, target: ReplyTarget) -> str:
        (reply,) = self.fs.replies_to(target.message_id)
        assert reply.card_id is not None
        card = self.fs.card(reply.card_id)
        assert card.closed
        return card.text


@pytest.fixture
def fake() -> Iterator[FakeFeishuThread]:
    app = FakeFeishu(app_id=f"cli_replier_{uuid.uuid4().hex[:12]}")
    with app.run_in_thread() as running:
        yield running


@contextlib.asynccontextmanager
async def _setup_on(fake: FakeFeishuThread, **api_options: Any) -> AsyncIterator[Setup]:
    """A replier on ``fake`` whose retry waits are recorded, not waited; ``api_options`` go to
    :func:`tests.feishu_clients.feishu_api` (``timeout_s``, ``attempts``)."""
    sleeps: list[float] = []

    async def no_wait(seconds: float) -> None:
        sleeps.append(seconds)

    async with feishu_api(fake, sleep=no_wait, **api_options) as api:
        yield Setup(fake, CardReplier(api, update_interval_s=0.01), sleeps, api)


@pytest.fixture
async def setup(fake: FakeFeishuThread) -> AsyncIterator[Setup]:
    async with _setup_on(fake) as made:
        yield made


async def answer(*parts: str, note: str | None = None) -> AsyncIterator[ReplyEvent]:
    for part in parts:
        yield ReplyDelta(part)
    yield ReplyFinished("".join(parts), note=note)


class Feed:
    """Reply events the test releases one by one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ReplyEvent | None] = asyncio.Queue()

    def put(self, event: ReplyEvent | None) -> None:
        self.queue.put_nowait(event)

    async def events(self) -> AsyncIterator[ReplyEvent]:
        while (event := await self.queue.get()) is not None:
            yield event


async def _first_words_shown(
    setup: Setup, words: str
) -> tuple[ReplyTarget, Feed, asyncio.Task[StreamedReply]]:
    """Start an answer the test feeds, and wait until its first ``words`` are in the card."""
    feed = Feed()
    target = setup.user_message()
    streaming = asyncio.create_task(setup.stream(target, feed.events()))
    feed.put(ReplyDelta(words))
    await setup.fs.wait_for_calls("card_element_content", 1, timeout=10)
    return target, feed, streaming


#: the REST timeout of the fault tests below (their held calls time out after it)
SHORT_TIMEOUT_S = 0.5


#: every way a REST call can fail but a missing permission (final, tested on its own)
TRANSIENT_FAULTS = ["rate limited", "server error", "timeout", "connection cut"]


def _fail_call(fs: FakeFeishu, target: str, fault: str, *, times: int | None) -> None:
    """Make the ``target`` call fail ``times`` times in the way ``fault`` names."""
    if fault == "rate limited":
        fs.fail(target, "rate_limited", times=times, headers={"x-ogw-ratelimit-reset": "1"})
    elif fault == "server error":
        fs.fail(target, 1, "internal error", http_status=503, times=times)
    elif fault == "timeout":
        fs.hold(target, times=times)  # answered only when the fake stops
    elif fault == "connection cut":
        fs.cut(target, times=times)
    else:
        raise AssertionError(fault)


def _quick_setup(
    fake: FakeFeishuThread, *, attempts: int = 4
) -> contextlib.AbstractAsyncContextManager[Setup]:
    """A setup whose calls time out after :data:`SHORT_TIMEOUT_S`."""
    return _setup_on(fake, timeout_s=SHORT_TIMEOUT_S, attempts=attempts)


# ---- the happy path --------------------------------------------------------------------------


async def test_an_answer_streams_into_one_cardkit_card_that_ends_closed(setup: Setup) -> None:
    target = setup.user_message()
    result = await setup.stream(target, answer("Hello ", "there, ", "friend."))
    assert result.outcome == "complete"
    assert result.undelivered == ""
    assert setup.card_text(target) == "Hello there, friend."
    (reply,) = setup.fs.replies_to(target.message_id)
    assert result.message_ids == [reply.message_id]
    card = setup.fs.card(reply.card_id or "")
    assert card.sequences == sorted(set(card.sequences))
    record = DeliveryRecord.from_json(setup.saved[-1])
    assert [c.card_id for c in record.cards] == [reply.card_id]
    assert [c.message_id for c in record.cards] == [reply.message_id]


async def test_the_final_text_and_the_end_of_streaming_go_in_one_call(setup: Setup) -> None:
    target = setup.user_message()
    await setup.stream(target, answer("All ", "in one."))
    card = setup.fs.card(setup.fs.replies_to(target.message_id)[0].card_id or "")
    assert card.closed
    assert setup.fs.calls_to("card_settings") == []
    (end,) = setup.fs.calls_to("card_batch_update")
    *streamed, final, close = card.updates
    assert (final.kind, final.content, final.batch) == ("content", "All in one.", True)
    assert (close.kind, close.batch, close.sequence) == ("settings", True, None)
    assert final.sequence is not None
    assert all(u.sequence is not None and u.sequence < final.sequence for u in streamed)
    assert end.status == 200


async def test_a_refused_batch_update_ends_cards_with_two_calls_from_then_on(
    setup: Setup,
) -> None:
    logs = io.StringIO()
    configure_logging(level="info", json=True, stream=logs)
    setup.fs.fail("card_batch_update", 99992402, "field validation failed", times=None)
    first, second = setup.user_message(), setup.user_message()
    await setup.stream(first, answer("First ", "answer."))
    await setup.stream(second, answer("Second ", "answer."))
    configure_logging(level="warning", stream=io.StringIO())
    said = [json.loads(line)["event"] for line in logs.getvalue().splitlines()]
    assert said.count("card_batch_update_unavailable") == 1
    for target, text in ((first, "First answer."), (second, "Second answer.")):
        (reply,) = setup.fs.replies_to(target.message_id)  # no follow-up message
        card = setup.fs.card(reply.card_id or "")
        assert card.closed
        assert card.text == text
    assert len(setup.fs.calls_to("card_batch_update")) == 1  # not tried again
    assert len(setup.fs.calls_to("card_settings")) == 2


async def test_a_batch_update_refused_for_its_card_alone_is_used_again(setup: Setup) -> None:
    setup.fs.fail("card_batch_update", 230099, "card content failed", times=1)
    setup.fs.fail("card_element_content", 230099, "card content failed", times=None)
    moved, next_one = setup.user_message(), setup.user_message()
    await setup.stream(moved, answer("Moved ", "to a message."))
    await setup.stream(next_one, answer("Seen."))
    # The two calls failed as the batch did: the refusal was about that card, not the call.
    assert setup.fs.reply_texts(moved.message_id)[-1] == "Moved to a message."
    assert len(setup.fs.calls_to("card_batch_update")) == 3  # end, the moved note, next end
    card = setup.fs.card(setup.fs.replies_to(next_one.message_id)[0].card_id or "")
    assert card.closed
    assert card.text == "Seen."


async def test_a_5xx_on_the_final_batch_update_is_retried_into_the_same_card(
    setup: Setup,
) -> None:
    setup.fs.fail("card_batch_update", 1, "internal error", http_status=500, times=1)
    target = setup.user_message()
    result = await setup.stream(target, answer("Retried ", "once."))
    assert result.undelivered == ""
    (reply,) = setup.fs.replies_to(target.message_id)
    card = setup.fs.card(reply.card_id or "")
    assert (card.closed, card.text) == (True, "Retried once.")
    assert [c.status for c in setup.fs.calls_to("card_batch_update")] == [500, 200]
    assert setup.fs.calls_to("card_settings") == []


@pytest.mark.parametrize("fault", ["rate limited", "timeout", "connection cut"])
async def test_a_final_batch_update_failing_once_is_retried_into_the_same_card(
    fake: FakeFeishuThread, fault: str
) -> None:
    async with _quick_setup(fake) as setup:
        _fail_call(setup.fs, "card_batch_update", fault, times=1)
        target = setup.user_message()
        result = await setup.stream(target, answer("Arrives ", "after one retry."))
    assert (result.outcome, result.undelivered) == ("complete", "")
    (reply,) = setup.fs.replies_to(target.message_id)  # nothing sent twice, no follow-up
    card = setup.fs.card(reply.card_id or "")
    assert (card.closed, card.text) == (True, "Arrives after one retry.")
    assert card.sequences == sorted(set(card.sequences))
    first_end, second_end = setup.fs.calls_to("card_batch_update")
    assert (first_end.status, second_end.status) != (200, 200)  # the failure, then the retry
    assert second_end.status == 200
    assert setup.fs.calls_to("card_settings") == []
    assert result.message_ids == [reply.message_id]
    record = DeliveryRecord.from_json(setup.saved[-1])
    assert [c.card_id for c in record.cards] == [reply.card_id]


@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
async def test_a_final_batch_update_that_keeps_failing_sends_the_answer_as_a_message(
    fake: FakeFeishuThread, fault: str
) -> None:
    async with _quick_setup(fake, attempts=2) as setup:
        _fail_call(setup.fs, "card_batch_update", fault, times=None)
        target, feed, streaming = await _first_words_shown(setup, "Never lost, ")
        feed.put(ReplyFinished("Never lost, only moved."))
        feed.put(None)
        result = await asyncio.wait_for(streaming, 30)
    assert (result.outcome, result.undelivered) == ("complete", "")
    card_reply, text_reply = setup.fs.replies_to(target.message_id)
    assert (card_reply.msg_type, text_reply.msg_type) == ("interactive", "text")
    assert setup.fs.message_text(text_reply.message_id) == "Never lost, only moved."
    # The card is not left typing: the two calls of its own close got through.
    card = setup.fs.card(card_reply.card_id or "")
    assert (card.closed, card.text) == (True, MOVED_NOTE)
    assert [c.status for c in setup.fs.calls_to("card_settings")] == [200]
    # The message went first: the card's close came after it.
    (close,) = setup.fs.calls_to("card_settings")
    (text_call,) = [c for c in setup.fs.calls_to("message_reply") if c.json["msg_type"] == "text"]
    assert text_call.time < close.time
    assert sorted(result.message_ids) == sorted([card_reply.message_id, text_reply.message_id])
    record = DeliveryRecord.from_json(setup.saved[-1])
    assert [c.card_id for c in record.cards] == [card_reply.card_id]


async def test_cardkit_permission_withdrawn_before_the_end_sends_the_answer_as_a_message(
    setup: Setup,
) -> None:
    target, feed, streaming = await _first_words_shown(setup, "Half of it")
    for endpoint in ("card_batch_update", "card_element_content", "card_settings"):
        setup.fs.fail(endpoint, "no_permission_cardkit", times=None)
    feed.put(ReplyFinished("Half of it, and the rest."))
    feed.put(None)
    result = await asyncio.wait_for(streaming, 10)
    assert (result.outcome, result.undelivered) == ("complete", "")
    card_reply, text_reply = setup.fs.replies_to(target.message_id)
    assert setup.fs.message_text(text_reply.message_id) == "Half of it, and the rest."
    assert setup.fs.card(card_reply.card_id or "").text == "Half of it"
    assert all(c.status == 400 for c in setup.fs.calls_to("card_batch_update"))
    assert len(setup.sleeps) == 0  # a missing permission is final: nothing was retried


async def test_a_model_answer_cannot_mention_everyone(setup: Setup) -> None:
    target = setup.user_message()
    await setup.stream(target, answer('Hi <at id=all></at> and <at user_id="all">all</at>!'))
    text = setup.card_text(target)
    assert "<at id=all>" not in text
    assert '<at user_id="all">' not in text
    assert "all" in text


# ---- card creation and sending fail ----------------------------------------------------------


async def test_a_500_on_card_creation_is_retried_and_the_answer_arrives_whole(
    setup: Setup,
) -> None:
    setup.fs.fail("card_create", 1, "internal error", http_status=500, times=1)
    target = setup.user_message()
    result = await setup.stream(target, answer("The whole ", "answer."))
    assert result.outcome == "complete"
    assert setup.card_text(target) == "The whole answer."
    assert len(setup.fs.calls_to("card_create")) == 2
    assert len(setup.sleeps) == 1  # one backoff before the retry


async def test_cardkit_refused_for_a_missing_scope_falls_back_to_a_patched_card_once(
    setup: Setup,
) -> None:
    logs = io.StringIO()
    configure_logging(level="info", json=True, stream=logs)
    setup.fs.fail("card_create", "no_permission_cardkit", times=None)
    first, second = setup.user_message(), setup.user_message()
    await setup.stream(first, answer("First ", "answer."))
    await setup.stream(second, answer("Second answer."))
    for target, expected in ((first, "First answer."), (second, "Second answer.")):
        (reply,) = setup.fs.replies_to(target.message_id)
        assert reply.msg_type == "interactive"
        assert reply.card_id is None
        assert setup.fs.message_text(reply.message_id) == expected
    assert len(setup.fs.calls_to("card_create")) == 1  # remembered: not asked again
    configure_logging(level="warning", stream=io.StringIO())
    warnings = [json.loads(line) for line in logs.getvalue().splitlines() if "scope" in line]
    assert [w["scope"] for w in warnings if w["event"] == "feishu_scope_missing"] == [
        "cardkit:card:write"
    ]


async def test_when_no_card_can_be_sent_the_answer_goes_out_as_text(setup: Setup) -> None:
    setup.fs.fail("card_create", 1, "internal error", http_status=503, times=None)
    target = setup.user_message()
    result = await setup.stream(target, answer("Plain ", "but complete."))
    assert result.undelivered == ""
    assert setup.fs.reply_texts(target.message_id) == ["Plain but complete."]


async def test_a_reply_feishu_never_takes_is_returned_as_undelivered(setup: Setup) -> None:
    setup.fs.fail("message_reply", 1, "internal error", http_status=500, times=None)
    target = setup.user_message()
    result = await setup.stream(target, answer("Keep ", "me."))
    assert result.undelivered == "Keep me."
    assert result.permanent is False
    assert setup.fs.replies_to(target.message_id) == []


@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
@pytest.mark.parametrize("endpoint", ["card_create", "message_reply"])
async def test_the_card_failing_once_to_open_or_be_sent_still_brings_one_whole_answer(
    fake: FakeFeishuThread, endpoint: str, fault: str
) -> None:
    async with _quick_setup(fake) as setup:
        _fail_call(setup.fs, endpoint, fault, times=1)
        target = setup.user_message()
        result = await setup.stream(target, answer("One card, ", "whole."))
        assert (result.outcome, result.undelivered) == ("complete", "")
        assert setup.card_text(target) == "One card, whole."  # one reply, closed
        first, retried = setup.fs.calls_to(endpoint)
        assert (first.status, retried.status) != (200, 200)
        assert retried.status == 200
        if endpoint == "message_reply":  # the retry is the same reply: Feishu keeps one
            assert first.json["uuid"] == retried.json["uuid"]
        (reply,) = setup.fs.replies_to(target.message_id)
        record = DeliveryRecord.from_json(setup.saved[-1])
        assert [(c.card_id, c.message_id) for c in record.cards] == [
            (reply.card_id, reply.message_id)
        ]


@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
async def test_a_reply_that_keeps_failing_is_kept_as_undelivered_not_lost(
    fake: FakeFeishuThread, fault: str
) -> None:
    async with _quick_setup(fake, attempts=2) as setup:
        _fail_call(setup.fs, "message_reply", fault, times=None)
        target = setup.user_message()
        result = await setup.stream(target, answer("Kept ", "for later."))
    assert (result.undelivered, result.permanent) == ("Kept for later.", False)
    assert setup.fs.replies_to(target.message_id) == []
    assert result.message_ids == []
    # The card made for it is recorded: the redelivery sends that one, not a second card.
    (card,) = DeliveryRecord.from_json(setup.saved[-1]).cards
    assert card.card_id in setup.fs.cards


async def test_a_recalled_question_is_undeliverable_for_good(setup: Setup) -> None:
    setup.fs.fail("message_reply", "message_recalled", times=None)
    target = setup.user_message()
    result = await setup.stream(target, answer("Nobody will read this."))
    assert result.undelivered == "Nobody will read this."
    assert result.permanent is True


async def test_send_text_retries_a_blip_and_is_idempotent(setup: Setup) -> None:
    setup.fs.fail("message_reply", 1, "bad gateway", http_status=502, times=2)
    target = setup.user_message()
    result = await setup.replier.send_text(
        target, "Only once.", record=DeliveryRecord(), persist=setup.persist
    )
    again = await setup.replier.send_text(
        target, "Only once.", record=DeliveryRecord(), persist=setup.persist
    )
    assert result.undelivered == ""
    assert again.undelivered == ""
    assert setup.fs.reply_texts(target.message_id) == ["Only once."]  # same uuid, one message


# ---- updates and the final text fail ---------------------------------------------------------


async def test_when_the_final_update_fails_the_answer_follows_as_a_message(setup: Setup) -> None:
    setup.fs.fail("card_batch_update", 230099, "card content failed", times=None)
    setup.fs.fail("card_element_content", 230099, "card content failed", times=None)
    target = setup.user_message()
    result = await setup.stream(target, answer("The end ", "must arrive."))
    assert result.undelivered == ""
    replies = setup.fs.replies_to(target.message_id)
    assert [r.msg_type for r in replies] == ["interactive", "text"]
    assert setup.fs.message_text(replies[1].message_id) == "The end must arrive."
    card = setup.fs.card(replies[0].card_id or "")
    assert card.closed  # never left spinning


async def test_a_card_that_cannot_be_closed_still_counts_as_delivered(setup: Setup) -> None:
    setup.fs.fail("card_batch_update", 99992402, "field validation failed", times=None)
    setup.fs.fail("card_settings", 1, "internal error", http_status=500, times=None)
    target = setup.user_message()
    result = await setup.stream(target, answer("Shown ", "in full."))
    assert result.undelivered == ""
    (reply,) = setup.fs.replies_to(target.message_id)  # no duplicate as a message
    assert setup.fs.card(reply.card_id or "").text == "Shown in full."


async def test_when_the_plain_card_cannot_be_updated_the_answer_follows_as_a_message(
    setup: Setup,
) -> None:
    setup.fs.fail("card_create", "no_permission_cardkit", times=None)
    setup.fs.fail("message_patch", 1, "internal error", http_status=500, times=None)
    target = setup.user_message()
    result = await setup.stream(target, answer("Patched ", "or not."))
    assert result.undelivered == ""
    replies = setup.fs.replies_to(target.message_id)
    assert [r.msg_type for r in replies] == ["interactive", "text"]
    assert setup.fs.message_text(replies[1].message_id) == "Patched or not."


async def test_a_rate_limited_update_pauses_updates_and_the_final_text_still_lands(
    setup: Setup,
) -> None:
    target, feed, streaming = await _first_words_shown(setup, "one ")
    setup.fs.fail("card_element_content", "rate_limited", headers={"x-ogw-ratelimit-reset": "30"})
    feed.put(ReplyDelta("two "))
    await setup.fs.wait_for_calls("card_element_content", 2, timeout=10)
    for word in ("three ", "four "):
        feed.put(ReplyDelta(word))
        await asyncio.sleep(0.05)  # several update intervals pass: none may be sent
    assert len(setup.fs.calls_to("card_element_content")) == 2  # paused by the reset hint
    feed.put(ReplyFinished("one two three four"))
    feed.put(None)
    result = await asyncio.wait_for(streaming, 10)
    assert result.outcome == "complete"
    assert setup.card_text(target) == "one two three four"


@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
async def test_an_update_lost_mid_answer_is_made_good_by_the_next_and_the_end(
    fake: FakeFeishuThread, fault: str
) -> None:
    async with _quick_setup(fake) as setup:
        target, feed, streaming = await _first_words_shown(setup, "one ")
        _fail_call(setup.fs, "card_element_content", fault, times=1)
        feed.put(ReplyDelta("two "))
        await setup.fs.wait_for_calls("card_element_content", 2, timeout=10)
        feed.put(ReplyFinished("one two three"))
        feed.put(None)
        result = await asyncio.wait_for(streaming, 10)
        assert (result.outcome, result.undelivered) == ("complete", "")
        assert setup.card_text(target) == "one two three"  # one card, closed, whole
        first, lost, *_ = setup.fs.calls_to("card_element_content")
        assert first.status == 200
        assert lost.status != 200  # failed, timed out or cut: the user did not see it
        card = setup.fs.card(setup.fs.replies_to(target.message_id)[0].card_id or "")
        assert card.sequences == sorted(set(card.sequences))  # nothing applied out of order
        assert len(setup.fs.calls_to("card_batch_update")) == 1


async def test_a_sequence_conflict_on_the_final_update_leaps_forward(setup: Setup) -> None:
    setup.fs.fail("card_element_content", "card_sequence_not_increasing", times=1)
    target = setup.user_message()
    await setup.stream(target, answer("Final."))
    assert setup.card_text(target) == "Final."


# ---- shutdown and resume ---------------------------------------------------------------------


async def test_a_cut_short_answer_closes_its_card_with_a_note(setup: Setup) -> None:
    feed, stop = Feed(), asyncio.Event()
    target = setup.user_message()
    streaming = asyncio.create_task(setup.stream(target, feed.events(), stop=stop))
    feed.put(ReplyDelta("half of it"))
    await setup.fs.wait_for_calls("card_element_content", 1, timeout=10)
    stop.set()
    result = await asyncio.wait_for(streaming, 10)
    assert result.outcome == "cut_short"
    assert setup.card_text(target) == "half of it\n\n" + CUT_SHORT_NOTE


async def test_a_stop_set_before_the_answer_starts_cuts_it_short(setup: Setup) -> None:
    stop = asyncio.Event()
    stop.set()
    target = setup.user_message()
    result = await setup.stream(target, Feed().events(), stop=stop)  # no event ever comes
    assert result.outcome == "cut_short"
    assert setup.card_text(target).endswith(CUT_SHORT_NOTE)


async def test_a_timeout_raised_by_the_events_is_a_failure_not_a_stop(setup: Setup) -> None:
    async def timing_out() -> AsyncIterator[ReplyEvent]:
        yield ReplyDelta("so far")
        raise TimeoutError("from deep inside")

    target = setup.user_message()
    result = await setup.stream(target, timing_out(), stop=asyncio.Event())
    assert result.outcome == "failed"
    assert setup.card_text(target) == APOLOGY


async def test_cancelling_the_answer_is_not_taken_for_a_stop(setup: Setup) -> None:
    feed = Feed()
    target = setup.user_message()
    streaming = asyncio.create_task(setup.stream(target, feed.events(), stop=asyncio.Event()))
    feed.put(ReplyDelta("half of it"))
    await setup.fs.wait_for_calls("card_element_content", 1, timeout=10)
    streaming.cancel()
    with pytest.raises(asyncio.CancelledError):
        await streaming


async def test_a_resumed_answer_is_written_into_the_same_card(setup: Setup) -> None:
    feed, stop = Feed(), asyncio.Event()
    target = setup.user_message()
    record = DeliveryRecord()
    first = asyncio.create_task(setup.stream(target, feed.events(), record, stop))
    feed.put(ReplyDelta("first try"))
    await setup.fs.wait_for_calls("card_element_content", 1, timeout=10)
    stop.set()
    await asyncio.wait_for(first, 10)
    resumed = DeliveryRecord.from_json(setup.saved[-1])  # as the next run reads it back
    result = await setup.stream(target, answer("The whole ", "answer."), resumed)
    assert result.outcome == "complete"
    assert setup.card_text(target) == "The whole answer."  # one reply, finished in place
    assert len(setup.fs.calls_to("card_create")) == 1


async def test_a_new_card_waits_for_the_model_requests_a_resumed_card_does_not(
    setup: Setup,
) -> None:
    asked, go = asyncio.Event(), asyncio.Event()

    async def requests_first() -> None:
        asked.set()
        await go.wait()

    setup.use_replier(before_new_card=requests_first)
    target = setup.user_message()
    streaming = asyncio.create_task(setup.stream(target, answer("After ", "the request.")))
    await asyncio.wait_for(asked.wait(), 10)
    assert setup.fs.calls_to("card_create") == []  # the model request goes first
    go.set()
    await asyncio.wait_for(streaming, 10)
    assert setup.card_text(target) == "After the request."
    asked.clear()
    go.clear()  # a resumed answer's card exists: it is reused at once
    resumed = DeliveryRecord.from_json(setup.saved[-1])
    result = await setup.stream(target, answer("Again."), resumed)
    assert (result.outcome, asked.is_set()) == ("complete", False)
    assert len(setup.fs.calls_to("card_create")) == 1


async def test_cards_a_resumed_answer_no_longer_needs_are_closed_with_a_note(
    setup: Setup,
) -> None:
    target = setup.user_message()
    setup.use_replier(card_limit_bytes=40)
    record = DeliveryRecord()
    long_answer = "x" * 30 + "\n" + "y" * 30 + "\n" + "z" * 30
    await setup.stream(target, answer(long_answer), record)
    assert len(record.cards) == 3
    result = await setup.stream(target, answer("short now"), record)
    assert result.outcome == "complete"
    texts = [setup.fs.card(c.card_id).text for c in record.cards]
    assert texts == ["short now", SUPERSEDED_NOTE, SUPERSEDED_NOTE]
    assert all(setup.fs.card(c.card_id).closed for c in record.cards)


async def test_a_failure_event_ends_the_card_with_the_apology(setup: Setup) -> None:
    async def failing() -> AsyncIterator[ReplyEvent]:
        yield ReplyDelta("partial")
        yield ReplyFailed("Sorry, the model is not answering.", reason="test")

    target = setup.user_message()
    result = await setup.stream(target, failing())
    assert result.outcome == "failed"
    assert setup.card_text(target) == "Sorry, the model is not answering."


async def test_a_broken_event_source_still_closes_the_card_politely(setup: Setup) -> None:
    async def broken() -> AsyncIterator[ReplyEvent]:
        yield ReplyDelta("partial")
        raise RuntimeError("a bug upstream")

    target = setup.user_message()
    result = await setup.stream(target, broken())
    assert result.outcome == "failed"
    assert setup.card_text(target).startswith("Sorry, something went wrong")


async def test_the_card_is_closed_with_the_answer_before_the_events_end(setup: Setup) -> None:
    feed = Feed()
    target = setup.user_message()
    streaming = asyncio.create_task(setup.stream(target, feed.events()))
    feed.put(ReplyDelta("The answer."))
    feed.put(ReplyFinished("The answer."))  # its source still has bookkeeping to do
    await setup.fs.wait_for_calls("card_batch_update", 1, timeout=10)
    assert setup.card_text(target) == "The answer."
    assert not streaming.done()
    feed.put(None)
    result = await asyncio.wait_for(streaming, 10)
    assert result.outcome == "complete"
    assert result.text == "The answer."


async def test_a_failure_after_the_last_event_leaves_the_answer_as_it_is(setup: Setup) -> None:
    async def failing_afterwards() -> AsyncIterator[ReplyEvent]:
        yield ReplyDelta("The answer.")
        yield ReplyFinished("The answer.")
        raise RuntimeError("the bookkeeping after the answer broke")

    target = setup.user_message()
    result = await setup.stream(target, failing_afterwards())
    assert result.outcome == "complete"
    assert setup.card_text(target) == "The answer."


async def test_a_stop_after_the_last_event_cuts_nothing_short(setup: Setup) -> None:
    stop = asyncio.Event()

    async def ending_after_the_stop() -> AsyncIterator[ReplyEvent]:
        yield ReplyFinished("The answer.")
        await stop.wait()
        for _ in range(5):  # let the replier see the stop before the events end
            await asyncio.sleep(0)

    target = setup.user_message()
    streaming = asyncio.create_task(setup.stream(target, ending_after_the_stop(), stop=stop))
    await setup.fs.wait_for_calls("card_batch_update", 1, timeout=10)
    stop.set()
    result = await asyncio.wait_for(streaming, 10)
    assert result.outcome == "complete"
    assert setup.card_text(target) == "The answer."


def test_moved_note_is_what_a_card_says_when_its_text_went_elsewhere() -> None:
    assert "separate message" in MOVED_NOTE


# ---- the footer under an answer of the model -------------------------------------------------

NOW = 1_764_000_000.0
INFO = AnswerInfo("gpt-4o-mini", "1a2b3c4d5e6f", TokenUsage(640, 172))


def fixed_clock() -> float:
    return NOW


async def command_reply(text: str) -> AsyncIterator[ReplyEvent]:
    """What the service sends for a command: the whole text at once, nothing about a model."""
    yield ReplyFinished(text)


async def model_answer(
    *parts: str, info: AnswerInfo = INFO, note: str | None = None, complete: bool = True
) -> AsyncIterator[ReplyEvent]:
    for part in parts:
        yield ReplyDelta(part)
    yield ReplyFinished("".join(parts), note=note, complete=complete, info=info)


@pytest.mark.parametrize(
    ("mode", "info", "footer"),
    [
        ("short", INFO, "\n\n_gpt-4o-mini · 3.2 s_"),
        (
            "full",
            INFO,
            "\n\n_gpt-4o-mini · 3.2 s · 812 tokens (640 in, 172 out) · key 1a2b3c4d5e6f_",
        ),
        (
            "full",
            AnswerInfo("gpt-4o-mini", "1a2b3c4d5e6f", None),
            "\n\n_gpt-4o-mini · 3.2 s · key 1a2b3c4d5e6f_",
        ),
        ("off", INFO, ""),
    ],
    ids=["short", "full", "full-without-reported-usage", "off"],
)
async def test_an_answer_of_the_model_ends_with_a_small_footer_line_in_each_mode(
    setup: Setup, mode: str, info: AnswerInfo, footer: str
) -> None:
    setup.use_replier(footer=mode, clock=fixed_clock)
    target = setup.user_message()
    await setup.stream(target, model_answer("Hello ", "there.", info=info), started_at=NOW - 3.2)
    assert setup.card_text(target) == "Hello there." + footer


async def test_the_footer_comes_after_the_notes(setup: Setup) -> None:
    setup.use_replier(footer="short", clock=fixed_clock)
    target = setup.user_message()
    note = "(The answer reached the model's length limit. Ask me to continue.)"
    events = model_answer("Half", note=note, complete=False)
    result = await setup.stream(target, events, started_at=NOW - 12)
    assert result.outcome == "interrupted"
    assert setup.card_text(target) == f"Half\n\n_{note}_\n_gpt-4o-mini · 12.0 s_"


async def test_command_replies_and_apologies_have_no_footer(setup: Setup) -> None:
    setup.use_replier(footer="full", clock=fixed_clock)
    command, failure = setup.user_message(), setup.user_message()
    await setup.stream(command, command_reply("Done: I forgot our conversation."))

    async def apology() -> AsyncIterator[ReplyEvent]:
        yield ReplyFailed("Sorry, the model is not answering right now.", reason="test")

    await setup.stream(failure, apology(), started_at=NOW - 1)
    assert setup.card_text(command) == "Done: I forgot our conversation."
    assert setup.card_text(failure) == "Sorry, the model is not answering right now."


async def test_the_footer_is_on_the_last_card_of_a_long_answer_only(setup: Setup) -> None:
    setup.use_replier(footer="short", clock=fixed_clock, card_limit_bytes=40)
    target = setup.user_message()
    record = DeliveryRecord()
    long_answer = "x" * 30 + "\n" + "y" * 30
    await setup.stream(target, model_answer(long_answer), record, started_at=NOW - 2)
    first, last = (setup.fs.card(card.card_id).text for card in record.cards)
    assert "gpt-4o-mini" not in first
    assert last.endswith("\n\n_gpt-4o-mini · 2.0 s_")


async def test_the_footer_shows_in_the_plain_card_and_text_fallbacks_too(setup: Setup) -> None:
    setup.use_replier(footer="short", clock=fixed_clock)
    setup.fs.fail("card_create", "no_permission_cardkit", times=1)
    patched = setup.user_message()
    await setup.stream(patched, model_answer("Patched."), started_at=NOW - 1)
    (reply,) = setup.fs.replies_to(patched.message_id)
    assert reply.card_id is None
    assert setup.fs.message_text(reply.message_id) == "Patched.\n\n_gpt-4o-mini · 1.0 s_"

    setup.use_replier(footer="short", clock=fixed_clock)
    setup.fs.fail("card_create", 1, "internal error", http_status=503, times=None)
    texted = setup.user_message()
    await setup.stream(texted, model_answer("As text."), started_at=NOW - 1)
    assert setup.fs.reply_texts(texted.message_id) == ["As text.\n\n_gpt-4o-mini · 1.0 s_"]


async def test_the_first_text_of_an_answer_of_the_model_is_timed_once(setup: Setup) -> None:
    metrics = Metrics()
    setup.use_replier(metrics=metrics)
    _, feed, streaming = await _first_words_shown(setup, "first words")
    feed.put(ReplyDelta(", more words"))
    feed.put(ReplyFinished("first words, more words", info=INFO))
    feed.put(None)
    await asyncio.wait_for(streaming, 10)
    first_text = "feishu_gpt_bot_first_text_seconds_count"
    assert metrics.registry.get_sample_value(first_text) == 1

    await setup.stream(setup.user_message(), command_reply("a command reply"))
    await setup.stream(setup.user_message(), model_answer("short answer"))  # timed at its end
    assert metrics.registry.get_sample_value(first_text) == 2
