"""Media end to end: `python -m bot run` ↔ fake Feishu ↔ fake OpenAI.

Voice messages by both routes, an image held for the next question, a formula drawn into the
final card, /draw, and a download Feishu refuses. Slow suite (`make test-all`).
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.chat.media import IMAGE_HOLD_TEXT
from tests.e2e_harness import USER_A, World, make_world
from tests.fakes.feishu_server import FakeFeishu
from tests.fakes.openai_server import CHAT_PATH, FAKE_IMAGE_PNG, TRANSCRIPTIONS_PATH, Reply
from tests.media_fixtures import make_ogg_opus, make_png

pytestmark = pytest.mark.slow


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    settings: dict[str, Any] = getattr(request, "param", {})
    yield from make_world(tmp_path, **settings)


def with_settings(**sections: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("world", [sections], indirect=True, ids=["settings"])


def send_voice(world: World, key: str, seconds: float = 1.5) -> str:
    world.fs.add_resource(key, make_ogg_opus(seconds), "audio/ogg", kind="file")
    content = {"file_key": key, "duration": int(seconds * 1000)}
    return world.send("p2p_file", message_type="audio", content=content, sender_open_id=USER_A)


def history(world: World, *, answers: int = 1) -> list[str]:
    """The stored turns, once ``answers`` answers were committed."""
    world.bots[-1].wait_for_event("reply_sent", count=answers)
    with sqlite3.connect(world.workdir / "data" / "bot.db") as db:
        return [row[0] for row in db.execute("SELECT content FROM turns ORDER BY rowid")]


def uploaded_keys(fs: FakeFeishu) -> list[str]:
    return [image.image_key for image in fs.uploaded_images()]


@with_settings(llm={"transcription_model": "whisper-1"})
def test_a_voice_message_is_transcribed_by_the_endpoint_and_answered_in_the_card(
    world: World,
) -> None:
    world.llm.transcript = "how tall is Mount Everest"
    world.start_bot()
    message = send_voice(world, "file_v3_voice_e2e")
    text = world.wait_for_final_reply(message)
    assert text == "> 🎤 how tall is Mount Everest\n\necho: how tall is Mount Everest"
    (transcription,) = [r for r in world.llm.requests if r.path == TRANSCRIPTIONS_PATH]
    assert transcription.files["file"].data.startswith(b"OggS")
    assert history(world) == ["how tall is Mount Everest", "echo: how tall is Mount Everest"]


def test_without_a_transcription_model_feishus_speech_to_text_is_used(world: World) -> None:
    world.fs.speech_text = "what time is it"
    world.start_bot()
    message = send_voice(world, "file_v3_voice_feishu", seconds=2.0)
    text = world.wait_for_final_reply(message)
    assert text.endswith("echo: what time is it")
    (speech,) = world.fs.speech_requests
    assert speech.seconds == pytest.approx(2.0, abs=0.15)
    assert [r.path for r in world.llm.requests] == [CHAT_PATH]


@with_settings(llm={"vision": True})
def test_an_image_is_held_and_sent_with_the_next_question(world: World) -> None:
    world.fs.add_resource("img_v3_e2e_photo", make_png(300, 200), "image/png", kind="image")
    world.start_bot()
    image = world.send("p2p_image", content={"image_key": "img_v3_e2e_photo"})
    assert world.wait_for_final_reply(image) == IMAGE_HOLD_TEXT.format(minutes="10 minutes")
    question = world.send("p2p_text", text="what colour is it?")
    world.wait_for_final_reply(question)
    (request,) = [r for r in world.llm.requests if r.path == CHAT_PATH]
    text_part, image_part = request.messages[-1]["content"]
    assert text_part == {"type": "text", "text": "what colour is it?"}
    data = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
    assert data == make_png(300, 200)  # small enough to go as it came
    assert history(world, answers=2)[0] == "[image] what colour is it?"


def test_a_formula_in_the_answer_is_an_uploaded_image_in_the_final_card(world: World) -> None:
    world.llm.enqueue(Reply(text="The identity $$e^{i\\pi} + 1 = 0$$ costs $5 and $6 to print."))
    world.start_bot()
    message = world.send("p2p_text", text="show me Euler")
    text = world.wait_for_final_reply(message)
    (key,) = uploaded_keys(world.fs)
    assert text == (f"The identity\n\n![e^{{i\\pi}} + 1 = 0]({key})\n\ncosts $5 and $6 to print.")
    assert history(world)[1] == "The identity $$e^{i\\pi} + 1 = 0$$ costs $5 and $6 to print."


def test_draw_shows_the_drawn_image_in_the_card(world: World) -> None:
    world.start_bot()
    message = world.send("p2p_text", text="/draw a small boat")
    text = world.wait_for_final_reply(message)
    (uploaded,) = world.fs.uploaded_images()
    assert uploaded.data == FAKE_IMAGE_PNG
    assert text == f"![a small boat]({uploaded.image_key})\n\n_a small boat_"


@with_settings(llm={"vision": True})
def test_an_image_feishu_will_not_let_the_bot_download_gets_a_reply_naming_the_scope(
    world: World,
) -> None:
    world.fs.set_scopes([], not_granted=["im:resource"])
    world.start_bot()
    message = world.send("p2p_image")
    text = world.wait_for_final_reply(message)
    assert text.startswith("I could not fetch your image from Feishu: the bot lacks the Feishu")
    assert "im:resource" in text
    assert world.llm.requests == []


@with_settings(llm={"vision": True}, chat={"merge_burst_ms": 800})
def test_a_merged_burst_keeps_the_images_of_its_posts(world: World) -> None:
    world.fs.add_resource("img_v3_e2e_burst", make_png(40, 30), "image/png", kind="image")
    post = {
        "title": "",
        "content": [
            [{"tag": "text", "text": "this one"}],
            [{"tag": "img", "image_key": "img_v3_e2e_burst"}],
        ],
    }
    world.start_bot()
    world.send("p2p_text", text="look at", sender_open_id=USER_A)
    last = world.send("p2p_post", content=json.dumps(post), sender_open_id=USER_A)
    world.wait_for_final_reply(last)
    (request,) = [r for r in world.llm.requests if r.path == CHAT_PATH]
    text_part, image_part = request.messages[-1]["content"]
    assert text_part == {"type": "text", "text": "look at\nthis one"}
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
