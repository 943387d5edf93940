"""Delivering one reply in Feishu: a card that fills in as the model writes, and always ends.

Three ways to show an answer, tried in this order (a way Feishu refuses for a missing scope is
remembered for the life of the process, with one warning naming the scope):

1. ``cardkit``: a CardKit card entity sent as the reply; its markdown element is updated with the
   whole text so far (strictly increasing ``sequence``), and one batch update puts the final text
   and switches streaming mode off (two calls where Feishu refuses the batch update).
2. ``patch``: a plain ``interactive`` card sent as the reply and replaced with
   ``PATCH im/v1/messages/:id`` (Feishu allows about two per second).
3. ``text``: no card; once the answer is complete it is sent as text replies.

The card opens ("Thinking…") as soon as the message is accepted, while the LLM works. Updates are
best effort and coalesced to one per ``chat.stream_update_ms`` (a rate-limited update pauses them
for Feishu's reset hint); the final text of every card is sent by the bot itself with retries and
its result checked. If it cannot land in the card, the text goes out as a follow-up message and
then the card is closed with a note saying so; what still could not be delivered is returned to
the caller, who keeps it in the inbox and tries again later. Answers longer than one card
(Feishu caps a card at about 30 KB) continue in follow-up cards. Every card is closed, also when
shutdown cuts an answer short, unless Feishu takes none of its calls.

Every card and message sent is recorded in a :class:`DeliveryRecord` (kept in the inbox row), so
after a crash or restart the answer is regenerated *into the same cards* instead of a second
reply; reply requests carry a ``uuid`` derived from the user's message, which Feishu uses to
answer a repeated request with the message it already created.

Under an answer of the model (a final event carrying :class:`AnswerInfo`) the last card ends
with an italic footer line, after the notes (``chat.footer``: the model and the seconds since the
message was accepted, in ``full`` also the reported tokens and the key id). It is a line of the
answer's markdown element, so the card, patch and text ways all show it the same. The replier
also times the first text of a model's answer that Feishu took (metrics: first-text latency).

A :class:`ReplyPreface` (a voice message's transcript) is shown above the answer, like the
"sorry for the delay" prefix. With ``formulas`` (:class:`bot.feishu.formula_images.FormulaImages`)
the LaTeX of an answer shows as code while it streams, and each card's final text has its
formulas drawn, uploaded and placed as images.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from bot.chat.replies import (
    AnswerInfo,
    ReplyDelta,
    ReplyEvent,
    ReplyFailed,
    ReplyFinished,
    ReplyNotice,
    ReplyPreface,
    footer_text,
)
from bot.config import FooterMode
from bot.feishu.api import CODE_SEQUENCE_NOT_INCREASING, FeishuApi, FeishuApiError
from bot.feishu.formula_images import FormulaImages
from bot.feishu.render import safe_markdown, safe_plain_text
from bot.logging import get_logger
from bot.ops.metrics import Metrics
from bot.timing import Clock

log = get_logger(__name__)

Persist = Callable[["DeliveryRecord"], Awaitable[None]]
#: the footer line of an answer, from what the service says about it
Signature = Callable[[AnswerInfo], str]
ReplyMode = Literal["cardkit", "patch", "text"]
Outcome = Literal["complete", "interrupted", "failed", "cut_short"]

THINKING = "_Thinking…_"
CONTINUED = "_(continued below)_"
CUT_SHORT_NOTE = (
    "_(The bot is restarting: this answer stopped here and will be finished in this card when "
    "the bot is back.)_"
)
MOVED_NOTE = "_(This answer could not be shown here: it follows as a separate message.)_"
SUPERSEDED_NOTE = "_(See the answer above.)_"
APOLOGY = "Sorry, something went wrong while I was answering. Please try again."
#: text per card, in UTF-8 bytes: well under Feishu's ~30 KB card limit, JSON escaping included
CARD_TEXT_LIMIT_BYTES = 18_000
#: Feishu allows roughly two PATCH updates per second per message
PATCH_MIN_INTERVAL_S = 0.6
ELEMENT_ID = "answer"


@dataclass(frozen=True)
class ReplyTarget:
    """Where a reply goes: the user's message it answers, in its chat (in thread in groups)."""

    chat_id: str
    message_id: str
    in_thread: bool


@dataclass
class SentCard:
    """A card sent for a reply. ``card_id`` is empty for a ``patch`` card."""

    message_id: str = ""
    card_id: str = ""
    created_at: float = 0.0


@dataclass
class DeliveryRecord:
    """What was sent for one message so far: kept in its inbox row (JSON) across restarts.

    ``answer`` holds a finished answer (or the part of it) that is still to be delivered.
    """

    cards: list[SentCard] = field(default_factory=list)
    answer: str | None = None

    def to_json(self) -> str:
        """The inbox ``delivery`` column."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | None) -> DeliveryRecord:
        """Read it back; anything unreadable counts as nothing sent yet."""
        try:
            data = json.loads(raw) if raw else {}
            cards = [
                SentCard(
                    message_id=str(card.get("message_id") or ""),
                    card_id=str(card.get("card_id") or ""),
                    created_at=float(card.get("created_at") or 0.0),
                )
                for card in data.get("cards") or []
                if isinstance(card, dict)
            ]
            answer = data.get("answer")
            return cls(cards=cards, answer=answer if isinstance(answer, str) else None)
        except (ValueError, TypeError, AttributeError):
            log.warning("delivery_record_unreadable")
            return cls()


@dataclass
class StreamedReply:
    """How a reply went: its text, the messages that show it, and what is left to deliver.

    ``undelivered`` is the text Feishu did not take (after retries and fallbacks): empty when
    the whole reply reached the user. ``permanent`` says that retrying cannot help (for example
    the user's message was recalled).
    """

    text: str
    outcome: Outcome
    message_ids: list[str] = field(default_factory=list)
    undelivered: str = ""
    permanent: bool = False


class _Card(Protocol):
    """One card being filled: opened, updated (best effort), finished (checked)."""

    interval_s: float

    @property
    def message_id(self) -> str:
        """The card message's id (empty until sent)."""

    async def open(self, text: str) -> None:
        """Make sure the card exists, is sent as the reply, and accepts updates."""

    async def show(self, text: str) -> None:
        """Best-effort update, no retry (the next one carries the whole text anyway)."""

    async def finish(self, text: str) -> None:
        """Put the final text and close the card, with retries; raise FeishuApiError."""

    async def close(self, note: str) -> None:
        """Best effort, never raises: show ``note`` and stop the card streaming."""


class CardReplier:
    """Streams replies into Feishu through :class:`FeishuApi`, with the fallbacks above."""

    def __init__(
        self,
        api: FeishuApi,
        *,
        update_interval_s: float,
        card_limit_bytes: int = CARD_TEXT_LIMIT_BYTES,
        clock: Clock = time.time,
        footer: FooterMode = "short",
        metrics: Metrics | None = None,
        formulas: FormulaImages | None = None,
        before_new_card: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``before_new_card`` is awaited before a reply's first card is created (the
        service's :meth:`bot.chat.pacing.ModelRequestsFirst.wait`: model requests first)."""
        self._api = api
        self._formulas = formulas
        self._before_new_card = before_new_card
        self._interval = update_interval_s
        self._limit = card_limit_bytes
        self._clock = clock
        self._footer: FooterMode = footer
        self._metrics = metrics or Metrics()
        self._unavailable: set[ReplyMode] = set()
        self._sequences: dict[str, int] = {}  # card id -> last sequence used in this process
        self._one_call_end = _OneCallEnd()

    # ---- public ------------------------------------------------------------------------------

    async def stream(
        self,
        target: ReplyTarget,
        events: AsyncIterator[ReplyEvent],
        *,
        record: DeliveryRecord,
        persist: Persist,
        prefix: str = "",
        stop: asyncio.Event | None = None,
        started_at: float | None = None,
    ) -> StreamedReply:
        """Show ``events`` as the reply to ``target``; return how it went (never raises for
        Feishu failures: what could not be delivered is in the result).

        ``stop`` set while the answer is still coming cuts it short: what arrived is shown and
        the card says the answer will be finished after the restart. ``started_at`` (this
        replier's clock) is when the message was accepted, default now: the footer's seconds
        and the first-text latency count from it.
        """
        started = self._clock() if started_at is None else started_at

        def signature(info: AnswerInfo) -> str:
            return footer_text(info, self._footer, self._clock() - started)

        state = _AnswerState(prefix, self._limit, signature=signature, started=started)
        async with asyncio.TaskGroup() as group:
            presenting = group.create_task(self._present(target, state, record, persist))
            await _consume(events, state, stop)  # here: the question goes out before the card
        result = presenting.result()
        result.text = state.full_text()
        result.outcome = state.outcome
        return result

    async def send_text(
        self, target: ReplyTarget, text: str, *, record: DeliveryRecord, persist: Persist
    ) -> StreamedReply:
        """Deliver a complete text (a notice, an apology, or an answer kept for redelivery):
        into the reply's card when one was already sent for it, else as a text reply."""

        async def once() -> AsyncIterator[ReplyEvent]:
            yield ReplyFinished(text)

        if record.cards:
            return await self.stream(target, once(), record=record, persist=persist)
        try:
            ids = await self._send_text_parts(target, text, tag="text")
        except FeishuApiError as exc:
            log.warning("reply_text_failed", error=str(exc))
            return StreamedReply(text, "complete", undelivered=text, permanent=not exc.retryable)
        return StreamedReply(text, "complete", message_ids=ids)

    # ---- presenting --------------------------------------------------------------------------

    async def _present(
        self, target: ReplyTarget, state: _AnswerState, record: DeliveryRecord, persist: Persist
    ) -> StreamedReply:
        result = StreamedReply(text="", outcome="complete")
        index = 0
        if self._before_new_card is not None and not record.cards:
            await self._before_new_card()
        while True:
            card = await self._open(target, record, index, state.initial_text(), persist)
            if card is None:  # no card can be shown now: send the rest as text once complete
                await state.finished.wait()
                rest = state.rest_text()
                try:
                    result.message_ids += await self._send_text_parts(target, rest, tag=str(index))
                    self._time_first_text(state)
                except FeishuApiError as exc:
                    log.warning("reply_text_failed", error=str(exc))
                    result.undelivered, result.permanent = rest, not exc.retryable
                break
            text = await self._fill(card, state)
            if self._formulas is not None:
                text = await self._formulas.place(text)
            if not await self._finish(card, text, target, index, result, state):
                await state.finished.wait()
                result.undelivered = state.rest_text()
                break
            result.message_ids.append(card.message_id)
            if not state.start_next_card():
                break
            index += 1
        await self._retire(record.cards[index + 1 :], target, persist)
        return result

    async def _open(
        self,
        target: ReplyTarget,
        record: DeliveryRecord,
        index: int,
        initial: str,
        persist: Persist,
    ) -> _Card | None:
        """The ``index``-th card of the reply, reused from ``record`` when it was sent before."""
        sent = record.cards[index] if index < len(record.cards) else None
        for mode in self._modes_for(sent):
            if sent is None or not _fits(sent, mode):
                sent = SentCard()
                if index < len(record.cards):
                    record.cards[index] = sent
                else:
                    record.cards.append(sent)
            card = self._card(mode, target, sent, record, persist, index)
            try:
                await card.open(initial)
                return card
            except FeishuApiError as exc:
                if not self._give_up_on(mode, exc):
                    log.warning("reply_card_not_opened", mode=mode, error=str(exc))
                    if exc.retryable:
                        return None
                sent = None  # the next mode starts a new card
        return None

    def _modes_for(self, sent: SentCard | None) -> list[ReplyMode]:
        modes: list[ReplyMode] = [m for m in ("cardkit", "patch") if m not in self._unavailable]
        if sent is not None and sent.message_id and not sent.card_id and "patch" in modes:
            modes.remove("patch")
            modes.insert(0, "patch")  # reuse the interactive card sent before
        return modes

    def _give_up_on(self, mode: ReplyMode, exc: FeishuApiError) -> bool:
        """Remember a mode Feishu refuses for a missing scope; True when it was that."""
        scope = exc.missing_scope
        if scope is None:
            return False
        if mode not in self._unavailable:
            self._unavailable.add(mode)
            log.warning(
                "feishu_scope_missing",
                scope=scope,
                mode=mode,
                hint=f"add the scope {scope} in the developer console (Permissions & Scopes) "
                "and publish a new version; until then answers use a simpler format",
            )
        return True

    def _card(
        self,
        mode: ReplyMode,
        target: ReplyTarget,
        sent: SentCard,
        record: DeliveryRecord,
        persist: Persist,
        index: int,
    ) -> _Card:
        async def save() -> None:
            await persist(record)

        if mode == "cardkit":
            return _CardKitCard(
                self._api,
                target,
                sent,
                save,
                self._interval,
                index,
                clock=self._clock,
                sequences=self._sequences,
                one_call_end=self._one_call_end,
            )
        interval = max(self._interval, PATCH_MIN_INTERVAL_S)
        return _PatchCard(self._api, target, sent, save, interval, index)

    async def _fill(self, card: _Card, state: _AnswerState) -> str:
        """Push the latest text at most once per interval; return the card's final text."""
        loop = asyncio.get_running_loop()
        shown = ""
        paused_until = 0.0
        while True:
            await state.changed.wait()
            state.changed.clear()
            text, full = state.card_text()
            if full:
                return text + "\n\n" + CONTINUED
            if state.finished.is_set():
                return text
            wait = card.interval_s
            if text != shown and loop.time() >= paused_until:
                answer_shown = state.first_text_due()
                try:
                    await card.show(self._formulas.as_code(text) if self._formulas else text)
                    shown = text
                    if answer_shown:
                        self._time_first_text(state)
                except FeishuApiError as exc:
                    if exc.rate_limited:
                        wait = max(wait, exc.retry_after or 1.0)
                        paused_until = loop.time() + wait
                    log.info("card_update_skipped", code=exc.code, pause_s=wait)
            # asyncio.timeout, not wait_for: no task in between, so the end of the answer
            # reaches the card one turn of the loop later instead of three.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await state.finished.wait()
            state.changed.set()  # look again: more text may have come meanwhile

    async def _finish(
        self,
        card: _Card,
        text: str,
        target: ReplyTarget,
        index: int,
        result: StreamedReply,
        state: _AnswerState,
    ) -> bool:
        """Close the card with ``text``; if that fails, send ``text`` as a follow-up message and
        then close the card with a note saying so. False when the message failed too (then
        ``result`` says what is undelivered)."""
        try:
            await card.finish(text)
            self._time_first_text(state)
            return True
        except FeishuApiError as exc:
            log.warning("card_final_update_failed", error=str(exc))
        delivered = True
        try:
            result.message_ids += await self._send_text_parts(target, text, tag=f"{index}-moved")
            self._time_first_text(state)
        except FeishuApiError as exc:
            log.warning("reply_text_failed", error=str(exc))
            result.permanent = not exc.retryable
            delivered = False
        await card.close(MOVED_NOTE)  # after the message: a struggling card must not delay it
        return delivered

    def _time_first_text(self, state: _AnswerState) -> None:
        """Text of the model's answer reached the user: time it, the first time."""
        if state.first_text_due():
            state.first_text_timed = True
            self._metrics.first_text(self._clock() - state.started)

    async def _retire(self, cards: list[SentCard], target: ReplyTarget, persist: Persist) -> None:
        """Close cards an earlier run sent that the regenerated answer did not need."""
        for sent in cards:
            card = self._card(
                "cardkit" if sent.card_id else "patch", target, sent, DeliveryRecord(), persist, 0
            )
            with contextlib.suppress(FeishuApiError):
                await card.open(SUPERSEDED_NOTE)  # it was closed: let it take text again
            await card.close(SUPERSEDED_NOTE)

    async def _send_text_parts(self, target: ReplyTarget, text: str, *, tag: str) -> list[str]:
        """Send ``text`` as text replies (split to fit); return their ids."""
        ids = []
        for number, part in enumerate(_split(text, self._limit) or [""]):
            ids.append(
                await self._api.reply(
                    target.message_id,
                    "text",
                    {"text": safe_plain_text(part) or "…"},
                    in_thread=target.in_thread,
                    uuid=_uuid(target.message_id, "text", tag, str(number)),
                )
            )
        return ids


class _SentCardBase:
    """What both kinds of card share: where the reply goes and its record."""

    def __init__(
        self,
        api: FeishuApi,
        target: ReplyTarget,
        sent: SentCard,
        save: Callable[[], Awaitable[None]],
        interval_s: float,
        index: int,
    ) -> None:
        self._api = api
        self._target = target
        self._sent = sent
        self._save = save
        self._index = index
        self.interval_s = interval_s

    @property
    def message_id(self) -> str:
        return self._sent.message_id


class _OneCallEnd:
    """Whether a CardKit card's final text and the end of its streaming go in one call.

    They do (``batch_update``) until Feishu refuses that call with a final error and the two
    separate calls then work: from then on, for the life of the process, cards end with the two
    calls (one warning). A refusal the two calls share (the card is gone, the text too large)
    changes nothing.
    """

    def __init__(self) -> None:
        self.usable = True
        self._refusal: FeishuApiError | None = None
        self._confirmed = False

    def refused(self, exc: FeishuApiError) -> None:
        """The batch update was refused with ``exc``; the caller tries the two calls next."""
        if not self._confirmed:
            self._refusal = exc

    def confirm_usable(self) -> None:
        """A batch update worked: a later refusal is about its card, not the call."""
        self._confirmed = True
        self._refusal = None

    def confirm_refused(self) -> None:
        """The two calls worked where the batch update was refused: use them from now on."""
        if self._refusal is not None and self.usable:
            self.usable = False
            log.warning(
                "card_batch_update_unavailable",
                error=str(self._refusal),
                hint="cards now end with two calls (final text, then streaming off)",
            )


class _CardKitCard(_SentCardBase):
    """A CardKit card entity sent by reference.

    Sequences must grow card-wide. Within the process the replier remembers each card's last
    number; across processes (a card resumed after a crash) numbers grow with the milliseconds
    since the card was created, and a conflict (300317) leaps well past the other's numbers.
    """

    def __init__(
        self,
        api: FeishuApi,
        target: ReplyTarget,
        sent: SentCard,
        save: Callable[[], Awaitable[None]],
        interval_s: float,
        index: int,
        *,
        clock: Clock,
        sequences: dict[str, int],
        one_call_end: _OneCallEnd,
    ) -> None:
        super().__init__(api, target, sent, save, interval_s, index)
        self._clock = clock
        self._sequences = sequences
        self._one_call_end = one_call_end

    def _next_sequence(self) -> int:
        card_id = self._sent.card_id
        elapsed_ms = int((self._clock() - self._sent.created_at) * 1000)
        sequence = max(self._sequences.get(card_id, 0) + 1, elapsed_ms)
        self._sequences[card_id] = sequence
        return sequence

    async def _sequenced(self, call: Callable[[int], Awaitable[None]]) -> None:
        try:
            await call(self._next_sequence())
        except FeishuApiError as exc:
            if exc.code != CODE_SEQUENCE_NOT_INCREASING:
                raise
            self._sequences[self._sent.card_id] += 1_000_000  # numbered further elsewhere
            await call(self._next_sequence())

    async def open(self, text: str) -> None:
        sent = self._sent
        if sent.card_id:
            # Sent by an earlier run (maybe closed with a note): make it stream again.
            await self._sequenced(lambda seq: self._api.set_card_streaming(sent.card_id, True, seq))
        else:
            sent.card_id = await self._api.create_card(_streaming_card(safe_markdown(text)))
            sent.created_at = self._clock()
            await self._save()
        if not sent.message_id:
            sent.message_id = await self._api.reply(
                self._target.message_id,
                "interactive",
                {"type": "card", "data": {"card_id": sent.card_id}},
                in_thread=self._target.in_thread,
                uuid=_uuid(self._target.message_id, "card", str(self._index), sent.card_id),
            )
            await self._save()

    async def show(self, text: str) -> None:
        await self._api.set_card_text(
            self._sent.card_id, ELEMENT_ID, safe_markdown(text), self._next_sequence(), retry=False
        )

    async def finish(self, text: str) -> None:
        shown = safe_markdown(text)
        if await self._end_in_one_call(shown):
            return
        card_id = self._sent.card_id
        await self._sequenced(lambda seq: self._api.set_card_text(card_id, ELEMENT_ID, shown, seq))
        try:  # the text is there: a card that stays "typing" is a blemish, not a lost answer
            await self._sequenced(lambda seq: self._api.set_card_streaming(card_id, False, seq))
        except FeishuApiError as exc:
            log.warning("card_not_closed", card_id=card_id, error=str(exc))
        self._one_call_end.confirm_refused()

    async def close(self, note: str) -> None:
        try:
            if await self._end_in_one_call(note):
                return
        except FeishuApiError:
            pass  # it outlasted its retries; the two calls have limits of their own: try them
        card_id = self._sent.card_id
        with contextlib.suppress(FeishuApiError):
            await self._sequenced(
                lambda seq: self._api.set_card_text(card_id, ELEMENT_ID, note, seq)
            )
        with contextlib.suppress(FeishuApiError):
            await self._sequenced(lambda seq: self._api.set_card_streaming(card_id, False, seq))

    async def _end_in_one_call(self, text: str) -> bool:
        """Put ``text`` and end streaming in one batch update; False when the batch update was
        refused with a final error (the caller then makes the two calls). A failure that
        outlasted the call's retries (5xx, timeouts, rate limits) is raised: a final text then
        goes out as a message rather than wait for two more calls, a closing note still tries
        them."""
        if not self._one_call_end.usable:
            return False
        card_id = self._sent.card_id
        try:
            await self._sequenced(lambda seq: self._api.end_card(card_id, ELEMENT_ID, text, seq))
        except FeishuApiError as exc:
            if exc.retryable:
                raise
            self._one_call_end.refused(exc)
            return False
        self._one_call_end.confirm_usable()
        return True


class _PatchCard(_SentCardBase):
    """A plain interactive card, replaced whole with PATCH (at most every 0.6 s)."""

    async def open(self, text: str) -> None:
        if self._sent.message_id:
            await self._api.patch_card_message(self._sent.message_id, _static_card(text))
            return
        self._sent.message_id = await self._api.reply(
            self._target.message_id,
            "interactive",
            _static_card(text),
            in_thread=self._target.in_thread,
            uuid=_uuid(self._target.message_id, "patch", str(self._index)),
        )
        await self._save()

    async def show(self, text: str) -> None:
        await self._api.patch_card_message(self._sent.message_id, _static_card(text), retry=False)

    async def finish(self, text: str) -> None:
        await self._api.patch_card_message(self._sent.message_id, _static_card(text))

    async def close(self, note: str) -> None:
        with contextlib.suppress(FeishuApiError):
            await self._api.patch_card_message(self._sent.message_id, _static_card(note))


def _fits(sent: SentCard, mode: ReplyMode) -> bool:
    """Whether a card sent before can be reused in ``mode``."""
    if mode == "cardkit":
        return bool(sent.card_id) or not sent.message_id
    return not sent.card_id


def _streaming_card(text: str) -> dict[str, Any]:
    return {
        "schema": "2.0",
        "config": {"streaming_mode": True, "summary": {"content": ""}},
        "body": {"elements": [{"tag": "markdown", "element_id": ELEMENT_ID, "content": text}]},
    }


def _static_card(text: str) -> dict[str, Any]:
    return {
        "schema": "2.0",
        "config": {"update_multi": True},
        "body": {"elements": [{"tag": "markdown", "content": safe_markdown(text)}]},
    }


def _uuid(*parts: str) -> str:
    """A reply's idempotency key (Feishu allows 50 characters)."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:40]


class _AnswerState:
    """The answer so far, and which part of it the current card shows.

    ``footer`` holds the lines under the answer: its notes, then the ``signature`` line of an
    answer of the model.
    """

    def __init__(
        self,
        prefix: str,
        limit_bytes: int,
        *,
        signature: Signature | None = None,
        started: float = 0.0,
    ) -> None:
        self.prefix = prefix
        self.limit = limit_bytes
        self.signature = signature
        self.started = started
        self.answer = ""
        self.notice = ""
        self.footer = ""
        self.from_model = False  # deltas came, or the final event said so
        self.first_text_timed = False
        self.outcome: Outcome = "complete"
        self.offset = 0  # answer characters shown on earlier cards
        self.split_at: int | None = None  # where the current card's part ends, once full
        self.changed = asyncio.Event()
        self.finished = asyncio.Event()

    def finish(self) -> None:
        """The answer is complete: nothing more will change what the card shows."""
        self.finished.set()
        self.changed.set()

    def apply(self, event: ReplyEvent) -> None:
        if isinstance(event, ReplyDelta):
            self.answer += event.text
            self.from_model = True
        elif isinstance(event, ReplyNotice):
            self.notice = event.text
        elif isinstance(event, ReplyPreface):
            self.prefix += event.text + "\n\n"
        elif isinstance(event, ReplyFinished):
            self.answer = event.text
            lines = [line for line in (event.note or "").splitlines() if line.strip()]
            if event.info is not None:
                self.from_model = True
                if self.signature is not None:
                    lines.append(self.signature(event.info))
            self.footer = "\n".join(f"_{line}_" for line in lines if line)
            self.outcome = "complete" if event.complete else "interrupted"
            self.finish()  # the last event: the card takes it now, not after the bookkeeping
        elif isinstance(event, ReplyFailed):
            self.fail(event.message)
            self.finish()
        self.changed.set()

    def fail(self, message: str) -> None:
        self.answer = message
        self.footer = ""
        self.outcome = "failed"
        self.changed.set()

    def first_text_due(self) -> bool:
        """Whether the text shown now holds the model's answer, not yet timed."""
        return (
            self.from_model
            and bool(self.answer)
            and self.outcome != "failed"
            and not self.first_text_timed
        )

    def cut_short(self) -> None:
        self.footer = CUT_SHORT_NOTE
        self.outcome = "cut_short"

    def initial_text(self) -> str:
        return (self.prefix if self.offset == 0 else "") + THINKING

    def card_text(self) -> tuple[str, bool]:
        """The current card's text, and whether it is full (the rest goes to the next card)."""
        head = self.prefix if self.offset == 0 else ""
        part = self.answer[self.offset :]
        if not part and not self.footer:
            body = f"_{self.notice}_" if self.notice else THINKING
            return head + body, False
        if _size(head + part) > self.limit:
            cut = _split_point(part, self.limit - _size(head))
            self.split_at = self.offset + cut
            return head + part[:cut], True
        return "\n\n".join(p for p in (head + part, self.footer) if p), False

    def start_next_card(self) -> bool:
        """Move on to the next card if the current one filled up; False when the answer ended."""
        if self.split_at is None:
            return False
        self.offset, self.split_at = self.split_at, None
        self.changed.set()
        return True

    def rest_text(self) -> str:
        """The answer from the current card on (all of it for a reply without cards)."""
        head = self.prefix if self.offset == 0 else ""
        part = self.answer[self.offset :]
        return "\n\n".join(p for p in (head + part, self.footer) if p)

    def full_text(self) -> str:
        return "\n\n".join(p for p in (self.prefix + self.answer, self.footer) if p)


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _split_point(text: str, limit_bytes: int) -> int:
    """Characters of ``text`` that fit ``limit_bytes``, ending at a line break if one is near."""
    fitting = len(text.encode("utf-8")[: max(0, limit_bytes)].decode("utf-8", errors="ignore"))
    newline = text.rfind("\n", 0, fitting)
    if newline > fitting * 0.8:
        return newline + 1
    return max(1, fitting)


def _split(text: str, limit_bytes: int) -> list[str]:
    parts = []
    while text:
        cut = _split_point(text, limit_bytes) if _size(text) > limit_bytes else len(text)
        parts.append(text[:cut])
        text = text[cut:]
    return parts


async def _consume(
    events: AsyncIterator[ReplyEvent], state: _AnswerState, stop: asyncio.Event | None
) -> None:
    """Feed events into ``state`` until they end or ``stop`` is set; always finish the state.

    The state is finished by the last event (:class:`ReplyFinished` or :class:`ReplyFailed`), so
    the card shows the whole answer while the events' source still does its bookkeeping (the
    key pool's count of the request): a stop or a failure after that event changes nothing the
    user sees.

    It runs in the caller's task, so the question is on its way to the model before anything
    else of the answer gets a turn of the loop (a task per step cost a turn each, and at 200
    concurrent answers a turn of the loop takes up to a few hundred milliseconds). ``stop``
    cuts it short through an ``asyncio.timeout`` made to expire at once, which cancels just the
    feeding and tells that cancellation apart from any other.
    """

    async def feed() -> None:
        async for event in events:
            state.apply(event)

    try:
        if stop is None:
            await feed()
            return
        try:
            async with asyncio.timeout(None) as deadline:
                feeding = True

                def expire(_: object) -> None:
                    if feeding and not state.finished.is_set():
                        deadline.reschedule(0)  # a time already past: expire now

                stopping = asyncio.ensure_future(stop.wait())
                stopping.add_done_callback(expire)
                try:
                    await feed()
                finally:
                    feeding = False
                    stopping.cancel()
        except TimeoutError:
            if not deadline.expired():
                raise
            if not state.finished.is_set():  # a stop after the last event cuts nothing short
                state.cut_short()
                log.warning("reply_cut_short", chars=len(state.answer))
    except Exception as exc:
        if state.finished.is_set():  # the answer is whole: only what followed it failed
            log.error("reply_events_failed_after_answer", error=f"{type(exc).__name__}: {exc}")
        else:  # a bug upstream must still end the card, politely
            log.error("reply_events_failed", error=f"{type(exc).__name__}: {exc}")
            state.fail(APOLOGY)
    finally:
        state.finish()
