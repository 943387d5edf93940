"""The LLM client's speech-to-text and drawing calls: keys, retries, and what they return.

The real openai SDK against the fake endpoint; retry waits go to a fake clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.errors import AllKeysUnavailable, LLMError, RequestRejected
from bot.llm.events import ChatMessage
from tests.chat_harness import KEY_A, KEY_B, ChatHarness, FakeTime, make_settings
from tests.fakes.openai_server import (
    CHAT_PATH,
    FAKE_IMAGE_PNG,
    FILES_PATH,
    IMAGES_PATH,
    TRANSCRIPTIONS_PATH,
    FakeOpenAI,
    RequestRecord,
    content_policy_violation,
    insufficient_quota,
    invalid_api_key,
    server_error,
)
from tests.media_fixtures import make_ogg_opus


def on(fake: FakeOpenAI, path: str) -> list[RequestRecord]:
    return [r for r in fake.requests if r.path == path]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeOpenAI, tmp_path: Path) -> AsyncIterator[ChatHarness]:
    harness = ChatHarness(
        make_settings(fake.base_url, [KEY_A, KEY_B]), tmp_path / "b.db", FakeTime()
    )
    await harness.start()
    yield harness
    await harness.close()


async def test_a_refused_key_is_disabled_and_the_transcription_moves_to_the_next(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.transcript = "bonjour"
    fake.invalidate(KEY_A)
    voice = make_ogg_opus(0.5)
    for _ in range(2):  # whichever key it starts on, it ends on the good one
        assert (
            await bot.llm.transcribe(voice, file_name="voice.ogg", model="whisper-1", user_id="u")
            == "bonjour"
        )
    assert bot.key_state(KEY_A) == "disabled"
    assert bot.key_state(KEY_B) == "active"
    assert fake.requests_for(KEY_B, path=TRANSCRIPTIONS_PATH)


async def test_an_account_out_of_quota_is_disabled_by_a_drawing_too(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.script(KEY_A, images_persistent=insufficient_quota())
    fake.script(KEY_B, images_persistent=insufficient_quota())
    with pytest.raises(AllKeysUnavailable):
        await bot.llm.draw("a cat", model="gpt-image-1", user_id="u")
    assert {bot.key_state(KEY_A), bot.key_state(KEY_B)} == {"disabled"}


async def test_gpt_image_answers_are_decoded_from_base64(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    drawn = await bot.llm.draw("a cat", model="gpt-image-1", user_id="u")
    assert drawn.data == FAKE_IMAGE_PNG
    (request,) = on(fake, IMAGES_PATH)
    assert "response_format" not in request.body  # gpt-image models refuse it


async def test_dall_e_is_asked_for_base64(bot: ChatHarness, fake: FakeOpenAI) -> None:
    drawn = await bot.llm.draw("a dog", model="dall-e-3", user_id="u")
    assert drawn.data == FAKE_IMAGE_PNG
    assert drawn.revised_prompt == "a dog"
    (request,) = on(fake, IMAGES_PATH)
    assert request.body["response_format"] == "b64_json"


async def test_an_image_answered_as_a_url_is_fetched_without_the_api_key(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    drawn = await bot.llm.draw("a dog", model="flux-schnell", user_id="u")
    assert drawn.data == FAKE_IMAGE_PNG
    (download,) = [r for r in fake.requests if r.path.startswith(FILES_PATH)]
    assert "authorization" not in {name.lower() for name in download.headers}


async def test_an_image_url_that_cannot_be_fetched_is_an_llm_error(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    for _ in range(4):
        fake.enqueue(server_error(), path=FILES_PATH)
    with pytest.raises(LLMError, match="failed 4 times"):
        await bot.llm.draw("a dog", model="flux-schnell", user_id="u")


async def test_a_content_policy_refusal_is_final_and_costs_no_retry(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.enqueue(content_policy_violation(), path=IMAGES_PATH)
    with pytest.raises(RequestRejected) as refused:
        await bot.llm.draw("something", model="gpt-image-1", user_id="u")
    assert refused.value.code == "content_policy_violation"
    assert len(on(fake, IMAGES_PATH)) == 1
    assert {bot.key_state(KEY_A), bot.key_state(KEY_B)} == {"active"}


async def test_server_errors_are_retried_then_reported(bot: ChatHarness, fake: FakeOpenAI) -> None:
    for _ in range(4):
        fake.enqueue(server_error(), path=TRANSCRIPTIONS_PATH)
    with pytest.raises(LLMError, match="failed 4 times"):
        await bot.llm.transcribe(b"OggS", file_name="voice.ogg", model="whisper-1", user_id="u")
    assert len(on(fake, TRANSCRIPTIONS_PATH)) == 4
    assert bot.time.sleeps  # backed off between the attempts


async def test_an_image_part_is_sent_with_the_text_of_its_message(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    url = "data:image/png;base64,iVBORw0KGgo="
    events = bot.llm.stream([ChatMessage("user", "what is it?", (url,))], user_id="u")
    async for _ in events:
        pass
    (request,) = on(fake, CHAT_PATH)
    assert request.messages[-1]["content"] == [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]


async def test_a_revoked_key_is_refused_for_drawing_like_for_answers(
    bot: ChatHarness, fake: FakeOpenAI
) -> None:
    fake.script(KEY_A, images_persistent=invalid_api_key())
    fake.script(KEY_B, images_persistent=invalid_api_key())
    with pytest.raises(AllKeysUnavailable):
        await bot.llm.draw("x", model="gpt-image-1", user_id="u")
