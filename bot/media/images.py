"""Images users send, made ready for a vision model: bounded size, upright, PNG or JPEG.

Users send phone photos (large, rotated by an EXIF tag), screenshots, GIFs, WebPs and the odd
CMYK JPEG from a print shop. Vision APIs want a plain PNG or JPEG and bill by pixel, so this
opens the image with Pillow, refuses decompression bombs before decoding a single pixel, turns
it upright, keeps the first frame of an animation, shrinks it so its long edge is at most
``max_edge``, and re-encodes it: PNG when it has real transparency, JPEG otherwise. A JPEG or
PNG that already fits is passed on unchanged, to save the work and keep its quality.

Re-encoding also drops EXIF metadata (camera, GPS position) that the model does not need.
Only formats people really send are tried (``_FORMATS``): the bytes come from strangers.
"""

from __future__ import annotations

import base64
import io
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from bot.errors import MediaTooLarge, MediaUnreadable

if TYPE_CHECKING:
    from PIL import Image

Mime = Literal["image/png", "image/jpeg"]

#: A JPEG or PNG at most this big (and within ``max_edge``) is passed on as it came.
PASS_THROUGH_BYTES = 1_500_000
JPEG_QUALITY = 85

_UNREADABLE = "I could not read this image. Please send it as a PNG or JPEG."
#: Formats Pillow may try. Phone, screenshot and web formats only: Pillow hands EPS to
#: Ghostscript, and its rarer parsers (FITS, PSD, SGI…) are not worth exposing to strangers.
#: "JPEG" includes the multi-picture JPEGs (MPO) some cameras write.
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO")
_EXIF_ORIENTATION = 0x0112
#: Modes a JPEG or PNG may have to pass through as it is; any other (CMYK, 16-bit) is converted.
_PLAIN_MODES = {
    "JPEG": frozenset({"L", "RGB"}),
    "PNG": frozenset({"1", "L", "LA", "P", "RGB", "RGBA"}),
}
_MIME_OF_FORMAT: dict[str, Mime] = {"JPEG": "image/jpeg", "PNG": "image/png"}
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


@dataclass(frozen=True)
class PreparedImage:
    """An encoded image ready to send to a vision model."""

    data: bytes
    mime: Mime
    width: int
    height: int

    def data_url(self) -> str:
        """The image as a ``data:`` URL, the form OpenAI-style chat APIs accept inline."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


def prepare_image(
    data: bytes, *, max_edge: int = 2048, max_pixels: int = 80_000_000
) -> PreparedImage:
    """Turn a JPEG, PNG, GIF, WebP, AVIF, BMP, TIFF or ICO into a PNG or JPEG within ``max_edge``.

    Raises ``MediaTooLarge`` for images of more than ``max_pixels`` pixels (checked from the
    header, before decoding) and ``MediaUnreadable`` for bytes that are not a whole image.
    """
    from PIL import Image, ImageOps

    try:
        source = Image.open(io.BytesIO(data), formats=_FORMATS)
        width, height = source.size
        if width * height > max_pixels:
            raise MediaTooLarge(_too_many_pixels(width, height, max_pixels))
        if max(width, height) > max_edge:
            # JPEG can decode at 1/2, 1/4 or 1/8 scale: far less memory for a big photo.
            source.draft(source.mode, (max_edge, max_edge))
        source.load()
        if _can_pass_through(source, data, max_edge):
            return PreparedImage(data, _MIME_OF_FORMAT[source.format or ""], width, height)
        ImageOps.exif_transpose(source, in_place=True)
        image = _to_png_or_jpeg_mode(source)
        image.thumbnail((max_edge, max_edge), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if image.mode == "RGBA":
            image.save(out, "PNG")
            mime: Mime = "image/png"
        else:
            image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
            mime = "image/jpeg"
    except Image.DecompressionBombError as exc:
        # Pillow's own, far higher limit, met before the header size could be checked.
        raise MediaTooLarge(_too_many_pixels(0, 0, max_pixels)) from exc
    # Pillow reports damaged or truncated files with any of these, depending on the format.
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise MediaUnreadable(_UNREADABLE) from exc
    return PreparedImage(out.getvalue(), mime, image.width, image.height)


def _can_pass_through(image: Image.Image, data: bytes, max_edge: int) -> bool:
    """Whether the original bytes are already what ``prepare_image`` would make."""
    return (
        image.format in _PLAIN_MODES
        and image.mode in _PLAIN_MODES[image.format]
        and len(data) <= PASS_THROUGH_BYTES
        and max(image.size) <= max_edge
        and not getattr(image, "is_animated", False)
        and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
    )


def _to_png_or_jpeg_mode(image: Image.Image) -> Image.Image:
    """Convert to RGBA if the image has visible transparency, else to RGB."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert() would clip 16-bit samples to 255 (a white image); scale them instead.
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    has_alpha = image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    lowest_alpha, _ = rgba.getchannel("A").getextrema()
    # Screenshots often carry an alpha channel that is opaque everywhere: JPEG is far smaller.
    return rgba.convert("RGB") if lowest_alpha == 255 else rgba


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    size = f" ({width} x {height})" if width and height else ""
    return (
        f"This image is too large for me{size}: I can open images of up to "
        f"{max_pixels:,} pixels. Please send a smaller one."
    )
