"""Answering accepted Feishu messages: one job per message, ordered, delivered, never dropped.

Every accepted message has a row in the store's inbox. A job answers it: it takes the message's
place in its conversation (the service answers a conversation's messages one at a time, and the
next starts only after this job committed or gave up), streams the reply into Feishu, and on
delivery saves the exchange and clears the inbox row in one store transaction. What the job sent
(the reply's cards) is recorded in the row as it goes, so after a crash the next start answers
*in the same card*.

A reply Feishu would not take (after the REST retries and fallbacks) stays in the inbox with its
text and is offered again with backoff for ``feishu.redelivery_minutes`` while the bot runs, then
at the next start. On shutdown, queued answers are not started, running ones get
``feishu.shutdown_grace_s``, and what is cut short stays in the inbox for the next start.

In p2p chats, with ``chat.merge_burst_ms`` > 0, messages a user sends within that window are
answered as one question (never across users: group messages are answered one by one).

Every job that ends counts its messages as answered, by outcome, in the metrics; an answer of the
model also records its latency from the message's acceptance (for a merged burst, the first
message's; for an answer resumed after a restart, the time the job started) to its delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from bot.chat.access import REFUSAL_TEXT
from bot.chat.replies import Reply, ReplyFailed, ReplyFinished
from bot.chat.service import ConversationService, IncomingMessage
from bot.config import Settings
from bot.feishu.messages import FeishuMessage, InboxPayloadError
from bot.feishu.replier import (
    CardReplier,
    DeliveryRecord,
    Persist,
    ReplyTarget,
    StreamedReply,
)
from bot.logging import bind_context, get_logger
from bot.ops.metrics import AnswerOutcome, Metrics
from bot.store import InboxEntry, Store
from bot.timing import Clock

log = get_logger(__name__)

#: how an undelivered reply ended: delivered after all, never deliverable, or kept for later
Settled = Literal["delivered", "gone", "kept"]

DELAYED_PREFIX = "_(Sorry for the delay: I was restarting when you sent this.)_\n\n"
TOO_LATE_TEXT = (
    "Sorry, I was offline when you sent this and could not answer in time. "
    "Please send it again if you still need an answer."
)
UNSUPPORTED_TEXT = (
    "I cannot read {what}: I understand text, voice messages, images and files (text, code, "
    "CSV, JSON, PDF). Please describe it in words and I will gladly help."
)
#: first wait before offering an undelivered reply again; it doubles up to REDELIVERY_MAX_WAIT_S
REDELIVERY_FIRST_WAIT_S = 2.0
REDELIVERY_MAX_WAIT_S = 300.0


@dataclass
class _Job:
    """One answer to deliver."""

    message: FeishuMessage
    record: DeliveryRecord
    accepted_at: float  # when its (first) message was accepted, or the job of a resumed one began
    reply: Reply | None = None
    text: str = ""  # a fixed text to deliver instead of a reply from the service
    kind: AnswerOutcome = "notice"  # what a fixed text is, for the metrics
    delayed: bool = False
    refused: bool = False  # a user not allowed: ``text`` is the refusal, sent once a day
    merged_ids: list[str] = field(default_factory=list)  # other messages this answer covers
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def message_ids(self) -> list[str]:
        return [*self.merged_ids, self.message.message_id]

    @property
    def target(self) -> ReplyTarget:
        m = self.message
        return ReplyTarget(chat_id=m.chat_id, message_id=m.message_id, in_thread=m.in_group)


class Answerer:
    """Runs the answer jobs of the Feishu gateway on the bot's loop."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        service: ConversationService,
        replier: CardReplier,
        *,
        clock: Clock = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._service = service
        self._replier = replier
        self._clock = clock
        self._metrics = metrics or Metrics()
        self._jobs: dict[asyncio.Task[None], _Job] = {}
        self._closing = False
        self._bursts: dict[str, _Burst] = {}

    # ---- intake ------------------------------------------------------------------------------

    async def resume(self, entries: list[InboxEntry]) -> None:
        """Answer what a previous run accepted but did not finish (crash, kill -9, shutdown)."""
        now = self._clock()
        window = self._settings.chat.resume_within_minutes * 60
        for entry in entries:
            try:
                message = FeishuMessage.from_json(entry.payload)
            except InboxPayloadError as exc:
                log.error("inbox_entry_unreadable", message_id=entry.message_id, reason=str(exc))
                await self._store.inbox_reject(entry.message_id, str(exc))
                continue
            record = DeliveryRecord.from_json(entry.delivery)
            if record.answer is not None:
                log.info("reply_redelivering", message_id=entry.message_id)
                job = _Job(message, DeliveryRecord(), now, text=record.answer, kind="redelivered")
                self._start(job)
            elif now - entry.received_at <= window:
                log.info("message_resumed", message_id=entry.message_id)
                self._start_answer(message, record, now, delayed=True)
            else:
                log.info("message_expired", message_id=entry.message_id)
                self._start(_Job(message, record, now, text=TOO_LATE_TEXT))

    def dispatch(self, message: FeishuMessage, *, accepted_at: float | None = None) -> None:
        """Answer a newly accepted message (merging a p2p burst first when configured);
        ``accepted_at`` is when it was accepted (default: now)."""
        if self._closing:
            log.info("message_kept_for_next_start", message_id=message.message_id)
            return
        accepted = self._clock() if accepted_at is None else accepted_at
        merge_s = self._settings.chat.merge_burst_ms / 1000
        if merge_s > 0 and not message.in_group and message.kind == "text":
            burst = self._bursts.get(message.conversation_id)
            if burst is None:
                burst = self._bursts[message.conversation_id] = _Burst(accepted)
            burst.add(message, merge_s, lambda: self._flush_burst(message.conversation_id))
            return
        self._start_answer(message, DeliveryRecord(), accepted, delayed=False)

    def _flush_burst(self, conversation_id: str) -> None:
        burst = self._bursts.pop(conversation_id, None)
        if burst is None or self._closing:
            return
        *earlier, last = burst.messages
        merged = dataclasses.replace(
            last,
            text="\n".join(m.text for m in burst.messages),
            media=tuple(item for m in burst.messages for item in m.media),
        )
        job_ids = [m.message_id for m in earlier]
        self._start_answer(
            merged, DeliveryRecord(), burst.accepted_at, delayed=False, merged_ids=job_ids
        )

    def _start_answer(
        self,
        message: FeishuMessage,
        record: DeliveryRecord,
        accepted_at: float,
        *,
        delayed: bool,
        merged_ids: list[str] | None = None,
    ) -> None:
        if not self._service.access.allows(message.sender_ids, message.chat_id):
            refusal = _Job(
                message, record, accepted_at, text=REFUSAL_TEXT, kind="refused", refused=True
            )
            self._start(refusal)
            return
        if message.kind == "unsupported":
            text = UNSUPPORTED_TEXT.format(what=message.describe_type())
            self._start(_Job(message, record, accepted_at, text=text))
            return
        # Taking the place in the conversation now keeps arrival order.
        reply = self._service.handle(
            IncomingMessage(
                conversation_id=message.conversation_id,
                user_id=message.sender_open_id,
                text=message.text,
                message_id=message.message_id,
                in_group=message.in_group,
                chat_id=message.chat_id,
                user_ids=message.sender_ids[1:],
                quoted_message_id=message.parent_id,
                quoted_is_root=message.quotes_thread_root,
                media=message.media,
            )
        )
        job = _Job(
            message, record, accepted_at, reply, delayed=delayed, merged_ids=merged_ids or []
        )
        self._start(job)

    def _start(self, job: _Job) -> None:
        task = asyncio.create_task(self._answer(job))
        self._jobs[task] = job
        task.add_done_callback(self._jobs.pop)

    # ---- shutdown ----------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """No new answer starts; running ones get ``grace_s``; the rest stays in the inbox."""
        self._closing = True
        for burst in self._bursts.values():
            burst.cancel()
        self._bursts.clear()
        for job in self._jobs.values():
            if job.reply is not None and job.reply.queued:
                job.stop.set()  # not started: close its card now, answer it after the restart
        if not self._jobs:
            return
        log.info("shutdown_waiting", replies=len(self._jobs), grace_s=grace_s)
        _, pending = await asyncio.wait(set(self._jobs), timeout=grace_s)
        if pending:
            for task in pending:
                self._jobs[task].stop.set()
            _, pending = await asyncio.wait(pending, timeout=10)
        for task in pending:  # Feishu is not answering: give up on closing those cards
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # ---- one job -----------------------------------------------------------------------------

    async def _answer(self, job: _Job) -> None:
        message = job.message
        bind_context(conversation=message.conversation_id, message_id=message.message_id)
        started = time.monotonic()

        async def persist(record: DeliveryRecord) -> None:
            await self._store.inbox_set_delivery(message.message_id, record.to_json())

        try:
            if job.refused:
                told = await self._service.access.refuse_today(message.sender_open_id)
                log.info(
                    "message_refused" if told else "message_refused_quietly",
                    user=message.sender_open_id,
                    chat_id=message.chat_id,
                    reason="not in access.allow",
                )
                if not told:
                    await self._store.complete_message(job.message_ids, (), None)
                    self._count(job, "ignored")
                    return
            if job.reply is None:
                result = await self._replier.send_text(
                    job.target, job.text, record=job.record, persist=persist
                )
            else:
                result = await self._replier.stream(
                    job.target,
                    job.reply,
                    record=job.record,
                    persist=persist,
                    prefix=DELAYED_PREFIX if job.delayed else "",
                    stop=job.stop,
                    started_at=job.accepted_at,
                )
            if result.outcome == "cut_short":
                log.info("reply_cut_short_kept", chars=len(result.text))
                return  # stays in the inbox: finished in the same card after the restart
            settled: Settled = "delivered"
            if result.undelivered:
                settled = (
                    "gone"
                    if result.permanent
                    else await self._redeliver(job, result.undelivered, persist)
                )
            if settled == "kept":
                return  # stays in the inbox with its text: offered again at the next start
            if settled == "gone":
                log.error("reply_undeliverable", chars=len(result.undelivered))
                # Feishu will never take it (the question was recalled…): forget the message,
                # and keep no history of an exchange the user never saw.
                await self._store.complete_message(job.message_ids, (), None)
                self._count(job, "undeliverable")
                return
            if job.reply is not None:
                await job.reply.commit(job.message_ids, result.message_ids)
            else:
                await self._store.complete_message(job.message_ids, (), None)
            self._count(job, _outcome(job, result))
            log.info(
                "reply_sent",
                outcome=result.outcome,
                messages=len(result.message_ids),
                seconds=round(time.monotonic() - started, 3),
            )
        except Exception as exc:  # a bug: keep the message for the next start, say so loudly
            log.error("reply_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if job.reply is not None:
                await job.reply.aclose()

    def _count(self, job: _Job, outcome: AnswerOutcome) -> None:
        """The job ended: count its messages; time it when it delivered an answer of the model."""
        model_answer = outcome in ("complete", "interrupted")
        self._metrics.message_answered(
            outcome,
            messages=len(job.message_ids),
            seconds=self._clock() - job.accepted_at if model_answer else None,
        )

    async def _redeliver(self, job: _Job, text: str, persist: Persist) -> Settled:
        """Offer an undelivered reply again, with backoff, while the bot runs."""
        job.record.answer = text
        await persist(job.record)
        deadline = time.monotonic() + self._settings.feishu.redelivery_minutes * 60
        wait = REDELIVERY_FIRST_WAIT_S
        while time.monotonic() + wait <= deadline:
            log.warning("reply_not_delivered", retry_in_s=wait, chars=len(text))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.stop.wait(), wait)
            if job.stop.is_set():
                return "kept"
            again = await self._replier.send_text(
                job.target, text, record=DeliveryRecord(), persist=_no_persist
            )
            if not again.undelivered:
                log.info("reply_redelivered", chars=len(text))
                return "delivered"
            if again.permanent:
                return "gone"
            wait = min(wait * 2, REDELIVERY_MAX_WAIT_S)
        log.error("reply_redelivery_paused", until="next start")
        return "kept"


def _outcome(job: _Job, result: StreamedReply) -> AnswerOutcome:
    """What a delivered job's answer was."""
    if job.reply is None:
        return job.kind
    final = job.reply.final
    if result.outcome == "failed" or isinstance(final, ReplyFailed):
        return "failed"
    if isinstance(final, ReplyFinished) and final.info is not None:
        return "complete" if result.outcome == "complete" else "interrupted"
    return "command"


async def _no_persist(record: DeliveryRecord) -> None:
    """Redelivered text replies need no record: their uuid makes them idempotent."""


class _Burst:
    """p2p messages waiting to be merged into one question (``accepted_at``: the first's)."""

    def __init__(self, accepted_at: float) -> None:
        self.accepted_at = accepted_at
        self.messages: list[FeishuMessage] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, message: FeishuMessage, window_s: float, flush: Callable[[], None]) -> None:
        self.messages.append(message)
        self.cancel()
        self._timer = asyncio.get_running_loop().call_later(window_s, flush)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
