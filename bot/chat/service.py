"""The conversation service: one message in, a stream of reply events out; knows no transport.

For each message: wait for its turn in its conversation (messages of one conversation are answered
one at a time, in the order :meth:`ConversationService.handle` was called; conversations run
concurrently), run a command or load the history, build the prompt within the token budget, stream
the LLM's answer, and save the exchange only when the answer completed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from structlog.stdlib import BoundLogger

from bot.chat.commands import HELP_TEXT, CommandName, parse_command, unknown_command_text
from bot.chat.history import build_prompt
from bot.chat.tokens import estimate_message_tokens, estimate_tokens
from bot.config import ChatSettings
from bot.errors import AllKeysUnavailable, LLMError, ReplyInterrupted, RequestRejected
from bot.llm.events import ChatMessage, Completed, StreamEvent, TextDelta, TokenUsage
from bot.logging import contains_api_key, get_logger
from bot.store import Store, Turn

log = get_logger(__name__)

Clock = Callable[[], float]

KEY_IN_MESSAGE_TEXT = (
    "That message contains something that looks like an API key, so I did not send it to the "
    "model and did not keep it. Donating keys by chat is not available yet: please give keys "
    "to the bot's owner, and consider the key exposed if others can read this chat."
)


@dataclass(frozen=True)
class IncomingMessage:
    """A message to answer, already stripped of transport details."""

    conversation_id: str
    user_id: str
    text: str
    message_id: str


@dataclass(frozen=True)
class ReplyDelta:
    """More text of the answer."""

    text: str


@dataclass(frozen=True)
class ReplyNotice:
    """Something the user should see while waiting (shown beside the answer, not part of it)."""

    text: str


@dataclass(frozen=True)
class ReplyFinished:
    """The reply is over. ``text`` is the whole answer; ``note`` is shown after it.

    ``complete`` is False when the stream broke after some text (then ``note`` says so).
    """

    text: str
    usage: TokenUsage | None = None
    note: str | None = None
    complete: bool = True


@dataclass(frozen=True)
class ReplyFailed:
    """No answer could be produced; ``message`` is short, polite and safe to show."""

    message: str
    reason: str


ReplyEvent = ReplyDelta | ReplyNotice | ReplyFinished | ReplyFailed


class ChatModel(Protocol):
    """What the service needs of an LLM client (see :class:`bot.llm.client.LLMClient`)."""

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        user_id: str,
        model: str | None = None,
        temperature: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Stream the answer to ``messages``."""


class _Turn:
    """A message's place in its conversation's queue."""

    def __init__(self, previous: asyncio.Future[None] | None) -> None:
        self._previous = previous
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait(self) -> None:
        if self._previous is not None:
            await asyncio.shield(self._previous)

    def finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)


class Reply:
    """The reply events to one message; iterate it to the end or ``aclose()`` it.

    Its place in the conversation's queue is taken when it is created, so replies are ordered by
    arrival even if their consumers start late.
    """

    def __init__(self, events: AsyncIterator[ReplyEvent], turn: _Turn) -> None:
        self._events = events
        self._turn = turn

    def __aiter__(self) -> Reply:
        return self

    async def __anext__(self) -> ReplyEvent:
        try:
            return await self._events.__anext__()
        except BaseException:
            self._turn.finish()
            raise

    async def aclose(self) -> None:
        """Stop early (cancels the LLM request) and let the next message of the conversation go."""
        try:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._turn.finish()


class ConversationService:
    """Answers messages with multi-turn history; transport-agnostic."""

    def __init__(
        self,
        store: Store,
        llm: ChatModel,
        settings: ChatSettings,
        *,
        clock: Clock = time.time,
        model: str | None = None,
    ) -> None:
        self._store = store
        self._llm = llm
        self._settings = settings
        self._clock = clock
        self._model = model
        self._tails: dict[str, asyncio.Future[None]] = {}

    def handle(self, message: IncomingMessage) -> Reply:
        """Queue ``message`` in its conversation and return its reply events."""
        previous = self._tails.get(message.conversation_id)
        turn = _Turn(previous)
        self._tails[message.conversation_id] = turn.finished
        turn.finished.add_done_callback(
            lambda finished: self._forget_tail(message.conversation_id, finished)
        )
        return Reply(self._answer(message, turn), turn)

    def _forget_tail(self, conversation_id: str, finished: asyncio.Future[None]) -> None:
        if self._tails.get(conversation_id) is finished:
            del self._tails[conversation_id]

    async def _answer(self, message: IncomingMessage, turn: _Turn) -> AsyncIterator[ReplyEvent]:
        try:
            await turn.wait()
            async for event in self._respond(message):
                yield event
        finally:
            turn.finish()

    async def _respond(self, message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
        bound = log.bind(conversation=message.conversation_id, message_id=message.message_id)
        text = message.text.strip()
        if not text:
            yield ReplyFinished(HELP_TEXT)
            return
        if contains_api_key(text):
            # Never send a key to the model or keep it in history.
            bound.warning("api_key_in_message_refused")
            yield ReplyFinished(KEY_IN_MESSAGE_TEXT)
            return
        command = parse_command(text)
        if command is not None:
            if command.name is CommandName.RESET:
                removed = await self._store.clear_conversation(message.conversation_id)
                bound.info("conversation_reset", turns=removed)
                yield ReplyFinished("Done: I forgot our conversation. What shall we talk about?")
            elif command.name is CommandName.HELP:
                yield ReplyFinished(HELP_TEXT)
            else:
                yield ReplyFinished(unknown_command_text(command.word))
            return
        fixed = estimate_message_tokens(self._settings.system_prompt)
        if fixed + estimate_message_tokens(text) > self._settings.max_history_tokens:
            yield ReplyFailed(
                f"Your message is too long for me (about {estimate_tokens(text)} tokens; "
                f"I can take about {self._settings.max_history_tokens - fixed}). "
                "Please shorten it or split it into parts.",
                reason="input_too_long",
            )
            return
        history = await self._load_history(message.conversation_id)
        budget = self._settings.max_history_tokens
        for attempt in range(2):
            prompt = build_prompt(self._settings.system_prompt, history, text, budget)
            try:
                async for event in self._stream(message, prompt, bound):
                    yield event
                return
            except RequestRejected as exc:
                if exc.code == "context_length_exceeded" and attempt == 0 and len(prompt) > 2:
                    # Halve what was actually sent, so some history really goes.
                    budget = sum(estimate_message_tokens(m.content) for m in prompt) // 2
                    bound.info("context_trimmed_harder", budget=budget)
                    continue
                bound.warning("llm_rejected", reason=str(exc))
                yield ReplyFailed(_rejected_text(exc), reason=str(exc))
                return

    async def _stream(
        self, message: IncomingMessage, prompt: list[ChatMessage], bound: BoundLogger
    ) -> AsyncIterator[ReplyEvent]:
        answer = ""
        try:
            async for event in self._llm.stream(prompt, user_id=message.user_id, model=self._model):
                if isinstance(event, TextDelta):
                    answer += event.text
                    yield ReplyDelta(event.text)
                elif isinstance(event, Completed):
                    usage = event.usage or _estimate_usage(prompt, answer)
                    await self._save_exchange(message, answer, usage, event.key_id)
                    yield ReplyFinished(
                        answer,
                        usage=usage,
                        note=None if answer else "(The model returned an empty answer.)",
                    )
                else:
                    yield ReplyNotice(
                        "All API keys are busy right now; your answer starts in about "
                        f"{max(1, round(event.seconds))} s."
                    )
        except ReplyInterrupted as exc:
            bound.warning("reply_interrupted", chars=len(str(exc) or answer))
            yield ReplyFinished(
                str(exc) or answer,
                note="(The answer was cut off: the connection to the model broke. "
                "Ask me to continue.)",
                complete=False,
            )
        except AllKeysUnavailable as exc:
            bound.warning("reply_failed", reason=str(exc))
            yield ReplyFailed(_no_key_text(str(exc)), reason=str(exc))
        except RequestRejected:
            raise
        except LLMError as exc:
            bound.warning("reply_failed", reason=str(exc))
            yield ReplyFailed(
                "Sorry, the model is not answering right now. Please try again in a minute.",
                reason=str(exc),
            )

    async def _load_history(self, conversation_id: str) -> list[Turn]:
        turns = await self._store.load_turns(conversation_id)
        idle_minutes = self._settings.idle_reset_minutes
        if turns and idle_minutes and self._clock() - turns[-1].created_at > idle_minutes * 60:
            await self._store.clear_conversation(conversation_id)
            log.info("conversation_idle_reset", conversation=conversation_id, turns=len(turns))
            return []
        return turns

    async def _save_exchange(
        self, message: IncomingMessage, answer: str, usage: TokenUsage, key_id: str
    ) -> None:
        now = self._clock()
        user_turn = Turn(
            message.conversation_id, "user", message.text.strip(), now, _tokens(message.text)
        )
        await self._store.append_turn(user_turn)
        if answer:
            await self._store.append_turn(
                Turn(message.conversation_id, "assistant", answer, now, _tokens(answer))
            )
        day = datetime.fromtimestamp(now).strftime("%Y-%m-%d")
        await self._store.add_usage(
            day, message.user_id, key_id, usage.prompt_tokens, usage.completion_tokens
        )


def _tokens(text: str) -> int:
    return estimate_message_tokens(text.strip())


def _estimate_usage(prompt: Sequence[ChatMessage], answer: str) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=sum(estimate_message_tokens(message.content) for message in prompt),
        completion_tokens=estimate_tokens(answer),
    )


def _no_key_text(reason: str) -> str:
    if "no API key" in reason:
        return (
            "I have no API key yet, so I cannot answer. The bot's owner can add one under "
            "llm.keys in settings.yaml or in the OPENAI_API_KEYS environment variable."
        )
    if "rate limited" in reason:
        return "All API keys are rate limited right now. Please try again in a minute."
    return "All API keys are out of service right now. Please tell the bot's owner."


def _rejected_text(exc: RequestRejected) -> str:
    if exc.code == "context_length_exceeded":
        return "Our conversation is too long for the model. Send /reset to start afresh."
    return "Sorry, the model refused this request. Try rephrasing it, or send /reset."
