"""The conversation service: one message in, a stream of reply events out; knows no transport.

For each message: wait for its turn in its conversation (messages of one conversation are answered
one at a time, in the order :meth:`ConversationService.handle` was called, each only after the
previous reply was committed or closed; conversations run concurrently), read its media
(:mod:`bot.chat.media`: a voice message becomes its transcript, images and files sent alone are
held for the next question), run a command (``/draw`` draws and publishes an image) or load the
newest history that fits the token budget, build the prompt (with the images and files' text
the question comes with), and stream the LLM's answer. The exchange is saved by
:meth:`Reply.commit` once the transport delivered it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from structlog.stdlib import BoundLogger

from bot.chat.access import AccessControl, day_of
from bot.chat.commands import Command, CommandName, help_text, parse_command, unknown_command_text
from bot.chat.conversation_commands import Asker, ConversationCommands
from bot.chat.history import build_prompt, fit_tokens, with_quote
from bot.chat.key_commands import GROUP_KEY_TEXT, KeyCommands
from bot.chat.media import (
    ImageHost,
    MediaMessage,
    MediaReader,
    MediaRef,
    Question,
    image_markdown,
    preface_for,
    sniff_image_type,
)
from bot.chat.ordering import ConversationQueue, Place
from bot.chat.pacing import ModelRequestsFirst, Preparing
from bot.chat.personas import Persona, PersonaBook
from bot.chat.replies import (
    AnswerInfo,
    Exchange,
    Reply,
    ReplyDelta,
    ReplyEvent,
    ReplyFailed,
    ReplyFinished,
    ReplyNotice,
    ReplyPreface,
)
from bot.chat.tokens import estimate_message_tokens, estimate_tokens
from bot.config import AccessSettings, ChatSettings
from bot.errors import (
    AllKeysUnavailable,
    LLMError,
    MediaUnavailable,
    ReplyInterrupted,
    RequestRejected,
)
from bot.keyshapes import is_key_message
from bot.llm.events import (
    ChatMessage,
    Completed,
    RequestSent,
    StreamEvent,
    TextDelta,
    TokenUsage,
)
from bot.logging import contains_api_key, get_logger
from bot.store import Store, Turn, TurnStatus, UsageRecord
from bot.timing import Clock

log = get_logger(__name__)


KEY_IN_MESSAGE_TEXT = (
    "That message contains something that looks like an API key, so I did not send it to the "
    "model and did not keep it. To share a key with the bot, send just the key to me in a "
    "private chat (or /key add <key>); consider the key exposed if others can read this chat."
)


#: the smallest share of the token budget worth giving a quoted message
_MIN_QUOTE_TOKENS = 20


@dataclass(frozen=True)
class IncomingMessage:
    """A message to answer, already stripped of transport details.

    ``user_ids`` are other ids of the same user that access lists may name (Feishu's user_id);
    ``chat_id`` picks a group's default persona; ``quoted_message_id`` is the message this one
    replies to, read through :attr:`ConversationService.quotes`, unless ``quoted_is_root`` says
    it is the message the conversation started from and the history still holds it.
    """

    conversation_id: str
    user_id: str
    text: str
    message_id: str
    in_group: bool = False
    chat_id: str = ""
    user_ids: tuple[str, ...] = ()
    quoted_message_id: str = ""
    quoted_is_root: bool = False
    media: tuple[MediaRef, ...] = ()

    @property
    def holder(self) -> str:
        """Where attachments sent alone wait for this sender's question: the sender in this
        chat (in a group, whatever thread the question comes in)."""
        return f"{self.chat_id}|{self.user_id}" if self.chat_id else self.conversation_id


class QuoteUnavailable(Exception):
    """A quoted message could not be read; the text says so politely, to show the user."""


class QuoteSource(Protocol):
    """Reads the text of a message a user quoted (see :mod:`bot.feishu.quotes`)."""

    async def quoted_text(self, message_id: str) -> str:
        """The message's text ("" when it has none); raise :class:`QuoteUnavailable`."""


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
        models: Sequence[str] = (),
        keys: KeyCommands | None = None,
        secrets: Sequence[str] = (),
        access: AccessControl | None = None,
        donations: bool = True,
        media: MediaReader | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._secrets = tuple(secrets)  # the app secret and configured keys: never a prompt
        self._llm = llm
        self._settings = settings
        self._clock = clock
        self._model = model
        self._donations = donations
        self._queue = ConversationQueue()
        self.access = access or AccessControl(AccessSettings(), store, clock=clock)
        self.personas = PersonaBook(settings, store)
        self.commands = ConversationCommands(
            store,
            self.personas,
            [*([model] if model else []), *models],
            self.access,
            history_budget=settings.max_history_tokens,
            clock=clock,
        )
        #: where quoted messages are read from; set by the transport (None: quotes ignored)
        self.quotes: QuoteSource | None = None
        #: voice, images and files (None: the transport sends text only)
        self.media = media
        #: where drawn images are published; set by the transport (None: /draw is refused)
        self.images: ImageHost | None = None
        #: the answers preparing a model request right now (a transport's cards may wait)
        self.requests_first = ModelRequestsFirst()

    def help_for(self, user_ids: Sequence[str]) -> str:
        """The help as this user should see it (admin commands only for admins)."""
        return help_text(
            admin=self.access.is_admin(user_ids),
            donations=self._donations,
            drawing=self._draw_model is not None and self.images is not None,
            media=self.media is not None and self.media.source is not None,
        )

    @property
    def _draw_model(self) -> str | None:
        if self.media is None or not self.media.options.image_model:
            return None
        return self.media.options.image_model

    def handle(self, message: IncomingMessage) -> Reply:
        """Queue ``message`` in its conversation and return its reply events."""
        place = self._queue.take_place(message.conversation_id)
        # Preparing from now, unless an earlier message of the conversation goes first.
        preparing = None if place.waiting else self.requests_first.preparing()
        reply = Reply(self._answer(message, place, preparing), place, self._store)
        if preparing is not None:
            reply.on_close(preparing.done)
        return reply

    async def _answer(
        self, message: IncomingMessage, place: Place, preparing: Preparing | None
    ) -> AsyncIterator[ReplyEvent]:
        await place.wait()
        preparing = preparing or self.requests_first.preparing()
        try:
            async for event in self._respond(message, preparing):
                yield event
        finally:
            preparing.done()

    async def _respond(
        self, message: IncomingMessage, preparing: Preparing
    ) -> AsyncIterator[ReplyEvent]:
        """The reply events; ``preparing`` is done once the model request goes out."""
        bound = log.bind(conversation=message.conversation_id, message_id=message.message_id)
        asker = Asker(message.conversation_id, message.chat_id, message.user_id, message.user_ids)
        text = message.text.strip()
        question: Question | None = None
        quota_checked = False
        if any(item.kind == "audio" for item in message.media):
            # A transcription costs as much as a question: not for a user over the quota.
            refusal = await self.access.quota_exceeded(message.user_id, message.user_ids)
            if refusal is not None:
                bound.info("quota_reached")
                yield ReplyFailed(refusal, reason="quota")
                return
            quota_checked = True
        if message.media and self.media is not None:
            intake = await self.media.intake(
                MediaMessage(
                    message.message_id, message.user_id, message.holder, text, message.media
                )
            )
            if isinstance(intake, str):
                yield ReplyFinished(intake)
                return
            if intake is not None:
                question = intake
                if question.spoken:
                    yield ReplyPreface(preface_for(question.text))
                text = question.text
        if not text:
            yield ReplyFinished(self.help_for(asker.all_ids))
            return
        command = parse_command(text)
        if command is not None and command.name in (CommandName.KEY, CommandName.KEYS):
            if self._keys is None:
                yield ReplyFinished("The key pool cannot be managed from here.")
            else:
                yield ReplyFinished(
                    await self._keys.run(
                        command,
                        user_id=message.user_id,
                        in_group=message.in_group,
                        admin=self.access.is_admin(asker.all_ids),
                    )
                )
            return
        secret = is_key_message(text)
        if secret is not None and self._keys is not None:
            # A donation: never a prompt, never history (the reply carries no exchange).
            yield ReplyFinished(
                await self._keys.donate(secret, user_id=message.user_id, in_group=message.in_group)
            )
            return
        if contains_api_key(text, self._secrets):
            # Never send a key to the model or keep it in history.
            bound.warning("api_key_in_message_refused")
            yield ReplyFinished(GROUP_KEY_TEXT if message.in_group else KEY_IN_MESSAGE_TEXT)
            return
        limit = self._settings.max_input_chars
        if len(text) > limit:
            yield ReplyFailed(
                f"Your message is too long for me: {len(text):,} characters, and I take at most "
                f"{limit:,}. Please shorten it or split it into parts.",
                reason="input_too_long",
            )
            return
        if command is not None and command.name is CommandName.DRAW:
            async for event in self._draw(message, command.argument, bound):
                yield event
            return
        if command is not None:
            yield ReplyFinished(await self._run_command(command, asker, bound))
            return
        refusal = None
        if not quota_checked:
            refusal = await self.access.quota_exceeded(message.user_id, message.user_ids)
        if refusal is not None:
            bound.info("quota_reached")
            yield ReplyFailed(refusal, reason="quota")
            return
        question = question or Question(text)
        if self.media is not None:
            question = await self.media.with_held(message.holder, question)
        persona = await self.personas.current(message.conversation_id, message.chat_id)
        model = await self.commands.chosen_model(message.user_id) or persona.model or self._model
        fixed = estimate_message_tokens(persona.system)
        if fixed + estimate_message_tokens(text) > self._settings.max_history_tokens:
            yield ReplyFailed(
                f"Your message is too long for me (about {estimate_tokens(text)} tokens; "
                f"I can take about {self._settings.max_history_tokens - fixed}). "
                "Please shorten it or split it into parts.",
                reason="input_too_long",
            )
            return
        history = await self._load_history(message.conversation_id)
        quote, quote_note = "", ""
        if message.quoted_message_id and self.quotes is not None:
            quote, quote_note = await self._quote(message, text, persona, history, bound)
        budget = self._settings.max_history_tokens
        room = budget - fixed - estimate_message_tokens(text) - estimate_tokens(quote)
        await question.fit((room - question.image_tokens) // 2)  # leave room for history
        current, remembered = question.prompt_text, question.history_text
        if quote:
            current, remembered = with_quote(quote, current), with_quote(quote, remembered)
        note = _joined(quote_note, *question.notes) or ""
        for attempt in range(2):
            prompt = build_prompt(
                persona.system,
                history,
                current,
                budget - question.image_tokens,
                examples=persona.examples,
                images=question.images,
            )
            try:
                async for event in self._stream(
                    message,
                    prompt,
                    bound,
                    preparing,
                    model=model,
                    persona=persona,
                    note=note,
                    remembered=remembered,
                    release=tuple(question.release),
                ):
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

    async def _run_command(self, command: Command, asker: Asker, bound: BoundLogger) -> str:
        name = command.name
        if name is CommandName.RESET:
            removed = await self._store.clear_conversation(asker.conversation_id)
            bound.info("conversation_reset", turns=removed)
            return "Done: I forgot our conversation. What shall we talk about?"
        if name is CommandName.HELP:
            return self.help_for(asker.all_ids)
        if name is CommandName.ROLE:
            return await self.commands.role(asker, command.argument)
        if name is CommandName.MODEL:
            return await self.commands.model(asker, command.argument)
        if name is CommandName.HISTORY:
            return await self.commands.history(asker)
        if name is CommandName.USAGE:
            return await self.commands.usage(asker)
        return unknown_command_text(command.word, self.help_for(asker.all_ids))

    async def _quote(
        self,
        message: IncomingMessage,
        text: str,
        persona: Persona,
        history: Sequence[Turn],
        bound: BoundLogger,
    ) -> tuple[str, str]:
        """The quoted text to give the model (fitted into the budget), and a note for the user
        when it could not be given whole (shown under the answer)."""
        assert self.quotes is not None
        if message.quoted_is_root and history:
            return "", ""  # the thread's first message: the history starts with it
        try:
            quote = (await self.quotes.quoted_text(message.quoted_message_id)).strip()
        except QuoteUnavailable as exc:
            bound.warning("quote_unavailable", quoted=message.quoted_message_id, reason=str(exc))
            return "", str(exc)
        if not quote:
            return "", "(The message you replied to has no text I can read; I answer without it.)"
        if is_key_message(quote) is not None or contains_api_key(quote, self._secrets):
            bound.warning("quote_with_api_key_skipped", quoted=message.quoted_message_id)
            return "", (
                "(The message you replied to looks like it holds an API key, so I did not read it.)"
            )
        if any(turn.content.strip() == quote for turn in history):
            return "", ""  # the model sees it in the history anyway
        fixed = estimate_message_tokens(persona.system) + estimate_message_tokens(text)
        room = (self._settings.max_history_tokens - fixed) // 2  # leave room for history
        if room < _MIN_QUOTE_TOKENS:
            return "", "(The message you replied to does not fit in what I can read; ignored.)"
        quote, cut = fit_tokens(quote, room)
        bound.info("quote_included", quoted=message.quoted_message_id, cut=cut)
        note = "(The message you replied to is long: I read only its beginning.)" if cut else ""
        return quote, note

    async def _stream(
        self,
        message: IncomingMessage,
        prompt: list[ChatMessage],
        bound: BoundLogger,
        preparing: Preparing,
        *,
        model: str | None,
        persona: Persona,
        note: str = "",
        remembered: str,
        release: tuple[int, ...] = (),
    ) -> AsyncIterator[ReplyEvent]:
        """Stream the answer; ``note`` is shown under it, before any note of how it ended.
        ``remembered`` is the question as the history keeps it; the answer's commit releases
        the held attachments ``release``; ``preparing`` is done as the request goes out."""
        answer = ""
        key_id = ""
        stream = self._llm.stream(
            prompt, user_id=message.user_id, model=model, temperature=persona.temperature
        )
        try:
            async for event in stream:
                if isinstance(event, RequestSent):
                    preparing.done()
                elif isinstance(event, TextDelta):
                    answer += event.text
                    yield ReplyDelta(event.text)
                elif isinstance(event, Completed):
                    key_id = event.key_id
                    usage = event.usage or _estimate_usage(prompt, answer)
                    if self._keys is not None:
                        self._keys.count_tokens(key_id, usage)
                    end_note = _joined(note, _finish_note(event.finish_reason, answer))
                    complete = event.finish_reason not in _STOPPED_EARLY
                    yield ReplyFinished(
                        answer,
                        note=end_note,
                        complete=complete,
                        exchange=self._exchange(
                            message, remembered, answer, usage, key_id, complete, release
                        ),
                        info=AnswerInfo(model or "", key_id, event.usage),
                    )
                else:
                    yield ReplyNotice(
                        "All API keys are busy right now; your answer starts in about "
                        f"{max(1, round(event.seconds))} s."
                    )
        except ReplyInterrupted as exc:
            partial = str(exc) or answer
            bound.warning("reply_interrupted", chars=len(partial))
            yield ReplyFinished(
                partial,
                note=_joined(
                    note,
                    "(The answer was cut off: the connection to the model broke. "
                    "Ask me to continue.)",
                ),
                complete=False,
                exchange=self._exchange(
                    message,
                    remembered,
                    partial,
                    _estimate_usage(prompt, partial),
                    key_id,
                    False,
                    release,
                ),
                info=AnswerInfo(model or "", key_id),
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

    async def _draw(
        self, message: IncomingMessage, prompt: str, bound: BoundLogger
    ) -> AsyncIterator[ReplyEvent]:
        """``/draw``: draw an image with the endpoint, publish it, show it with its prompt."""
        model = self._draw_model
        if model is None or self.media is None:
            yield ReplyFinished(DRAW_OFF_TEXT)
            return
        if not prompt:
            yield ReplyFinished("Tell me what to draw, for example: /draw a lighthouse at dawn")
            return
        if self.images is None:
            yield ReplyFinished("I cannot show images here, so I cannot draw.")
            return
        for refusal in (
            await self.access.quota_exceeded(message.user_id, message.user_ids),
            await self.access.images_exceeded(message.user_id, message.user_ids),
        ):
            if refusal is not None:
                bound.info("quota_reached", what="images")
                yield ReplyFailed(refusal, reason="quota")
                return
        yield ReplyNotice("Drawing… this takes a little while.")
        try:
            drawn = await self.media.draw(prompt, model=model, user_id=message.user_id)
        except RequestRejected as exc:
            bound.warning("draw_rejected", reason=str(exc))
            yield ReplyFailed(DRAW_REFUSED_TEXT, reason=str(exc))
            return
        except AllKeysUnavailable as exc:
            yield ReplyFailed(_no_key_text(str(exc)), reason=str(exc))
            return
        except LLMError as exc:
            bound.warning("draw_failed", reason=str(exc))
            yield ReplyFailed(DRAW_FAILED_TEXT, reason=str(exc))
            return
        try:
            reference = await self.images.publish(drawn.data, sniff_image_type(drawn.data))
        except MediaUnavailable as exc:
            bound.warning("drawing_not_published", reason=str(exc))
            yield ReplyFailed(f"I drew it, but could not show it to you: {exc}", reason=str(exc))
            return
        bound.info("image_drawn", bytes=len(drawn.data))
        usage = UsageRecord(day_of(self._clock()), message.user_id, drawn.key_id, 0, 0, images=1)
        yield ReplyFinished(
            f"{image_markdown(reference, prompt)}\n\n_{_one_line(prompt)}_",
            exchange=Exchange(usage=usage),
        )

    async def _load_history(self, conversation_id: str) -> list[Turn]:
        budget = self._settings.max_history_tokens
        turns = await self._store.load_recent_turns(conversation_id, budget)
        idle_minutes = self._settings.idle_reset_minutes
        if turns and idle_minutes and self._clock() - turns[-1].created_at > idle_minutes * 60:
            await self._store.clear_conversation(conversation_id)
            log.info("conversation_idle_reset", conversation=conversation_id)
            return []
        return turns

    def _exchange(
        self,
        message: IncomingMessage,
        question: str,
        answer: str,
        usage: TokenUsage,
        key_id: str,
        complete: bool,
        release: tuple[int, ...] = (),
    ) -> Exchange:
        """The turns, usage and used attachments to save once the answer was delivered."""
        now = self._clock()
        turns = [Turn(message.conversation_id, "user", question, now, _tokens(question))]
        if answer:
            status: TurnStatus = "complete" if complete else "cut"
            turns.append(
                Turn(message.conversation_id, "assistant", answer, now, _tokens(answer), status)
            )
        record = UsageRecord(
            day_of(now), message.user_id, key_id, usage.prompt_tokens, usage.completion_tokens
        )
        return Exchange(tuple(turns), record if key_id else None, release)


#: finish reasons after which the answer is not the whole answer
_STOPPED_EARLY = frozenset({"length", "content_filter"})


DRAW_OFF_TEXT = "Drawing is turned off here (the bot's owner can set llm.image_model)."
DRAW_REFUSED_TEXT = (
    "The image service refused to draw this (its safety rules, most likely). "
    "Try describing it differently."
)
DRAW_FAILED_TEXT = "Sorry, I could not draw that right now. Please try again in a minute."


def _one_line(text: str) -> str:
    """``text`` on one line, safe inside ``_…_`` emphasis."""
    return " ".join(text.replace("_", " ").split())


def _joined(*notes: str | None) -> str | None:
    """Notes shown under an answer, one per line (None when there is none)."""
    return "\n".join(note for note in notes if note) or None


def _finish_note(finish_reason: str | None, answer: str) -> str | None:
    if finish_reason == "length":
        return "(The answer reached the model's length limit. Ask me to continue.)"
    if finish_reason == "content_filter":
        return "(The provider's content filter stopped this answer.)"
    if not answer:
        return "(The model returned an empty answer.)"
    return None


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
