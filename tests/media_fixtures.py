"""Real, small media made in memory for the media tests: voice clips, images and PDFs.

Nothing is shipped as a file or downloaded: each function encodes its media with the same
libraries the bot decodes with (PyAV, Pillow), or writes it by hand (PDF), so a test says in
one line what it feeds the bot (``make_ogg_opus(seconds=2)``).
"""

from __future__ import annotations

import array
import io
import math
import wave
from collections.abc import Sequence

import av
from PIL import Image
from pypdf import PdfReader, PdfWriter

Rgb = tuple[int, int, int]

RED: Rgb = (200, 30, 30)
WHITE: Rgb = (255, 255, 255)


def sine_wave(seconds: float, *, frequency: float, sample_rate: int, channels: int = 1) -> bytes:
    """Interleaved signed 16-bit samples of a sine tone at a third of full scale."""
    count = round(seconds * sample_rate)
    samples = array.array("h")
    for index in range(count):
        value = round(10_000 * math.sin(2 * math.pi * frequency * index / sample_rate))
        samples.extend([value] * channels)
    return samples.tobytes()


def make_ogg_opus(
    seconds: float = 1.0, *, frequency: float = 440.0, sample_rate: int = 48000
) -> bytes:
    """A mono Ogg/Opus voice clip of a sine tone, the format Feishu voice messages come in."""
    return encode_audio(
        seconds,
        container_format="ogg",
        codec="libopus",
        frequency=frequency,
        sample_rate=sample_rate,
    )


def encode_audio(
    seconds: float,
    *,
    container_format: str,
    codec: str,
    frequency: float = 440.0,
    sample_rate: int = 48000,
    channels: int = 1,
) -> bytes:
    """A sine tone encoded with PyAV, e.g. ``("mp4", "aac")`` for an iPhone voice memo."""
    out = io.BytesIO()
    with av.open(out, mode="w", format=container_format) as container:
        layout = "mono" if channels == 1 else "stereo"
        stream = container.add_stream(codec, rate=48000 if codec == "libopus" else sample_rate)
        assert isinstance(stream, av.AudioStream), f"{codec} is not an audio codec"
        stream.layout = layout
        # PyAV's encoder re-chunks (and resamples) frames to the codec's frame size, so one
        # frame holding the whole clip will do.
        pcm = sine_wave(seconds, frequency=frequency, sample_rate=sample_rate, channels=channels)
        frame = av.AudioFrame(format="s16", layout=layout, samples=len(pcm) // (2 * channels))
        frame.planes[0].update(pcm)
        frame.sample_rate = sample_rate
        frame.pts = 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def make_wav(
    seconds: float = 1.0, *, frequency: float = 440.0, sample_rate: int = 44100, channels: int = 2
) -> bytes:
    """A 16-bit PCM WAV file of a sine tone (by default CD-style stereo)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        pcm = sine_wave(seconds, frequency=frequency, sample_rate=sample_rate, channels=channels)
        writer.writeframes(pcm)
    return out.getvalue()


def two_tone(width: int, height: int, color: Rgb, mode: str = "RGB") -> Image.Image:
    """An image whose left half is ``color`` and right half white, so rotations are visible."""
    image = Image.new("RGB", (width, height), WHITE)
    image.paste(color, (0, 0, max(1, width // 2), height))
    return image.convert(mode)


def make_png(width: int = 64, height: int = 48, *, color: Rgb = RED, alpha: bool = False) -> bytes:
    """A PNG; with ``alpha`` it is RGBA and half transparent everywhere."""
    image = two_tone(width, height, color)
    if alpha:
        image.putalpha(128)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def make_jpeg(
    width: int = 64,
    height: int = 48,
    *,
    color: Rgb = RED,
    mode: str = "RGB",
    orientation: int | None = None,
) -> bytes:
    """A JPEG in ``mode`` (RGB, L or CMYK), with an EXIF orientation tag if one is given."""
    image = two_tone(width, height, color, mode)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def make_gif(width: int = 64, height: int = 48, *, colors: Sequence[Rgb] = (RED,)) -> bytes:
    """A palette GIF, animated with one frame per colour when given more than one."""
    frames = [Image.new("RGB", (width, height), color).convert("P") for color in colors]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def make_pdf(pages: list[str]) -> bytes:
    """A PDF with one page per string, each line of it set in Helvetica; pypdf extracts it.

    pypdf cannot typeset, so the file is written by hand: catalog, page tree, font, one page
    and one content stream per string, and an exact cross-reference table. ASCII text only; an
    empty string makes a page with no text at all (what a scanned page looks like to pypdf).
    """
    objects: list[bytes] = []
    page_ids = [4 + 2 * index for index in range(len(pages))]
    kids = " ".join(f"{page_id} 0 R" for page_id in page_ids)
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for page_id, text in zip(page_ids, pages, strict=True):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> " + f"/Contents {page_id + 1} 0 R >>".encode()
        )
        content = _text_operators(text)
        objects.append(
            f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream"
        )
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: list[int] = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref_at = len(out)
    out += f"xref\n0 {len(objects) + 1}\n".encode()
    out += b"0000000000 65535 f \n"
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n".encode()
    out += f"startxref\n{xref_at}\n%%EOF\n".encode()
    return bytes(out)


def _text_operators(text: str) -> bytes:
    if not text:
        return b""
    lines = [
        "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj"
        for line in text.split("\n")
    ]
    return ("BT /F1 12 Tf 14 TL 72 720 Td " + " T* ".join(lines) + " ET").encode("ascii")


def make_encrypted_pdf(text: str, password: str) -> bytes:
    """A one-page PDF encrypted with AES-256; ``password`` is the one needed to open it.

    With an empty ``password`` it opens without asking, like PDFs that only restrict
    printing or copying (they still carry a separate owner password).
    """
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf([text]))))
    writer.encrypt(user_password=password, owner_password="owner-secret", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
