"""Images become upright PNGs or JPEGs of bounded size that a vision model accepts."""

from __future__ import annotations

import base64
import io
import os

import pytest
from PIL import Image

from bot.errors import MediaTooLarge, MediaUnreadable
from bot.media.images import PreparedImage, prepare_image
from tests.media_fixtures import RED, WHITE, make_gif, make_jpeg, make_png, two_tone

BLUE = (20, 40, 220)


def opened(prepared: PreparedImage) -> Image.Image:
    """The prepared bytes as Pillow sees them, checked against what ``prepared`` claims."""
    image = Image.open(io.BytesIO(prepared.data))
    image.load()
    assert Image.MIME[image.format or ""] == prepared.mime
    assert image.size == (prepared.width, prepared.height)
    return image


def close_to(actual: object, expected: tuple[int, ...], tolerance: int = 12) -> bool:
    assert isinstance(actual, tuple)
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def encoded(image: Image.Image, image_format: str) -> bytes:
    out = io.BytesIO()
    image.save(out, image_format)
    return out.getvalue()


def test_large_png_is_shrunk_to_a_long_edge_of_2048_keeping_its_aspect() -> None:
    prepared = prepare_image(make_png(4000, 1000))

    assert (prepared.width, prepared.height) == (2048, 512)
    assert opened(prepared).size == (2048, 512)


def test_tall_image_is_bounded_by_its_height() -> None:
    prepared = prepare_image(make_jpeg(1000, 3000), max_edge=1024)

    assert (prepared.width, prepared.height) == (341, 1024)


def test_small_image_is_not_upscaled() -> None:
    prepared = prepare_image(make_gif(30, 20), max_edge=2048)

    assert (prepared.width, prepared.height) == (30, 20)


def test_small_jpeg_passes_through_unchanged() -> None:
    original = make_jpeg(64, 48)

    prepared = prepare_image(original)

    assert prepared.data == original
    assert (prepared.mime, prepared.width, prepared.height) == ("image/jpeg", 64, 48)


def test_small_png_passes_through_unchanged() -> None:
    original = make_png(64, 48)

    prepared = prepare_image(original)

    assert prepared.data == original
    assert prepared.mime == "image/png"


def test_heavy_file_within_the_edge_is_recompressed_as_jpeg() -> None:
    noise = Image.frombytes("RGB", (1000, 1000), os.urandom(3_000_000))
    original = encoded(noise, "PNG")
    assert len(original) > 1_500_000

    prepared = prepare_image(original)

    assert prepared.mime == "image/jpeg"
    assert (prepared.width, prepared.height) == (1000, 1000)
    assert len(prepared.data) < len(original)


def test_transparent_png_stays_png_with_its_alpha() -> None:
    prepared = prepare_image(make_png(3000, 1000, alpha=True))

    image = opened(prepared)
    assert prepared.mime == "image/png"
    assert image.mode == "RGBA"
    assert image.getpixel((10, 10))[3] == 128  # type: ignore[index]


def test_small_transparent_png_keeps_its_alpha() -> None:
    prepared = prepare_image(make_png(alpha=True))

    assert prepared.mime == "image/png"
    assert opened(prepared).mode == "RGBA"


def test_rgba_screenshot_with_no_transparent_pixel_becomes_jpeg() -> None:
    screenshot = two_tone(3000, 2000, RED, "RGBA")

    prepared = prepare_image(encoded(screenshot, "PNG"))

    assert prepared.mime == "image/jpeg"
    assert (prepared.width, prepared.height) == (2048, 1365)


def test_cmyk_jpeg_becomes_an_rgb_jpeg() -> None:
    prepared = prepare_image(make_jpeg(64, 48, mode="CMYK"))

    image = opened(prepared)
    assert prepared.mime == "image/jpeg"
    assert image.mode == "RGB"
    assert close_to(image.getpixel((5, 5)), RED, tolerance=40)


def test_palette_gif_becomes_a_jpeg_pillow_opens() -> None:
    prepared = prepare_image(make_gif(64, 48, colors=[BLUE]))

    image = opened(prepared)
    assert prepared.mime == "image/jpeg"
    assert close_to(image.getpixel((32, 24)), BLUE, tolerance=20)


def test_gif_with_a_transparent_colour_becomes_png() -> None:
    image = Image.new("P", (40, 30), 0)
    image.putpalette([*RED, *WHITE])
    image.paste(1, (0, 0, 20, 30))

    out = io.BytesIO()
    image.save(out, "GIF", transparency=1)
    prepared = prepare_image(out.getvalue())

    result = opened(prepared)
    assert prepared.mime == "image/png"
    assert result.convert("RGBA").getpixel((5, 5))[3] == 0  # type: ignore[index]
    assert result.convert("RGBA").getpixel((35, 5)) == (*RED, 255)


def test_animated_gif_gives_its_first_frame() -> None:
    prepared = prepare_image(make_gif(64, 48, colors=[RED, BLUE, WHITE]))

    image = opened(prepared)
    assert getattr(image, "n_frames", 1) == 1
    assert close_to(image.convert("RGB").getpixel((32, 24)), RED, tolerance=20)


def test_animated_webp_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (64, 48), color) for color in (BLUE, RED)]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], lossless=True)

    prepared = prepare_image(out.getvalue())

    assert prepared.mime == "image/jpeg"
    assert close_to(opened(prepared).getpixel((32, 24)), BLUE, tolerance=20)


def test_multi_picture_jpeg_from_a_camera_gives_its_first_picture() -> None:
    pictures = [Image.new("RGB", (64, 48), color) for color in (RED, BLUE)]
    out = io.BytesIO()
    pictures[0].save(out, "MPO", save_all=True, append_images=pictures[1:])

    prepared = prepare_image(out.getvalue())

    assert prepared.mime == "image/jpeg"
    assert close_to(opened(prepared).getpixel((32, 24)), RED, tolerance=20)


def test_bmp_becomes_jpeg() -> None:
    prepared = prepare_image(encoded(two_tone(64, 48, RED), "BMP"))

    assert (prepared.mime, prepared.width, prepared.height) == ("image/jpeg", 64, 48)


def test_postscript_is_not_opened_so_ghostscript_never_runs() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"

    with pytest.raises(MediaUnreadable):
        prepare_image(eps)


def test_photo_rotated_by_exif_comes_out_upright_with_swapped_width_and_height() -> None:
    # Orientation 6: the camera was turned a quarter right, so the stored left half is on top.
    prepared = prepare_image(make_jpeg(64, 48, orientation=6))

    image = opened(prepared)
    assert (prepared.width, prepared.height) == (48, 64)
    assert close_to(image.getpixel((24, 5)), RED, tolerance=40)
    assert close_to(image.getpixel((24, 58)), WHITE, tolerance=40)
    assert image.getexif().get(0x0112, 1) == 1


def test_large_rotated_photo_is_shrunk_after_turning_upright() -> None:
    prepared = prepare_image(make_jpeg(4000, 3000, orientation=6))

    assert (prepared.width, prepared.height) == (1536, 2048)


def test_sixteen_bit_greyscale_png_keeps_its_shades() -> None:
    # Converting 16-bit samples naively clips them all to white.
    grey = Image.new("I;16", (3000, 100), 32768)

    prepared = prepare_image(encoded(grey, "PNG"))

    shade = opened(prepared).convert("L").getpixel((10, 10))
    assert isinstance(shade, int)
    assert 120 <= shade <= 136


@pytest.mark.parametrize(
    "data",
    [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["empty", "text", "png-signature-only"],
)
def test_bytes_that_are_not_an_image_are_unreadable(data: bytes) -> None:
    with pytest.raises(MediaUnreadable, match="could not read this image"):
        prepare_image(data)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_image_cut_short_in_transit_is_unreadable(image_format: str) -> None:
    # Noise, so that the second half of the file holds pixel data the decoder misses.
    noise = Image.frombytes("RGB", (300, 200), os.urandom(180_000))
    whole = encoded(noise, image_format)

    with pytest.raises(MediaUnreadable):
        prepare_image(whole[: len(whole) // 2])


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(MediaTooLarge, match=r"1,000 pixels"):
        prepare_image(make_png(100, 100), max_pixels=1000)


def test_data_url_round_trips_to_the_same_bytes() -> None:
    prepared = prepare_image(make_png(4000, 1000))

    url = prepared.data_url()

    header, _, payload = url.partition(",")
    assert header == "data:image/jpeg;base64"
    assert base64.b64decode(payload) == prepared.data
