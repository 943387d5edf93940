"""What the conversation service answers with: reply events and the :class:`Reply` carrying them.

A reply is a stream of events (text as it comes, notices, then one final event). Nothing is
saved while it streams: the transport delivers the answer and then calls :meth:`Reply.commit`,
which saves the exchange and clears the message from the inbox in one store transaction. So an
answer that was never delivered leaves no trace in the history, and a delivered one is never
saved twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from bot.chat.ordering import Place
from bot.config import FooterMode
from bot.llm.events import TokenUsage
from bot.store import SentMessage, Store, Turn, UsageRecord


@dataclass(frozen=True)
class ReplyDelta:
    """More text of the answer."""

    text: str


@dataclass(frozen=True)
class ReplyNotice:
    """Something the user should see while waiting (shown beside the answer, not part of it)."""

    text: str


@dataclass(frozen=True)
class ReplyPreface:
    """Markdown shown above the answer (a voice message's transcript), not part of it."""

    text: str


@dataclass(frozen=True)
class Exchange:
    """What a delivered reply adds to the store: history turns, the usage it cost, and the
    held attachments it used (``release``: their ids, dropped with the answer)."""

    turns: tuple[Turn, ...] = ()
    usage: UsageRecord | None = None
    release: tuple[int, ...] = ()


@dataclass(frozen=True)
class AnswerInfo:
    """How the model produced an answer, for the footer under it (see :func:`footer_text`).

    ``usage`` is what the provider reported, None when it did not (an estimate is never shown).
    """

    model: str
    key_id: str
    usage: TokenUsage | None = None


@dataclass(frozen=True)
class ReplyFinished:
    """The reply is over. ``text`` is the whole answer; ``note`` is shown after it.

    ``complete`` is False when the answer stopped early (then ``note`` says why). ``exchange``
    is saved once the reply was delivered. ``info`` is set only for an answer of the model (not
    for command replies and other fixed texts): a transport may show it as a footer.
    """

    text: str
    note: str | None = None
    complete: bool = True
    exchange: Exchange = Exchange()
    info: AnswerInfo | None = None


def footer_text(info: AnswerInfo, mode: FooterMode, elapsed_s: float) -> str:
    """The footer line of an answer: ``gpt-4o-mini · 3.2 s`` (``short``); ``full`` adds the
    reported tokens and the key id: ``… · 812 tokens (640 in, 172 out) · key 1a2b3c4d5e6f``.
    Empty for ``off``."""
    if mode == "off":
        return ""
    parts = [info.model] if info.model else []
    parts.append(f"{max(0.0, elapsed_s):.1f} s")
    if mode == "full":
        usage = info.usage
        if usage is not None:
            total = usage.prompt_tokens + usage.completion_tokens
            parts.append(
                f"{total:,} tokens ({usage.prompt_tokens:,} in, {usage.completion_tokens:,} out)"
            )
        if info.key_id:
            parts.append(f"key {info.key_id}")
    return " · ".join(parts)


@dataclass(frozen=True)
class ReplyFailed:
    """No answer could be produced; ``message`` is short, polite and safe to show."""

    message: str
    reason: str


ReplyEvent = ReplyDelta | ReplyNotice | ReplyPreface | ReplyFinished | ReplyFailed


class Reply:
    """The reply events to one message; iterate them, then :meth:`commit` or :meth:`aclose`.

    Its place in the conversation's queue is taken when it is created, so replies are ordered by
    arrival even if their consumers start late; the next message of the conversation waits until
    this reply is committed or closed.
    """

    def __init__(self, events: AsyncIterator[ReplyEvent], place: Place, store: Store) -> None:
        self._events = events
        self._place = place
        self._store = store
        self._on_close: list[Callable[[], None]] = []
        self.final: ReplyFinished | ReplyFailed | None = None

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the reply is closed (committed or not), even if it never
        started."""
        self._on_close.append(callback)

    @property
    def queued(self) -> bool:
        """Whether the reply still waits for an earlier message of its conversation."""
        return self._place.waiting

    def __aiter__(self) -> Reply:
        return self

    async def __anext__(self) -> ReplyEvent:
        event = await self._events.__anext__()
        if isinstance(event, ReplyFinished | ReplyFailed):
            self.final = event
        return event

    async def commit(self, message_ids: Sequence[str] = (), sent_ids: Sequence[str] = ()) -> None:
        """The reply was delivered: save its exchange and clear ``message_ids`` from the inbox
        (one transaction), then let the conversation's next message go.

        ``sent_ids`` are the transport's ids of the messages that carry the answer: each is
        recorded with the answer's text, so a user quoting one of them is understood.
        """
        try:
            exchange = self.final.exchange if isinstance(self.final, ReplyFinished) else Exchange()
            answer = next((t for t in reversed(exchange.turns) if t.role == "assistant"), None)
            sent: list[SentMessage] = []
            if answer is not None:
                sent = [
                    SentMessage(each, answer.conversation_id, answer.content, answer.created_at)
                    for each in sent_ids
                ]
            if exchange.turns or exchange.usage is not None or message_ids or exchange.release:
                await self._store.complete_message(
                    message_ids, exchange.turns, exchange.usage, sent, exchange.release
                )
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop (cancels an LLM request still running), save nothing, free the conversation."""
        try:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._place.finish()
            for callback in self._on_close:
                callback()
