"""Streaming a reply into Feishu cards with the SDK's CardKit markdown controller.

``FeishuChannel.stream`` builds its ``MarkdownStreamController`` with a fixed 100 ms throttle and
opens the card only when the first text arrives (three round trips later the user sees it). We
build the same controller from the channel's public CardKit methods instead, so that:

- the card ("Thinking…") is created and sent as soon as the message is accepted, while the LLM
  works, and the first token then costs one round trip;
- updates are coalesced to at most one per ``chat.stream_update_ms`` (default 300 ms), sending
  the cumulative text (the controller's ``append`` merges overlaps and can drop characters);
- an answer too long for one card (Feishu caps a card at about 30 KB, error 230025) continues
  in a follow-up card instead of being cut;
- every card is closed: at the end, on failure (with a short apology), and when shutdown cuts an
  answer short (with a note), never left spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lark_oapi.channel.outbound.streaming.markdown_stream import MarkdownStreamController

from bot.chat.service import ReplyDelta, ReplyEvent, ReplyFailed, ReplyFinished, ReplyNotice
from bot.logging import get_logger

log = get_logger(__name__)

THINKING = "_Thinking…_"
CONTINUED = "_(continued below)_"
CUT_SHORT_NOTE = "_(The bot is restarting, so this answer was cut short. Please ask again.)_"
#: text per card, in UTF-8 bytes: well under Feishu's ~30 KB card limit, JSON escaping included
CARD_TEXT_LIMIT_BYTES = 18_000


class _ReplyCard(MarkdownStreamController):  # type: ignore[misc]
    """The SDK's controller, plus opening the card before any text exists."""

    async def open(self) -> None:
        """Create the card and send it as the reply (idempotent)."""
        await self._ensure_started()

    def stage_final(self, text: str) -> None:
        """Set the closing text without sending it: the controller's closing flush sends it,
        so the last text costs one update instead of two."""
        self._content = text


@dataclass
class StreamedReply:
    """How a reply went: its full text, the messages that show it, and the outcome."""

    text: str
    message_ids: list[str] = field(default_factory=list)
    outcome: str = "pending"


class CardReplier:
    """Streams one reply's events into cards replying to the user's message."""

    def __init__(
        self,
        channel: Any,
        *,
        update_interval_s: float,
        card_limit_bytes: int = CARD_TEXT_LIMIT_BYTES,
    ) -> None:
        self._channel = channel
        self._interval = update_interval_s
        self._limit = card_limit_bytes

    async def stream(
        self,
        *,
        chat_id: str,
        reply_to: str,
        in_thread: bool,
        events: AsyncIterator[ReplyEvent],
        prefix: str = "",
        stop: asyncio.Event | None = None,
    ) -> StreamedReply:
        """Show ``events`` in cards replying to ``reply_to``; return how it went.

        ``stop`` set while the answer is still coming cuts it short: what arrived is kept and
        the card says the answer was cut, then closes.
        """
        state = _AnswerState(prefix, self._limit)
        feeding = asyncio.create_task(_consume(events, state, stop))
        feeding.add_done_callback(lambda _: state.finish())
        result = StreamedReply(text="")
        try:
            while True:
                card = self._new_card(chat_id, reply_to, in_thread, state.initial_text())
                await card.run(lambda _controller, card=card: self._fill(card, state))
                result.message_ids.append(card.message_id)
                if not state.start_next_card():
                    break
            await feeding  # re-raises what the reply's producer raised, if anything
        finally:
            if not feeding.done():
                feeding.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeding
        result.text = state.full_text()
        result.outcome = state.outcome
        return result

    def _new_card(self, chat_id: str, reply_to: str, in_thread: bool, initial: str) -> _ReplyCard:
        return _ReplyCard(
            to=chat_id,
            receive_id_type="chat_id",
            reply_to=reply_to,
            reply_in_thread=in_thread or None,
            create_card_instance=self._channel.create_card_instance,
            send_card_by_reference=self._channel.send_card_by_reference,
            update_card_element_content=self._channel.update_card_element_content,
            finish_streaming_card=self._channel.finish_streaming_card,
            initial_text=initial,
            min_ms=0,  # throttling is ours (below); the controller sends what it is given
            min_chars=1,
        )

    async def _fill(self, card: _ReplyCard, state: _AnswerState) -> None:
        """Push the latest text at most once per interval until the card is full or done."""
        await card.open()
        pushed = ""
        while True:
            await state.changed.wait()
            state.changed.clear()
            text, full = state.card_text()
            if full:
                card.stage_final(text + "\n\n" + CONTINUED)
                return
            if state.finished.is_set():
                card.stage_final(text)
                return
            if text != pushed:
                await card.set_content(text)
                pushed = text
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.finished.wait(), self._interval)
                state.changed.set()  # look again: more text may have come meanwhile


class _AnswerState:
    """The answer so far, and which part of it the current card shows."""

    def __init__(self, prefix: str, limit_bytes: int) -> None:
        self.prefix = prefix
        self.limit = limit_bytes
        self.answer = ""
        self.notice = ""
        self.footer = ""
        self.outcome = "pending"
        self.offset = 0  # answer characters shown on earlier cards
        self.split_at: int | None = None  # where the current card's part ends, once full
        self.changed = asyncio.Event()
        self.finished = asyncio.Event()

    def finish(self) -> None:
        """No more events will come."""
        self.finished.set()
        self.changed.set()

    def apply(self, event: ReplyEvent) -> None:
        if isinstance(event, ReplyDelta):
            self.answer += event.text
        elif isinstance(event, ReplyNotice):
            self.notice = event.text
        elif isinstance(event, ReplyFinished):
            self.answer = event.text
            self.footer = f"_{event.note}_" if event.note else ""
            self.outcome = "complete" if event.complete else "interrupted"
        elif isinstance(event, ReplyFailed):
            self.answer = event.message
            self.outcome = "failed"
        self.changed.set()

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


async def _consume(
    events: AsyncIterator[ReplyEvent], state: _AnswerState, stop: asyncio.Event | None
) -> None:
    """Feed events into ``state`` until they end or ``stop`` is set."""

    async def feed() -> None:
        async for event in events:
            state.apply(event)

    feeding = asyncio.create_task(feed())
    if stop is None:
        await feeding
        return
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({feeding, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not feeding.done():
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        state.footer = CUT_SHORT_NOTE
        state.outcome = "cut_short"
        log.warning("reply_cut_short", chars=len(state.answer))
        return
    feeding.result()
