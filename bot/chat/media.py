"""Media in a conversation: voice messages become text, images and files wait for their question.

Feishu users send a picture or a file and then, in a second message, the question about it. So
an image or file sent alone is fetched, checked and prepared at once (downscaled, its text
extracted), held in the store for ``chat.attachment_hold_minutes``, and acknowledged briefly;
the sender's next question in that chat is asked with everything held for it, and the answer's
commit releases what it used. A post with text and images is asked at once.

A voice message is transcribed before it is answered, through the first route that is set up:

1. the endpoint's ``audio/transcriptions`` when :meth:`bot.config.LLMSettings.speech_model`
   names a model (the Ogg/Opus recording is sent as is);
2. the transport's own speech-to-text (:class:`SpeechToText`, Feishu's ``file_recognize``: the
   recording is decoded in-process to 16 kHz PCM, at most 60 s);
3. else the user is told that voice is not enabled, and what the owner can configure.

Limits are checked before anything is downloaded where the platform states them (a voice
message's duration), else while downloading (the size). Every refusal is a short, polite
:class:`bot.errors.MediaError` text; nothing here knows Feishu.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from bot.chat.history import fit_tokens
from bot.chat.tokens import estimate_tokens
from bot.config import Settings
from bot.errors import (
    LLMError,
    MediaError,
    MediaTooLarge,
    MediaUnavailable,
)
from bot.keyshapes import contains_key
from bot.llm.events import DrawnImage
from bot.logging import get_logger
from bot.media import audio, documents, images
from bot.store import HeldAttachment, Store
from bot.timing import Clock

log = get_logger(__name__)

MediaKind = Literal["image", "file", "audio"]

#: what an image costs in the token budget (a 2048 px image at "auto" detail, roughly)
IMAGE_TOKENS = 1100
#: Feishu's speech-to-text takes at most this much audio
FEISHU_SPEECH_MAX_S = 60.0
#: the longest transcript shown above an answer
PREFACE_CHARS = 600
#: the smallest share of the budget worth giving a file's text
_MIN_FILE_TOKENS = 50
#: more characters than one estimated token ever spans (white space aside)
_MAX_CHARS_PER_TOKEN = 16
#: the most of a file's text that is held (far more than any token budget takes)
MAX_HELD_CHARS = 2_000_000

VOICE_OFF_TEXT = (
    "Voice messages are not enabled here, so I cannot listen to this one. Please type your "
    "question. (The bot's owner can turn voice on with llm.transcription_model, a speech-to-text "
    "model of the endpoint such as whisper-1, or by granting the app Feishu's "
    "speech_to_text:speech permission.)"
)
VISION_OFF_TEXT = (
    "I cannot look at images with this model, so I did not read that one. Please describe it "
    "in words. (The bot's owner can turn images on with llm.vision: true, for a model that "
    "reads images.)"
)
SILENT_VOICE_TEXT = "I could not make out any words in your voice message. Please try again."
TRANSCRIBE_FAILED_TEXT = (
    "Sorry, I could not transcribe your voice message right now. Please try again in a minute, "
    "or type your question."
)
IMAGE_HOLD_TEXT = (
    "Got your image. What would you like to know about it? Ask in your next message "
    "(I keep it for {minutes})."
)
IMAGES_HOLD_TEXT = (
    "Got your {count} images. What would you like to know about them? Ask in your next message "
    "(I keep them for {minutes})."
)
FILE_HOLD_TEXT = (
    "Got {name}{pages} (about {tokens:,} tokens of text). What should I do with it? Ask in "
    "your next message (I keep it for {minutes})."
)


@dataclass(frozen=True)
class MediaRef:
    """A voice message, image or file a message carries, by the platform's resource key."""

    kind: MediaKind
    key: str
    name: str = ""
    duration_ms: int = 0


class MediaSource(Protocol):
    """Downloads what users send (see :class:`bot.feishu.media.FeishuMedia`)."""

    async def download(self, message_id: str, item: MediaRef, max_bytes: int) -> bytes:
        """The item's bytes; raise :class:`MediaTooLarge` over ``max_bytes`` and
        :class:`MediaUnavailable` when it cannot be had."""


class SpeechToText(Protocol):
    """The transport's own speech recognition (Feishu's ``speech_to_text``)."""

    async def recognize(self, pcm: audio.Pcm) -> str:
        """The words in at most 60 s of 16 kHz PCM; raise :class:`MediaUnavailable`."""


class ImageHost(Protocol):
    """Publishes an image so that answers can show it as ``![alt](reference)``."""

    async def publish(self, data: bytes, mime: str) -> str:
        """The reference to write in markdown; raise :class:`MediaUnavailable`."""


class MediaModel(Protocol):
    """What the reader needs of the LLM client (see :class:`bot.llm.client.LLMClient`)."""

    async def transcribe(self, audio: bytes, *, file_name: str, model: str, user_id: str) -> str:
        """The text of a recording."""

    async def draw(self, prompt: str, *, model: str, user_id: str) -> DrawnImage:
        """An image drawn for ``prompt``."""


@dataclass(frozen=True)
class MediaOptions:
    """The settings that decide what the bot does with media."""

    vision: bool = False
    transcription_model: str | None = None
    image_model: str = ""
    hold_s: float = 600.0
    max_bytes: int = 10 * 1024 * 1024
    max_voice_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> MediaOptions:
        """The options ``settings`` give."""
        return cls(
            vision=settings.llm.vision,
            transcription_model=settings.llm.speech_model(),
            image_model=settings.llm.image_model.strip(),
            hold_s=settings.chat.attachment_hold_minutes * 60,
            max_bytes=int(settings.chat.max_file_mb * 1024 * 1024),
            max_voice_s=settings.chat.max_voice_seconds,
        )


@dataclass(frozen=True)
class MediaMessage:
    """The parts of a message the reader looks at."""

    message_id: str
    user_id: str
    holder: str  # where its question comes from: the sender in this chat
    text: str
    media: tuple[MediaRef, ...]


@dataclass
class Question:
    """A question with what it comes with, ready for the prompt.

    ``prompt_text`` is what the model reads (files' text first, then the question);
    ``history_text`` what the history keeps (images as ``[image]``, files' text as the model
    read it); ``notes`` are shown under the answer.
    """

    text: str
    spoken: bool = False  # a voice message's transcript
    images: list[str] = field(default_factory=list)  # data: URLs
    files: list[tuple[str, str]] = field(default_factory=list)  # (name, text)
    release: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prompt_text: str = ""
    history_text: str = ""

    @property
    def image_tokens(self) -> int:
        """What the images cost in the token budget."""
        return IMAGE_TOKENS * len(self.images)

    async def fit(self, room_tokens: int) -> None:
        """Fit the files' text into ``room_tokens`` and build the prompt and history texts
        (counting a long file's tokens is CPU work: it is done on a worker thread)."""
        if self.files:
            await asyncio.to_thread(self._fit, room_tokens)
        else:
            self._fit(room_tokens)

    def _fit(self, room_tokens: int) -> None:
        blocks: list[str] = []
        share = room_tokens // max(1, len(self.files))
        for name, text in self.files:
            if share < _MIN_FILE_TOKENS:
                self.notes.append(f"({name} does not fit in what I can read; I left it out.)")
                continue
            # No token is shorter than this many characters but runs of white space: what lies
            # beyond cannot fit, and counting it would only cost time.
            fitted, cut = fit_tokens(text[: share * _MAX_CHARS_PER_TOKEN], share)
            cut = cut or len(text) > share * _MAX_CHARS_PER_TOKEN
            if cut:
                share_read = round(100 * len(fitted) / max(1, len(text)))
                read = f"{share_read} %" if share_read else "less than 1 %"
                self.notes.append(f"({name} is long: I read only its first {read}.)")
            blocks.append(f"(The user sent the file {name}:)\n{fitted}")
        self.prompt_text = "\n\n".join([*blocks, self.text])
        marks = " ".join(["[image]"] * len(self.images))
        self.history_text = "\n\n".join(
            [*blocks, f"{marks} {self.text}".strip() if marks else self.text]
        )


#: what answering a media message comes to: a fixed reply, or a question to ask the model
Intake = str | Question


@dataclass(frozen=True)
class _ReadFile:
    text: str
    pages: int | None
    tokens: int


class MediaReader:
    """Turns a message's media into text and attachments; holds what comes alone."""

    def __init__(
        self,
        store: Store,
        llm: MediaModel,
        options: MediaOptions,
        *,
        clock: Clock = time.time,
        secrets: Sequence[str] = (),
    ) -> None:
        self._store = store
        self._secrets = tuple(secrets)  # configured keys: a file holding one is never read
        self._llm = llm
        self.options = options
        self._clock = clock
        #: set by the transport: where media are downloaded from, and its speech recognition
        self.source: MediaSource | None = None
        self.speech: SpeechToText | None = None

    # ---- a message's media -------------------------------------------------------------------

    async def intake(self, message: MediaMessage) -> Intake | None:
        """What a message with media comes to: a reply to send (a refusal, or the note that an
        image or file is held), a :class:`Question` (a transcribed voice message, a post with
        images), or None when it has no media. Raise nothing: refusals are replies."""
        if not message.media:
            return None
        try:
            voice = next((m for m in message.media if m.kind == "audio"), None)
            if voice is not None:
                return Question(await self._transcribe(message, voice), spoken=True)
            if not message.text.strip():
                return await self._hold(message)
            question = Question(message.text)
            await self._add_images(message, question)
            return question
        except MediaError as exc:
            log.info("media_refused", message_id=message.message_id, reason=str(exc))
            return str(exc)

    async def with_held(self, holder: str, question: Question) -> Question:
        """``question`` with every attachment held for ``holder`` within the hold time."""
        for held in await self._store.held_attachments(holder, self._clock() - self.options.hold_s):
            if held.kind == "image":
                question.images.append(_data_url(held.mime, held.content))
            else:
                question.files.append((held.name, held.content.decode("utf-8", "replace")))
            question.release.append(held.attachment_id)
        return question

    async def draw(self, prompt: str, *, model: str, user_id: str) -> DrawnImage:
        """An image drawn by the endpoint for ``prompt`` (raises the LLM client's errors)."""
        return await self._llm.draw(prompt, model=model, user_id=user_id)

    # ---- voice -------------------------------------------------------------------------------

    async def _transcribe(self, message: MediaMessage, voice: MediaRef) -> str:
        limit = self.options.max_voice_s
        model = self.options.transcription_model
        speech = self.speech
        if model is None and speech is None:
            raise MediaError(VOICE_OFF_TEXT)
        if model is None:
            limit = min(limit, FEISHU_SPEECH_MAX_S)
        if voice.duration_ms > limit * 1000:
            raise MediaTooLarge(
                f"Your voice message is {voice.duration_ms / 1000:.0f} s long; I can transcribe "
                f"at most {limit:g} s. Please send a shorter one, or type your question."
            )
        recording = await self._download(message, voice)
        if model is not None:
            text = await self._transcribe_with_model(recording, model, message.user_id)
        elif speech is not None:
            pcm = await asyncio.to_thread(audio.decode_to_pcm16k, recording, max_seconds=limit)
            text = await speech.recognize(pcm)
        else:  # refused above; said again for the type checker
            raise MediaError(VOICE_OFF_TEXT)
        text = " ".join(text.split())
        if not text:
            raise MediaError(SILENT_VOICE_TEXT)
        log.info("voice_transcribed", message_id=message.message_id, chars=len(text))
        return text

    async def _transcribe_with_model(self, recording: bytes, model: str, user_id: str) -> str:
        try:
            return await self._llm.transcribe(
                recording, file_name="voice.ogg", model=model, user_id=user_id
            )
        except LLMError as exc:  # every key out, the request refused, attempts exhausted
            log.warning("voice_not_transcribed", reason=str(exc))
            raise MediaUnavailable(TRANSCRIBE_FAILED_TEXT) from None

    # ---- images and files --------------------------------------------------------------------

    async def _hold(self, message: MediaMessage) -> str:
        """Fetch and prepare what came alone, keep it for the next question; the reply."""
        minutes = _minutes(self.options.hold_s)
        files = [m for m in message.media if m.kind == "file"]
        if files:
            item = files[0]
            if not documents.is_readable_file(item.name):
                raise MediaError(
                    f"I cannot read {item.name or 'this kind of file'}: I read "
                    f"{documents.describe_readable_types()}."
                )
            data = await self._download(message, item)
            extracted = await asyncio.to_thread(self._read_file, item.name, data)
            await self._keep(message.holder, "file", item.name, "text/plain", extracted.text)
            pages = ""
            if extracted.pages is not None:
                pages = f" ({extracted.pages} page{'s' if extracted.pages != 1 else ''})"
            return FILE_HOLD_TEXT.format(
                name=item.name,
                pages=pages,
                tokens=extracted.tokens,
                minutes=minutes,
            )
        question = Question("")
        await self._add_images(message, question, hold=True)
        if len(question.images) == 1:
            return IMAGE_HOLD_TEXT.format(minutes=minutes)
        return IMAGES_HOLD_TEXT.format(count=len(question.images), minutes=minutes)

    def _read_file(self, name: str, data: bytes) -> _ReadFile:
        """On a worker thread: a file's text (at most :data:`MAX_HELD_CHARS`) and its tokens;
        a file holding something key-shaped is refused."""
        extracted = documents.extract_text(name, data)
        text = extracted.text[:MAX_HELD_CHARS]
        if contains_key(text, self._secrets):
            raise MediaError(
                f"{name} looks like it holds an API key, so I did not read it. If it is a real "
                "key, consider it exposed and replace it."
            )
        return _ReadFile(text, extracted.pages, estimate_tokens(text))

    async def _add_images(
        self, message: MediaMessage, question: Question, *, hold: bool = False
    ) -> None:
        pictures = [m for m in message.media if m.kind == "image"]
        if not pictures:
            return
        if not self.options.vision:
            if hold:
                raise MediaError(VISION_OFF_TEXT)
            question.notes.append(
                "(I cannot look at images with this model: I read only the text.)"
            )
            return
        for item in pictures:
            data = await self._download(message, item)
            prepared = await asyncio.to_thread(images.prepare_image, data)
            if hold:
                await self._keep(message.holder, "image", "image", prepared.mime, prepared.data)
            question.images.append(prepared.data_url())

    async def _keep(
        self,
        holder: str,
        kind: Literal["image", "file"],
        name: str,
        mime: str,
        content: bytes | str,
    ) -> None:
        data = content.encode("utf-8") if isinstance(content, str) else content
        now = self._clock()
        held = await self._store.held_attachments(holder, now - self.options.hold_s)
        if any(h.kind == kind and h.name == name and h.content == data for h in held):
            return  # the same message again (answered anew after a restart): hold it once
        attachment = HeldAttachment(holder, kind, name, mime, data, now)
        await self._store.hold_attachment(attachment)
        log.info("attachment_held", kind=kind, bytes=len(data))

    async def _download(self, message: MediaMessage, item: MediaRef) -> bytes:
        if self.source is None:
            raise MediaUnavailable("I cannot fetch attachments here.")
        return await self.source.download(message.message_id, item, self.options.max_bytes)


def describe_size(limit_bytes: int) -> str:
    """``10 MB`` for a limit in bytes."""
    return f"{limit_bytes / (1024 * 1024):.3g} MB"


def preface_for(transcript: str) -> str:
    """The transcript as shown above the answer: a quote, cut to :data:`PREFACE_CHARS`."""
    shown = transcript if len(transcript) <= PREFACE_CHARS else transcript[:PREFACE_CHARS] + "…"
    return "> 🎤 " + _ESCAPE_QUOTE.sub(" ", shown)


def image_markdown(reference: str, alt: str) -> str:
    """``![alt](reference)`` with an alt text that cannot break the markdown."""
    safe = " ".join(re.sub(r"[\[\]()!\n]", " ", alt).split())[:100] or "image"
    return f"![{safe}]({reference})"


def sniff_image_type(data: bytes) -> str:
    """The mime type of PNG, JPEG, WebP or GIF bytes (PNG when unsure)."""
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/png"


_ESCAPE_QUOTE = re.compile(r"\s*\n\s*")


def _minutes(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
