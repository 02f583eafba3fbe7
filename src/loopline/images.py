"""Images as Loopline accepts them: JPEG or PNG only, sized from the header, and cheap stats.

Training (decoding the lake), serving (decoding a camera's upload) and drift detection
(statistics of training and production images) all use this module, so each sees the same
rules and the same numbers. ``import loopline`` and ``loopline --help`` do not import it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from loopline.errors import ImageTooLarge, InvalidInput, UnsupportedImage

FORMATS = ("JPEG", "PNG")
# 4096 x 4096: a 4K frame (3840 x 2160 or 4096 x 2160) fits in either orientation.
DEFAULT_MAX_PIXELS = 4096 * 4096
# Pillow's own warning threshold (Image.MAX_IMAGE_PIXELS, left as it is): a limit above it
# would have Pillow warn about, and from twice it refuse, images the limit allows.
PILLOW_MAX_PIXELS = 89_478_485
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
# ITU-R BT.601 luma weights: brightness and contrast are the mean and spread of luma.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def sniff_format(data: bytes) -> str | None:
    """``"JPEG"`` or ``"PNG"`` from the first bytes of ``data``; None for anything else."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def open_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Open JPEG or PNG bytes lazily: the header is read, no pixel is decoded yet.

    Raises UnsupportedImage (any other format), InvalidInput (an unreadable header) and
    ImageTooLarge (the header declares more than ``max_pixels`` pixels, or more than
    Pillow's own decompression-bomb limit), all before anything is decoded. Decoding errors
    surface later, from ``load()``.
    """
    kind = sniff_format(data)
    if kind is None:
        raise UnsupportedImage(
            f"cannot decode image: not a JPEG or PNG file (it starts with {bytes(data[:8])!r}); "
            "send JPEG or PNG"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # over twice Pillow's own limit
        bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        limit = max_pixels if max_pixels is not None else bomb
        raise ImageTooLarge(
            f"too many pixels: the header declares more than {bomb:,}, "
            f"at most {limit:,} are accepted"
        ) from None
    except UnidentifiedImageError:
        raise InvalidInput(f"cannot decode image: its {kind} header is unreadable") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageTooLarge(
            f"too many pixels: {width}x{height} is {width * height:,} pixels, "
            f"at most {max_pixels:,} are accepted"
        )
    return img


def image_stats(pixels: np.ndarray, channels_last: bool) -> np.ndarray:
    """Cheap per-image statistics: brightness, contrast (luma mean, std), mean R, G, B.

    ``pixels`` is [N, H, W, 3] (channels last) or [N, 3, H, W]; values 0..255. Returns
    float32 [N, 5].
    """
    x = pixels.astype(np.float32, copy=False)
    if channels_last:
        means = x.mean(axis=(1, 2))
        luma = x @ _LUMA
    else:
        means = x.mean(axis=(2, 3))
        luma = np.tensordot(_LUMA, x, axes=([0], [1]))
    flat = luma.reshape(len(x), -1)
    return np.column_stack([flat.mean(axis=1), flat.std(axis=1), means])
