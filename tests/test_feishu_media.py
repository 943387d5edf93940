"""The bot's Feishu media calls: downloads, speech-to-text, image uploads, and each failing.

The bot's aiohttp transport and tenant token against the fake Feishu over sockets; retry waits
are recorded, not slept. What the user would read is the error's text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from bot.chat.media import MediaRef
from bot.errors import MediaTooLarge, MediaUnavailable
from bot.feishu.media import FeishuMedia
from bot.media.audio import Pcm
from tests.fakes.feishu_server import CODE_SPEECH_TOO_LONG, FakeFeishuThread
from tests.feishu_clients import feishu_api, running_fake_feishu
from tests.media_fixtures import make_png

PNG = make_png(20, 10)


class Waits(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def fake() -> Iterator[FakeFeishuThread]:
    with running_fake_feishu("media_api") as running:
        running.fake.add_resource("img_v3_a", PNG, "image/png", kind="image")
        running.fake.add_resource("file_v3_a", b"hello, file", "text/plain", kind="file")
        yield running


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
async def media(fake: FakeFeishuThread, waits: Waits) -> AsyncIterator[FeishuMedia]:
    async with feishu_api(fake, sleep=waits, timeout_s=1) as api:
        yield FeishuMedia(api)


IMAGE = MediaRef("image", "img_v3_a")
FILE = MediaRef("file", "file_v3_a", "a.txt")
VOICE = MediaRef("audio", "file_v3_a", duration_ms=1000)


async def test_images_are_downloaded_as_images_and_files_and_voice_as_files(
    media: FeishuMedia, fake: FakeFeishuThread
) -> None:
    assert await media.download("om_1", IMAGE, 1024 * 1024) == PNG
    assert await media.download("om_1", FILE, 1024) == b"hello, file"
    assert await media.download("om_1", VOICE, 1024) == b"hello, file"
    assert [c.query["type"] for c in fake.fake.calls_to("message_resource")] == [
        "image",
        "file",
        "file",
    ]


async def test_a_resource_over_the_limit_is_refused_with_the_limit(media: FeishuMedia) -> None:
    with pytest.raises(
        MediaTooLarge,
        match=r"^Your image is larger than the [0-9.e-]+ MB I take. Please send a smaller one.$",
    ):
        await media.download("om_1", IMAGE, 10)


async def test_a_download_is_retried_through_server_errors(
    media: FeishuMedia, fake: FakeFeishuThread, waits: Waits
) -> None:
    fake.fake.fail("message_resource", 1, "busy", http_status=502, times=2)
    assert await media.download("om_1", IMAGE, 1024 * 1024) == PNG
    assert len(waits) == 2


async def test_a_download_that_times_out_every_time_says_feishu_is_not_answering(
    media: FeishuMedia, fake: FakeFeishuThread
) -> None:
    fake.fake.delay("message_resource", 3)
    with pytest.raises(MediaUnavailable, match="Feishu is not answering right now"):
        await media.download("om_1", IMAGE, 1024 * 1024)
    assert len(fake.fake.calls_to("message_resource")) == 4


async def test_a_resource_that_is_not_in_the_message_is_a_final_error(
    media: FeishuMedia, fake: FakeFeishuThread
) -> None:
    fake.fake.strict_resources = True
    with pytest.raises(MediaUnavailable, match=r"Feishu said: File not in msg"):
        await media.download("om_1", MediaRef("file", "file_v3_gone", "x.txt"), 1024)
    assert len(fake.fake.calls_to("message_resource")) == 1


async def test_speech_is_recognized_from_16k_pcm(
    media: FeishuMedia, fake: FakeFeishuThread
) -> None:
    fake.fake.speech_text = "ni hao"
    assert await media.recognize(Pcm(b"\x00\x01" * 16_000)) == "ni hao"
    (request,) = fake.fake.speech_requests
    assert request.seconds == pytest.approx(1.0)


async def test_speech_failing_with_server_errors_is_retried_then_explained(
    media: FeishuMedia, fake: FakeFeishuThread, waits: Waits
) -> None:
    fake.fake.fail("speech_file_recognize", 1, "busy", http_status=500, times=None)
    with pytest.raises(MediaUnavailable, match="Feishu is not answering right now"):
        await media.recognize(Pcm(b"\x00\x00" * 1600))
    assert len(waits) == 3


async def test_speech_over_feishus_limit_is_final(
    media: FeishuMedia, fake: FakeFeishuThread
) -> None:
    with pytest.raises(MediaUnavailable, match="I could not transcribe your voice message"):
        await media.recognize(Pcm(b"\x00\x00" * 16_000 * 61))
    assert [r.code for r in fake.fake.speech_requests] == [CODE_SPEECH_TOO_LONG]


async def test_an_uploaded_image_waits_out_feishus_rate_limit(
    media: FeishuMedia, fake: FakeFeishuThread, waits: Waits
) -> None:
    fake.fake.fail("image_upload", "rate_limited", times=1, headers={"x-ogw-ratelimit-reset": "2"})
    key = await media.publish(PNG, "image/png")
    assert waits == [2.0]
    (uploaded,) = fake.fake.uploaded_images()
    assert (uploaded.image_key, uploaded.data, uploaded.image_type) == (key, PNG, "message")


async def test_an_upload_feishu_refuses_is_a_final_error(
    media: FeishuMedia, fake: FakeFeishuThread
) -> None:
    with pytest.raises(MediaUnavailable, match="I could not upload the image to Feishu"):
        await media.publish(b"not an image at all", "image/png")
    assert len(fake.fake.calls_to("image_upload")) == 1


async def test_a_missing_resource_scope_is_named_for_uploads(
    media: FeishuMedia, fake: FakeFeishuThread
) -> None:
    fake.fake.set_scopes([], not_granted=["im:resource"])
    with pytest.raises(MediaUnavailable, match="lacks the Feishu permission im:resource"):
        await media.publish(PNG, "image/png")
