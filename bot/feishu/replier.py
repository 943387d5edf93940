"""Streaming a reply into a Feishu card with the SDK's CardKit markdown controller.

``FeishuChannel.stream`` builds its ``MarkdownStreamController`` with a fixed 100 ms throttle and
opens the card only when the first text arrives (three round trips later the user sees it). We
build the same controller from the channel's public CardKit methods instead, so that:

- the card ("Thinking…") is created and sent as soon as the message is accepted, while the LLM
  works, and the first token then costs one round trip;
- updates are coalesced to at most one per ``chat.stream_update_ms`` (default 300 ms), sending
  the cumulative text (the controller's ``append`` merges overlaps and can drop characters);
- the card is always closed: at the end, on failure (with a short apology), and when shutdown
  cuts an answer short (with a note), never left spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lark_oapi.channel.outbound.streaming.markdown_stream import MarkdownStreamController

from bot.chat.service import ReplyDelta, ReplyEvent, ReplyFailed, ReplyFinished, ReplyNotice
from bot.logging import get_logger

log = get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]

THINKING = "_Thinking…_"
CUT_SHORT_NOTE = "_(The bot is restarting, so this answer was cut short. Please ask again.)_"


class _ReplyCard(MarkdownStreamController):  # type: ignore[misc]
    """The SDK's controller, plus opening the card before any text exists."""

    async def open(self) -> None:
        """Create the card and send it as the reply (idempotent)."""
        await self._ensure_started()


@dataclass
class StreamedReply:
    """How a reply went: the text the card ended with and the message that shows it."""

    text: str
    message_id: str
    outcome: str


class CardReplier:
    """Streams one reply's events into one card, replying to the user's message."""

    def __init__(
        self,
        channel: Any,
        *,
        update_interval_s: float,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._channel = channel
        self._interval = update_interval_s
        self._sleep = sleep

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
        """Show ``events`` in a card replying to ``reply_to``; return the final text.

        ``stop`` set while the answer is still coming cuts it short: what arrived is kept and
        the card says the answer was cut, then closes.
        """
        card = _ReplyCard(
            to=chat_id,
            receive_id_type="chat_id",
            reply_to=reply_to,
            reply_in_thread=in_thread or None,
            create_card_instance=self._channel.create_card_instance,
            send_card_by_reference=self._channel.send_card_by_reference,
            update_card_element_content=self._channel.update_card_element_content,
            finish_streaming_card=self._channel.finish_streaming_card,
            initial_text=prefix + THINKING,
            min_ms=0,
            min_chars=1,
        )
        state = _CardState(prefix)

        async def producer(controller: MarkdownStreamController) -> None:
            await card.open()
            pusher = asyncio.create_task(self._push_updates(card, state))
            try:
                await _consume(events, state, stop)
            finally:
                pusher.cancel()  # it may be waiting out an interval: the final text goes now
                with contextlib.suppress(asyncio.CancelledError):
                    await pusher
            await card.set_content(state.render())

        await card.run(producer)
        return StreamedReply(text=state.render(), message_id=card.message_id, outcome=state.outcome)

    async def _push_updates(self, card: _ReplyCard, state: _CardState) -> None:
        """At most one update per interval, always the latest cumulative text."""
        pushed = ""
        while True:
            await state.changed.wait()
            state.changed.clear()
            text = state.render()
            if text != pushed:
                await card.set_content(text)
                pushed = text
                await self._sleep(self._interval)


class _CardState:
    """What the card should show, built from reply events."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.answer = ""
        self.notice = ""
        self.footer = ""
        self.outcome = "pending"
        self.changed = asyncio.Event()

    def render(self) -> str:
        body = self.answer or (f"_{self.notice}_" if self.notice else "")
        if not body and not self.footer:
            body = THINKING
        parts = [part for part in (self.prefix + body, self.footer) if part]
        return "\n\n".join(parts)

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


async def _consume(
    events: AsyncIterator[ReplyEvent], state: _CardState, stop: asyncio.Event | None
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
