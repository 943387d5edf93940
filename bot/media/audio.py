"""Voice messages to raw PCM: decode whatever audio the user sent into what speech-to-text wants.

Feishu voice messages are Opus in Ogg, but users also forward MP3s, M4A voice memos and WAVs, so
this decodes any of the common audio containers with PyAV (FFmpeg) and resamples to mono 16 kHz
signed 16-bit PCM, the format Feishu's speech-to-text API accepts.

The input is untrusted, so FFmpeg may only use the demuxers in ``_ALLOWED_DEMUXERS``: its
playlist-like demuxers (``concat``, ``hls``) would otherwise follow paths or URLs written in the
"audio" file and read files from the bot's working directory. Decoding stops as soon as the
audio runs past the caller's limit, so an hour-long recording costs no more than the limit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.errors import MediaTooLarge, MediaUnreadable

if TYPE_CHECKING:
    from av.audio.frame import AudioFrame
    from av.audio.resampler import AudioResampler

#: The one output format: mono, 16 kHz, 2 bytes a sample.
SAMPLE_RATE = 16_000
BYTES_PER_SECOND = SAMPLE_RATE * 2

#: FFmpeg demuxers (short names) that may read a voice message: Ogg (Opus, Vorbis, Speex),
#: MP3, WAV, FLAC, ADTS AAC, MP4/M4A/MOV, Matroska/WebM and AMR. None of them opens other files.
_ALLOWED_DEMUXERS = "ogg,mp3,wav,flac,aac,mov,matroska,amr"

_UNREADABLE = "I could not read this voice message. Please record it again."


@dataclass(frozen=True)
class Pcm:
    """Mono 16 kHz signed 16-bit little-endian PCM, as Feishu's speech-to-text wants it."""

    data: bytes

    @property
    def seconds(self) -> float:
        """How long the audio plays."""
        return len(self.data) / BYTES_PER_SECOND


def decode_to_pcm16k(data: bytes, *, max_seconds: float) -> Pcm:
    """Decode an audio file held in memory to mono 16 kHz PCM.

    Damaged packets are skipped, as the ``ffmpeg`` tool does, so a message with a glitch
    still yields the rest of its audio. Raises ``MediaUnreadable`` if the bytes are not audio
    FFmpeg can decode (or hold no sound), and ``MediaTooLarge`` as soon as the decoded audio
    is longer than ``max_seconds``.
    """
    import av
    import av.error

    max_bytes = int(max_seconds * SAMPLE_RATE) * 2
    output = _Mono16k()
    try:
        with av.open(
            io.BytesIO(data),
            mode="r",
            container_options={"format_whitelist": _ALLOWED_DEMUXERS},
            metadata_errors="ignore",
        ) as container:
            if not container.streams.audio:
                raise MediaUnreadable(_UNREADABLE)
            for packet in container.demux(container.streams.audio[0]):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    continue
                for frame in frames:
                    output.push(frame)
                if len(output.pcm) > max_bytes:
                    raise MediaTooLarge(_too_long(max_seconds))
            output.flush()
    except av.error.FFmpegError as exc:
        raise MediaUnreadable(_UNREADABLE) from exc
    if len(output.pcm) > max_bytes:
        raise MediaTooLarge(_too_long(max_seconds))
    if not output.pcm:
        raise MediaUnreadable(_UNREADABLE)
    return Pcm(bytes(output.pcm))


class _Mono16k:
    """Resamples frames into ``pcm``, starting afresh whenever the input changes shape.

    PyAV's ``AudioResampler`` refuses a frame whose rate, layout or sample format differs
    from the first one it saw, and such changes happen mid-file (chained Ogg streams,
    concatenated MP3s).
    """

    def __init__(self) -> None:
        self.pcm = bytearray()
        self._resampler: AudioResampler | None = None
        self._shape: tuple[str, str, int] | None = None

    def push(self, frame: AudioFrame) -> None:
        """Resample ``frame`` and append the result."""
        import av

        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        resampler = self._resampler
        if resampler is None or shape != self._shape:
            self.flush()
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            self._resampler, self._shape = resampler, shape
        self._append(resampler.resample(frame))

    def flush(self) -> None:
        """Append what the resampler still holds back."""
        if self._resampler is not None:
            self._append(self._resampler.resample(None))

    def _append(self, frames: list[AudioFrame]) -> None:
        for frame in frames:
            # A plane may be padded past its samples; keep only the samples.
            self.pcm += bytes(frame.planes[0])[: frame.samples * 2]


def _too_long(max_seconds: float) -> str:
    return (
        f"This voice message is longer than {max_seconds:g} s, the longest I can transcribe. "
        "Please send a shorter one."
    )
