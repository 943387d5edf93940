"""Voice messages become 16 kHz mono PCM for speech-to-text, within a length limit."""

from __future__ import annotations

import array
import itertools
from pathlib import Path

import pytest

from bot.errors import MediaTooLarge, MediaUnreadable
from bot.media.audio import Pcm, decode_to_pcm16k
from tests.media_fixtures import encode_audio, make_ogg_opus, make_pdf, make_png, make_wav


def zero_crossings_per_second(pcm: Pcm) -> float:
    samples = array.array("h", pcm.data)
    crossings = sum(
        1 for before, after in itertools.pairwise(samples) if (before < 0) != (after < 0)
    )
    return crossings / pcm.seconds


def test_voice_clip_is_decoded_to_16k_mono_pcm_of_the_same_length() -> None:
    pcm = decode_to_pcm16k(make_ogg_opus(2.0), max_seconds=60)

    assert pcm.seconds == pytest.approx(2.0, abs=0.1)
    assert len(pcm.data) % 2 == 0
    assert pcm.seconds == len(pcm.data) / 32000


def test_the_tone_keeps_its_pitch_so_the_output_really_is_16_khz() -> None:
    # A 440 Hz sine crosses zero 880 times a second, whatever rate it was recorded at.
    pcm = decode_to_pcm16k(make_ogg_opus(2.0, frequency=440.0), max_seconds=60)

    assert zero_crossings_per_second(pcm) == pytest.approx(880, rel=0.05)


def test_stereo_wav_at_44_1_khz_is_mixed_down_and_resampled() -> None:
    pcm = decode_to_pcm16k(make_wav(1.5, sample_rate=44100, channels=2), max_seconds=60)

    assert pcm.seconds == pytest.approx(1.5, abs=0.05)
    assert zero_crossings_per_second(pcm) == pytest.approx(880, rel=0.05)


def test_clip_just_under_the_limit_is_accepted() -> None:
    pcm = decode_to_pcm16k(make_ogg_opus(2.0), max_seconds=2.5)

    assert pcm.seconds == pytest.approx(2.0, abs=0.1)


def test_clip_longer_than_the_limit_is_refused_with_the_limit_in_the_message() -> None:
    with pytest.raises(MediaTooLarge, match=r"longer than 1 s"):
        decode_to_pcm16k(make_ogg_opus(3.0), max_seconds=1)


def test_limit_is_written_without_a_trailing_point_zero() -> None:
    with pytest.raises(MediaTooLarge) as caught:
        decode_to_pcm16k(make_ogg_opus(2.0), max_seconds=1.0)

    assert "1 s" in str(caught.value)
    assert "1.0" not in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not audio " * 50, b"\x00" * 4096],
    ids=["empty", "text", "zeros"],
)
def test_garbage_bytes_are_unreadable(data: bytes) -> None:
    with pytest.raises(MediaUnreadable, match="could not read this voice message"):
        decode_to_pcm16k(data, max_seconds=60)


def test_an_image_sent_as_a_voice_message_is_unreadable() -> None:
    # FFmpeg opens a PNG fine (as a video stream); there is just no audio in it.
    with pytest.raises(MediaUnreadable):
        decode_to_pcm16k(make_png(), max_seconds=60)


def test_a_pdf_sent_as_a_voice_message_is_unreadable() -> None:
    with pytest.raises(MediaUnreadable):
        decode_to_pcm16k(make_pdf(["hello"]), max_seconds=60)


def test_a_clip_cut_short_in_transit_is_unreadable_only_if_nothing_decodes() -> None:
    clip = make_ogg_opus(4.0)

    half = decode_to_pcm16k(clip[: len(clip) // 2], max_seconds=60)
    assert 1.0 < half.seconds < 3.0
    with pytest.raises(MediaUnreadable):
        decode_to_pcm16k(clip[:100], max_seconds=60)


def test_a_playlist_disguised_as_audio_cannot_read_files_next_to_the_bot(
    isolated: Path,
) -> None:
    # Regression: FFmpeg's concat demuxer follows the file names written in its input, so
    # without a demuxer allow-list this "voice message" decoded a WAV from the working dir.
    (isolated / "private.wav").write_bytes(make_wav(1.0))
    playlist = b"ffconcat version 1.0\nfile 'private.wav'\n"

    with pytest.raises(MediaUnreadable):
        decode_to_pcm16k(playlist, max_seconds=60)


@pytest.mark.parametrize(
    ("container_format", "codec"),
    [("mp4", "aac"), ("webm", "libopus"), ("mp3", "mp3")],
    ids=["m4a-voice-memo", "webm-browser-recording", "mp3"],
)
def test_other_common_audio_containers_are_decoded_too(container_format: str, codec: str) -> None:
    clip = encode_audio(1.0, container_format=container_format, codec=codec)

    pcm = decode_to_pcm16k(clip, max_seconds=60)

    assert pcm.seconds == pytest.approx(1.0, abs=0.1)


def test_a_damaged_stretch_in_the_middle_costs_only_that_stretch() -> None:
    clip = make_ogg_opus(4.0)
    middle = len(clip) // 2
    damaged = clip[:middle] + bytes(byte ^ 0x5A for byte in clip[middle : middle + 400])
    damaged += clip[middle + 400 :]

    pcm = decode_to_pcm16k(damaged, max_seconds=60)

    assert 2.5 < pcm.seconds <= 4.1


def test_audio_whose_rate_and_channels_change_midway_is_decoded_whole() -> None:
    # Two MP3s glued together, as some voice recorders and "joiner" tools write them.
    first = encode_audio(1.0, container_format="mp3", codec="mp3", sample_rate=44100)
    second = encode_audio(1.0, container_format="mp3", codec="mp3", sample_rate=22050, channels=2)

    pcm = decode_to_pcm16k(first + second, max_seconds=60)

    assert pcm.seconds == pytest.approx(2.0, abs=0.15)
    assert zero_crossings_per_second(pcm) == pytest.approx(880, rel=0.05)
