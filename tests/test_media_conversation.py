"""Voice, images, files and /draw through the conversation service.

The real openai SDK against the fake LLM (chat, transcriptions, image generations) and the
bot's Feishu media client (downloads, speech-to-text, uploads) against the fake Feishu; the
media are real Ogg/Opus, PNG and PDF bytes made by the tests.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.chat.media import (
    FILE_HOLD_TEXT,
    IMAGE_HOLD_TEXT,
    MAX_HELD_CHARS,
    SILENT_VOICE_TEXT,
    TRANSCRIBE_FAILED_TEXT,
    VISION_OFF_TEXT,
    VOICE_OFF_TEXT,
    MediaRef,
)
from bot.chat.replies import ReplyPreface
from bot.chat.service import DRAW_FAILED_TEXT, DRAW_OFF_TEXT, DRAW_REFUSED_TEXT
from bot.feishu.media import FeishuMedia
from tests.chat_harness import KEY_A, KEY_B, Answer, ChatHarness, FakeTime, make_settings
from tests.fakes.feishu_server import FakeFeishuThread
from tests.fakes.openai_server import (
    CHAT_PATH,
    FAKE_IMAGE_PNG,
    IMAGES_PATH,
    TRANSCRIPTIONS_PATH,
    FakeOpenAI,
    RequestRecord,
    content_policy_violation,
    rate_limit_exceeded,
    server_error,
)
from tests.feishu_clients import feishu_api, running_fake_feishu
from tests.media_fixtures import make_ogg_opus, make_pdf, make_png

USER = "ou_media_user"
CHAT = "oc_media_chat"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
def feishu() -> Iterator[FakeFeishuThread]:
    with running_fake_feishu("media") as running:
        yield running


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


class Bot:
    """A conversation core with the Feishu media client, and helpers to send media."""

    def __init__(self, harness: ChatHarness, feishu: FakeFeishuThread) -> None:
        self.harness = harness
        self.feishu = feishu
        self._count = 0

    @property
    def store(self) -> Any:
        return self.harness.store

    async def send(
        self, *media: MediaRef, text: str = "", user: str = USER, chat: str = CHAT
    ) -> Answer:
        return await self.harness.ask(
            text, conversation=f"p2p:{user}", user=user, chat_id=chat, media=media
        )

    def resource(self, data: bytes, *, kind: str = "file", name: str = "") -> MediaRef:
        self._count += 1
        key = f"{'img' if kind == 'image' else 'file'}_v3_media_{self._count}"
        self.feishu.fake.add_resource(key, data, kind="image" if kind == "image" else "file")
        return MediaRef(kind, key, name)  # type: ignore[arg-type]

    def voice(self, seconds: float = 1.0, *, duration_ms: int | None = None) -> MediaRef:
        ref = self.resource(make_ogg_opus(seconds), kind="audio")
        ms = int(seconds * 1000) if duration_ms is None else duration_ms
        return MediaRef("audio", ref.key, duration_ms=ms)


@pytest.fixture
async def start(
    fake: FakeOpenAI, feishu: FakeFeishuThread, tmp_path: Path, time: FakeTime
) -> AsyncIterator[Any]:
    harnesses: list[ChatHarness] = []
    async with feishu_api(feishu) as api:

        async def start(*keys: str, **sections: Any) -> Bot:
            settings = make_settings(fake.base_url, list(keys) or [KEY_A], **sections)
            harness = await ChatHarness(settings, tmp_path / "bot.db", time).start()
            harnesses.append(harness)
            media = FeishuMedia(api)
            assert harness.service.media is not None
            harness.service.media.source = media
            harness.service.media.speech = media
            harness.service.images = media
            return Bot(harness, feishu)

        yield start
        for harness in harnesses:
            await harness.close()


def chat_requests(fake: FakeOpenAI) -> list[RequestRecord]:
    return [r for r in fake.requests if r.path == CHAT_PATH]


def user_parts(request: RequestRecord) -> Any:
    return request.messages[-1]["content"]


def image_of(part: dict[str, Any]) -> Image.Image:
    url = part["image_url"]["url"]
    header, data = url.split(",", 1)
    assert header.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(data)))


# ---- voice ----------------------------------------------------------------------------------


async def test_a_voice_message_is_transcribed_by_the_endpoint_and_answered(
    start: Any, fake: FakeOpenAI
) -> None:
    fake.transcript = "what is the capital of France"
    bot = await start(llm={"transcription_model": "whisper-1"})
    answer = await bot.send(bot.voice(2.0))

    (transcription,) = [r for r in fake.requests if r.path == TRANSCRIPTIONS_PATH]
    assert transcription.form["model"] == "whisper-1"
    upload = transcription.files["file"]
    assert upload.data.startswith(b"OggS")  # Feishu's Ogg/Opus sent as it is
    assert upload.filename == "voice.ogg"
    assert isinstance(answer.events[0], ReplyPreface)
    assert answer.events[0].text == "> 🎤 what is the capital of France"
    assert answer.text == "echo: what is the capital of France"
    turns = await bot.store.load_turns(f"p2p:{USER}")
    assert [t.content for t in turns] == [
        "what is the capital of France",
        "echo: what is the capital of France",
    ]


async def test_without_a_transcription_model_feishus_speech_to_text_gets_16k_pcm(
    start: Any, fake: FakeOpenAI, feishu: FakeFeishuThread
) -> None:
    feishu.fake.speech_text = "  tell me a joke "
    bot = await start(llm={"transcription_model": ""})
    answer = await bot.send(bot.voice(3.0))

    (speech,) = feishu.fake.speech_requests
    assert (speech.format, speech.engine_type) == ("pcm", "16k_auto")
    assert len(speech.file_id) == 16
    assert speech.seconds == pytest.approx(3.0, abs=0.15)
    assert [r.path for r in fake.requests] == [CHAT_PATH]
    assert answer.text == "echo: tell me a joke"
    first, *_ = await bot.store.load_turns(f"p2p:{USER}")
    assert first.content == "tell me a joke"


async def test_a_voice_message_over_the_limit_is_refused_before_any_download(
    start: Any, feishu: FakeFeishuThread, fake: FakeOpenAI
) -> None:
    bot = await start(llm={"transcription_model": "whisper-1"}, chat={"max_voice_seconds": 30})
    since = feishu.fake.mark()
    answer = await bot.send(bot.voice(1.0, duration_ms=45_000))
    assert answer.text.startswith("Your voice message is 45 s long; I can transcribe at most 30 s.")
    assert feishu.fake.calls_to("message_resource", since=since) == []
    assert fake.requests == []


async def test_feishus_speech_to_text_takes_at_most_60_seconds(
    start: Any, feishu: FakeFeishuThread
) -> None:
    bot = await start(llm={"transcription_model": ""}, chat={"max_voice_seconds": 300})
    answer = await bot.send(bot.voice(1.0, duration_ms=90_000))
    assert "at most 60 s" in answer.text
    assert feishu.fake.speech_requests == []


async def test_voice_is_refused_politely_when_no_route_can_transcribe(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start(llm={"transcription_model": ""})
    assert bot.harness.service.media is not None
    bot.harness.service.media.speech = None  # a transport without speech-to-text
    answer = await bot.send(bot.voice())
    assert answer.text == VOICE_OFF_TEXT
    assert fake.requests == []


async def test_a_failing_transcription_endpoint_gets_an_apology_and_keeps_no_history(
    start: Any, fake: FakeOpenAI
) -> None:
    for _ in range(4):
        fake.script(KEY_A).enqueue(server_error(), path=TRANSCRIPTIONS_PATH)
    bot = await start(llm={"transcription_model": "whisper-1"})
    answer = await bot.send(bot.voice())
    assert answer.text == TRANSCRIBE_FAILED_TEXT
    assert chat_requests(fake) == []
    assert await bot.store.load_turns(f"p2p:{USER}") == []


async def test_a_rate_limited_key_hands_the_transcription_to_the_next_key(
    start: Any, fake: FakeOpenAI
) -> None:
    fake.transcript = "hello"
    for key in (KEY_A, KEY_B):
        fake.script(key).enqueue(rate_limit_exceeded(retry_after=20), path=TRANSCRIPTIONS_PATH)
    bot = await start(KEY_A, KEY_B, llm={"transcription_model": "whisper-1"})
    answer = await bot.send(bot.voice())
    assert answer.text == "echo: hello"
    first, second, third = [r.key for r in fake.requests if r.path == TRANSCRIPTIONS_PATH]
    assert {first, second} == {KEY_A, KEY_B}  # the second try at once on the other key
    assert third in (KEY_A, KEY_B)  # then, both cooling, after waiting for the first back
    assert answer.notices == []


async def test_feishus_missing_speech_scope_is_named_in_the_reply(
    start: Any, feishu: FakeFeishuThread
) -> None:
    feishu.fake.set_scopes([], not_granted=["speech_to_text:speech"])
    bot = await start(llm={"transcription_model": ""})
    answer = await bot.send(bot.voice())
    assert "speech_to_text:speech" in answer.text
    assert answer.text.startswith("I could not transcribe your voice message")


async def test_a_voice_message_with_no_words_gets_a_short_reply(
    start: Any, feishu: FakeFeishuThread, fake: FakeOpenAI
) -> None:
    feishu.fake.speech_text = ""
    bot = await start(llm={"transcription_model": ""})
    assert (await bot.send(bot.voice())).text == SILENT_VOICE_TEXT
    assert fake.requests == []


async def test_a_broken_recording_is_refused_with_a_clear_reply(
    start: Any, feishu: FakeFeishuThread
) -> None:
    bot = await start(llm={"transcription_model": ""})
    broken = bot.resource(b"OggS but not really audio", kind="audio")
    answer = await bot.send(MediaRef("audio", broken.key, duration_ms=1000))
    assert "voice message" in answer.text
    assert feishu.fake.speech_requests == []


# ---- images ---------------------------------------------------------------------------------


async def test_an_image_sent_alone_is_held_and_asked_with_the_next_question(
    start: Any, fake: FakeOpenAI, feishu: FakeFeishuThread
) -> None:
    bot = await start(llm={"vision": True})
    held = await bot.send(bot.resource(make_png(4000, 1000), kind="image"))
    assert held.text == IMAGE_HOLD_TEXT.format(minutes="10 minutes")
    assert fake.requests == []
    (download,) = feishu.fake.calls_to("message_resource")
    assert download.query["type"] == "image"

    answer = await bot.send(text="what is in this picture?")

    (request,) = chat_requests(fake)
    text_part, image_part = user_parts(request)
    assert text_part == {"type": "text", "text": "what is in this picture?"}
    image = image_of(image_part)
    assert image.size == (2048, 512)  # downscaled from the served 4000×1000
    assert answer.text.startswith("echo:")
    turns = await bot.store.load_turns(f"p2p:{USER}")
    assert turns[0].content == "[image] what is in this picture?"
    # Used once: the next question goes without it.
    await bot.send(text="and now?")
    assert user_parts(chat_requests(fake)[-1]) == "and now?"


async def test_several_images_wait_together_for_the_question(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(llm={"vision": True})
    await bot.send(bot.resource(make_png(), kind="image"))
    await bot.send(bot.resource(make_png(color=(0, 0, 200)), kind="image"))
    await bot.send(text="compare them")
    parts = user_parts(chat_requests(fake)[-1])
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert (await bot.store.load_turns(f"p2p:{USER}"))[0].content == "[image] [image] compare them"


async def test_a_held_image_expires_after_the_hold_time(
    start: Any, fake: FakeOpenAI, time: FakeTime
) -> None:
    bot = await start(llm={"vision": True}, chat={"attachment_hold_minutes": 5})
    await bot.send(bot.resource(make_png(), kind="image"))
    time.advance(5 * 60 + 1)
    await bot.send(text="what was it?")
    assert user_parts(chat_requests(fake)[-1]) == "what was it?"


async def test_a_held_image_waits_for_its_sender_only(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(llm={"vision": True})
    await bot.send(bot.resource(make_png(), kind="image"), user="ou_alice")
    await bot.send(text="hello", user="ou_bob")
    assert user_parts(chat_requests(fake)[-1]) == "hello"


async def test_a_post_with_text_and_an_image_is_asked_at_once(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(llm={"vision": True})
    answer = await bot.send(bot.resource(make_png(), kind="image"), text="describe this")
    parts = user_parts(chat_requests(fake)[-1])
    assert parts[0] == {"type": "text", "text": "describe this"}
    assert image_of(parts[1]).size == (64, 48)
    assert answer.text.startswith("echo:")


async def test_without_vision_an_image_gets_the_reply_naming_the_setting(
    start: Any, fake: FakeOpenAI, feishu: FakeFeishuThread
) -> None:
    bot = await start()
    answer = await bot.send(bot.resource(make_png(), kind="image"))
    assert answer.text == VISION_OFF_TEXT
    assert feishu.fake.calls_to("message_resource") == []
    assert fake.requests == []


async def test_without_vision_a_post_is_answered_from_its_text_with_a_note(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    answer = await bot.send(bot.resource(make_png(), kind="image"), text="hi there")
    assert user_parts(chat_requests(fake)[-1]) == "hi there"
    assert answer.finished is not None
    assert "I cannot look at images" in (answer.finished.note or "")


async def test_an_image_that_is_not_one_is_refused_and_nothing_is_held(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start(llm={"vision": True})
    answer = await bot.send(bot.resource(b"GIF89a but broken", kind="image"))
    assert "image" in answer.text
    await bot.send(text="what was it?")
    assert user_parts(chat_requests(fake)[-1]) == "what was it?"


async def test_an_image_over_the_size_limit_is_refused_with_the_limit(
    start: Any, feishu: FakeFeishuThread
) -> None:
    bot = await start(llm={"vision": True}, chat={"max_file_mb": 0.01})
    answer = await bot.send(bot.resource(make_png(2000, 2000), kind="image"))
    assert answer.text == (
        "Your image is larger than the 0.01 MB I take. Please send a smaller one."
    )


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"error": 99991672}, "the bot lacks the Feishu permission"),
        ({"error": 1, "http_status": 503, "times": 4}, "Feishu is not answering right now"),
    ],
)
async def test_a_failed_download_is_answered_and_holds_nothing(
    start: Any, feishu: FakeFeishuThread, fake: FakeOpenAI, fault: dict[str, Any], expected: str
) -> None:
    code = fault.pop("error")
    message = "Access denied. One of the following scopes is required: [im:resource]"
    feishu.fake.fail("message_resource", code, message, **fault)
    bot = await start(llm={"vision": True})
    answer = await bot.send(bot.resource(make_png(), kind="image"))
    assert answer.text.startswith("I could not fetch your image from Feishu")
    assert expected in answer.text
    await bot.send(text="well?")
    assert user_parts(chat_requests(fake)[-1]) == "well?"


# ---- files ----------------------------------------------------------------------------------


async def test_a_pdf_is_held_and_its_text_reaches_the_model_with_the_question(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start()
    pdf = make_pdf(["Quarterly revenue grew 12 percent.", "Costs fell in March."])
    held = await bot.send(bot.resource(pdf, name="report.pdf"))
    assert held.text.startswith("Got report.pdf (2 pages)")
    assert fake.requests == []

    await bot.send(text="summarize it")
    prompt = user_parts(chat_requests(fake)[-1])
    assert prompt.startswith("(The user sent the file report.pdf:)\n")
    assert "Quarterly revenue grew 12 percent." in prompt
    assert "Costs fell in March." in prompt
    assert prompt.endswith("\n\nsummarize it")


async def test_a_long_file_is_cut_to_the_budget_with_a_note(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(chat={"max_history_tokens": 600})
    notes = "\n".join(f"line {n}: the quick brown fox jumps over the lazy dog" for n in range(400))
    await bot.send(bot.resource(notes.encode(), name="notes.txt"))
    answer = await bot.send(text="what is this?")
    assert answer.finished is not None
    assert "notes.txt is long: I read only its first" in (answer.finished.note or "")
    assert len(user_parts(chat_requests(fake)[-1])) < len(notes)


async def test_a_file_type_the_bot_cannot_read_gets_a_reply_listing_what_it_reads(
    start: Any, feishu: FakeFeishuThread
) -> None:
    bot = await start()
    answer = await bot.send(bot.resource(b"MZ\x90\x00", name="setup.exe"))
    assert answer.text.startswith("I cannot read setup.exe: I read ")
    assert "PDF" in answer.text
    assert feishu.fake.calls_to("message_resource") == []


async def test_a_file_holding_an_api_key_is_not_read(start: Any, fake: FakeOpenAI) -> None:
    bot = await start()
    secret = b"OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD\n"
    answer = await bot.send(bot.resource(secret, name=".env.txt"))
    assert "looks like it holds an API key" in answer.text
    await bot.send(text="what was in it?")
    assert user_parts(chat_requests(fake)[-1]) == "what was in it?"


async def test_a_gb18030_text_file_is_read(start: Any, fake: FakeOpenAI) -> None:
    bot = await start()
    held = await bot.send(
        bot.resource("会议纪要：明天上午十点开会。".encode("gb18030"), name="纪要.txt")
    )
    assert held.text == FILE_HOLD_TEXT.format(
        name="纪要.txt", pages="", tokens=held_tokens(held.text), minutes="10 minutes"
    )
    await bot.send(text="几点开会？")
    assert "明天上午十点开会" in user_parts(chat_requests(fake)[-1])


def held_tokens(reply: str) -> int:
    return int(reply.split("(about ", 1)[1].split(" tokens", 1)[0].replace(",", ""))


# ---- /draw ----------------------------------------------------------------------------------


async def test_draw_uploads_the_drawn_image_and_shows_it_with_its_prompt(
    start: Any, fake: FakeOpenAI, feishu: FakeFeishuThread
) -> None:
    bot = await start()
    answer = await bot.send(text="/draw a red lighthouse at dawn")

    (request,) = [r for r in fake.requests if r.path == IMAGES_PATH]
    assert request.body["model"] == "gpt-image-1"
    assert request.body["prompt"] == "a red lighthouse at dawn"
    (uploaded,) = feishu.fake.uploaded_images()
    assert uploaded.data == FAKE_IMAGE_PNG
    assert uploaded.image_type == "message"
    assert answer.notices == ["Drawing… this takes a little while."]
    assert answer.text == (
        f"![a red lighthouse at dawn]({uploaded.image_key})\n\n_a red lighthouse at dawn_"
    )
    assert chat_requests(fake) == []
    assert await bot.store.load_turns(f"p2p:{USER}") == []
    usage = await bot.store.usage_between("2000-01-01", "2100-01-01", USER)
    assert [(u.requests, u.images) for u in usage] == [(1, 1)]
    assert "1 image drawn" in (await bot.send(text="/usage")).text


async def test_draw_stops_at_the_daily_image_quota(
    start: Any, fake: FakeOpenAI, feishu: FakeFeishuThread
) -> None:
    bot = await start(access={"daily_images_per_user": 2})
    for _ in range(2):
        await bot.send(text="/画 a cat")
    refused = await bot.send(text="/image one more cat")
    assert refused.text.startswith("You have drawn your 2 images for today.")
    assert len([r for r in fake.requests if r.path == IMAGES_PATH]) == 2
    assert len(feishu.fake.uploaded_images()) == 2


async def test_admins_draw_without_a_quota(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(access={"daily_images_per_user": 1, "admins": [USER]})
    for _ in range(2):
        await bot.send(text="/draw a dog")
    assert len([r for r in fake.requests if r.path == IMAGES_PATH]) == 2


@pytest.mark.parametrize(
    ("behaviours", "expected"),
    [
        ([content_policy_violation()], DRAW_REFUSED_TEXT),
        ([server_error()] * 4, DRAW_FAILED_TEXT),
    ],
)
async def test_a_failed_drawing_gets_a_short_reply_and_counts_nothing(
    start: Any, fake: FakeOpenAI, behaviours: list[Any], expected: str
) -> None:
    fake.script(KEY_A).enqueue(*behaviours, path=IMAGES_PATH)
    bot = await start()
    answer = await bot.send(text="/draw something")
    assert answer.failed is not None
    assert answer.text == expected
    assert await bot.store.usage_between("2000-01-01", "2100-01-01", USER) == []


async def test_a_drawing_feishu_will_not_take_is_explained(
    start: Any, feishu: FakeFeishuThread
) -> None:
    feishu.fake.fail("image_upload", 1, "server trouble", http_status=500, times=4)
    bot = await start()
    answer = await bot.send(text="/draw a tree")
    assert answer.text.startswith("I drew it, but could not show it to you: I could not upload")


async def test_draw_is_off_without_an_image_model_and_the_help_leaves_it_out(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start(llm={"image_model": ""})
    assert (await bot.send(text="/draw a tree")).text == DRAW_OFF_TEXT
    assert "/draw" not in (await bot.send(text="/help")).text
    assert fake.requests == []


async def test_draw_without_a_description_says_how(start: Any, fake: FakeOpenAI) -> None:
    bot = await start()
    assert (await bot.send(text="/draw")).text.startswith("Tell me what to draw")
    assert fake.requests == []


async def test_a_user_over_the_quota_gets_no_transcription(start: Any, fake: FakeOpenAI) -> None:
    bot = await start(
        llm={"transcription_model": "whisper-1"}, access={"daily_requests_per_user": 1}
    )
    await bot.send(text="first question")
    answer = await bot.send(bot.voice())
    assert answer.text.startswith("You have used your 1 requests for today.")
    assert [r.path for r in fake.requests] == [CHAT_PATH]


async def test_the_same_image_message_answered_again_is_held_once(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start(llm={"vision": True})
    image = bot.resource(make_png(), kind="image")
    await bot.send(image)
    await bot.send(image)  # e.g. resumed after a restart before its reply was committed
    await bot.send(text="what is it?")
    assert [p["type"] for p in user_parts(chat_requests(fake)[-1])] == ["text", "image_url"]


async def test_the_help_mentions_media_and_draw_only_where_the_transport_handles_them(
    start: Any,
) -> None:
    bot = await start()
    wired = (await bot.send(text="/help")).text
    assert "voice message, an image or a file" in wired
    assert "/draw <description>" in wired
    assert bot.harness.service.media is not None
    bot.harness.service.media.source = None  # a transport without downloads, like the terminal
    bot.harness.service.images = None
    bare = (await bot.send(text="/help")).text
    assert "voice message" not in bare
    assert "/draw" not in bare


async def test_a_very_long_file_is_held_cut_and_still_fits_the_question(
    start: Any, fake: FakeOpenAI
) -> None:
    bot = await start(chat={"max_file_mb": 10})
    big = ("all work and no play makes a dull bot\n" * 80_000).encode()  # about 3 MB
    held = await bot.send(bot.resource(big, name="big.log"))
    assert held.text.startswith("Got big.log (about ")
    (kept,) = await bot.store.held_attachments(f"{CHAT}|{USER}", since=0)
    assert len(kept.content) == MAX_HELD_CHARS
    answer = await bot.send(text="what does it say?")
    assert answer.finished is not None
    assert re.search(r"big\.log is long: I read only its first \d+ %\.", answer.finished.note or "")
    assert "all work and no play" in user_parts(chat_requests(fake)[-1])
