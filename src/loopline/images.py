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


# Columns of ``image_stats``, in order. The first five were there first: callers index them.
STAT_NAMES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "mean_r",
    "mean_g",
    "mean_b",
    "sharpness",
    "saturation",
    "dark_share",
)
DARK_LUMA = 40.0  # a luma under this counts as a dark pixel (night, underexposure)


def image_stats(pixels: np.ndarray, channels_last: bool) -> np.ndarray:
    """Cheap per-image statistics, the columns of ``STAT_NAMES``.

    brightness and contrast are the mean and spread of luma; then mean R, G, B; sharpness
    is the variance of the 4-neighbour Laplacian of luma (blur and fog lower it);
    saturation the mean of (max - min) / max over the channels (0 for grey pixels);
    dark_share the share of pixels whose luma is under 40. ``pixels`` is [N, H, W, 3]
    (channels last) or [N, 3, H, W]; values 0..255. Returns float32 [N, 8].
    """
    x = pixels.astype(np.float32, copy=False)
    n = len(x)
    if n == 0:
        return np.zeros((0, len(STAT_NAMES)), dtype=np.float32)
    # einsum sums: several times faster than mean/std here, and this runs on every
    # served batch. float32 sums of a 224 x 224 image stay within ~1e-4 of float64 ones.
    if channels_last:
        size = x.shape[1] * x.shape[2]
        means = np.einsum("nhwc->nc", x) / max(size, 1)
        luma = np.einsum("nhwc,c->nhw", x, _LUMA)
        channels = (x[..., 0], x[..., 1], x[..., 2])
    else:
        size = x.shape[2] * x.shape[3]
        means = np.einsum("nchw->nc", x) / max(size, 1)
        luma = np.einsum("c,nchw->nhw", _LUMA, x)
        channels = (x[:, 0], x[:, 1], x[:, 2])
    flat = luma.reshape(n, -1)
    brightness, spread = _mean_std(flat)
    saturation = _saturation(*channels).reshape(n, -1)
    return np.column_stack(
        [
            brightness,
            spread,
            means,
            _laplacian_variance(luma),
            np.einsum("ni->n", saturation) / max(size, 1),
            np.count_nonzero(flat < DARK_LUMA, axis=1) / max(size, 1),
        ]
    ).astype(np.float32, copy=False)


def _mean_std(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row means and (population) standard deviations of a 2-D array."""
    count = max(flat.shape[1], 1)
    mean = np.einsum("ni->n", flat) / count
    var = np.einsum("ni,ni->n", flat, flat) / count - mean * mean
    return mean, np.sqrt(np.maximum(var, 0.0))


def _laplacian_variance(luma: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian over each image's interior pixels."""
    n, h, w = luma.shape
    if h < 3 or w < 3:  # no interior pixel: nothing to measure
        return np.zeros(n, dtype=np.float32)
    # On the flattened image the neighbours are contiguous slices (faster than 2-D ones);
    # the first and last columns, whose left/right neighbours wrap around, are dropped.
    flat = luma.reshape(n, -1)
    end = (h - 1) * w
    lap = flat[:, w:end] * 4.0
    lap -= flat[:, : end - w]
    lap -= flat[:, 2 * w :]
    lap -= flat[:, w - 1 : end - 1]
    lap -= flat[:, w + 1 : end + 1]
    inner = lap.reshape(n, h - 2, w)[:, :, 1:-1]
    count = (h - 2) * (w - 2)
    mean = np.einsum("nhw->n", inner) / count
    var = np.einsum("nhw,nhw->n", inner, inner) / count - mean * mean
    return np.maximum(var, 0.0)


def _saturation(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """HSV saturation per pixel: (max - min) / max, 0 where max is 0 (black)."""
    high = np.maximum(r, g)
    np.maximum(high, b, out=high)
    low = np.minimum(r, g)
    np.minimum(low, b, out=low)
    np.subtract(high, low, out=low)
    np.maximum(high, 1e-6, out=high)  # a black pixel has spread 0, hence saturation 0
    return np.divide(low, high, out=low)
