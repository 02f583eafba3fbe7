"""loopline.images: JPEG and PNG only, the pixel count checked from the header, image stats."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from loopline.bundle import PreprocessSpec, decode_image
from loopline.errors import ImageTooLarge, InvalidInput, UnsupportedImage
from loopline.images import (
    DEFAULT_MAX_PIXELS,
    PILLOW_MAX_PIXELS,
    image_stats,
    open_image,
    sniff_format,
)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header (IHDR) claims ``width`` x ``height`` pixels: a bomb."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def encoded(fmt: str, size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def test_the_default_limit_fits_a_4k_frame_in_either_orientation() -> None:
    assert 3840 * 2160 <= 4096 * 2160 <= DEFAULT_MAX_PIXELS
    assert open_image(png_declaring(4096, 2160), max_pixels=DEFAULT_MAX_PIXELS).size == (4096, 2160)
    assert open_image(png_declaring(2160, 4096), max_pixels=DEFAULT_MAX_PIXELS).size == (2160, 4096)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [13000, 14000])
def test_a_bomb_is_refused_from_its_header(side: int) -> None:
    # 13000² is under Pillow's own bomb limit (and takes seconds and 500 MB to decode);
    # 14000² is over it (Pillow raises its own DecompressionBombError). Both are 413s.
    bomb = png_declaring(side, side)
    assert len(bomb) < 100
    with pytest.raises(ImageTooLarge, match="too many pixels") as err:
        open_image(bomb, max_pixels=DEFAULT_MAX_PIXELS)
    assert err.value.status_code == 413
    assert f"{DEFAULT_MAX_PIXELS:,}" in str(err.value)
    spec = PreprocessSpec(height=8, width=8)
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, spec, max_pixels=DEFAULT_MAX_PIXELS)


def test_no_limit_goes_past_pillows_own() -> None:
    assert PILLOW_MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # Loopline leaves Pillow's as it is
    from pydantic import ValidationError

    from loopline.deploy.settings import ServeSettings

    assert ServeSettings(max_image_pixels=PILLOW_MAX_PIXELS).max_image_pixels == PILLOW_MAX_PIXELS
    with pytest.raises(ValidationError):
        ServeSettings(max_image_pixels=PILLOW_MAX_PIXELS + 1)


def test_the_limit_is_the_callers() -> None:
    png = encoded("PNG", (40, 30))
    assert open_image(png, max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageTooLarge, match="40x30 is 1,200 pixels, at most 1,199"):
        open_image(png, max_pixels=1199)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "QOI", "TGA", "DDS", "WEBP", "PPM", "ICO"])
def test_only_jpeg_and_png_are_opened(fmt: str) -> None:
    data = encoded(fmt)
    assert Image.open(io.BytesIO(data)).format is not None  # Pillow itself would open it
    with pytest.raises(UnsupportedImage, match="not a JPEG or PNG file") as err:
        open_image(data)
    assert err.value.status_code == 415
    with pytest.raises(UnsupportedImage):
        decode_image(data, PreprocessSpec(height=8, width=8))


def test_jpeg_and_png_are_recognised_by_their_first_bytes() -> None:
    assert sniff_format(encoded("PNG")) == "PNG"
    assert sniff_format(encoded("JPEG")) == "JPEG"
    assert sniff_format(b"\x89PNG") is None  # too short to be a PNG signature
    assert sniff_format(b"") is None


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_file_is_a_plain_400(fmt: str) -> None:
    data = encoded(fmt, (64, 48))
    spec = PreprocessSpec(height=8, width=8)
    for cut in (len(data) // 2, 20):
        with pytest.raises(InvalidInput, match="cannot decode image") as err:
            decode_image(data[:cut], spec)
        assert err.value.status_code == 400


def test_image_stats() -> None:
    pixels = np.zeros((2, 4, 4, 3), np.uint8)
    pixels[1] = 255
    pixels[1, :2, :, :] = 0
    stats = image_stats(pixels, channels_last=True)
    assert stats[0, :5].tolist() == [0, 0, 0, 0, 0]  # tests/test_image_stats.py: the rest
    assert stats[1, 0] == pytest.approx(127.5, abs=0.1)
    assert stats[1, 1] == pytest.approx(127.5, abs=0.1)
    chw = image_stats(pixels.transpose(0, 3, 1, 2), channels_last=False)
    np.testing.assert_allclose(stats, chw, rtol=1e-5)
