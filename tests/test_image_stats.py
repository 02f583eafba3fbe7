"""``images.image_stats`` on hand-made pictures whose statistics are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from loopline.images import STAT_NAMES, image_stats

COL = {name: i for i, name in enumerate(STAT_NAMES)}


def hwc(*images: np.ndarray) -> np.ndarray:
    return np.stack(images).astype(np.uint8)


def flat(rgb: tuple[int, int, int], size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy()


def test_columns_keep_the_first_five_where_they_were() -> None:
    assert STAT_NAMES[:5] == ("brightness", "contrast", "mean_r", "mean_g", "mean_b")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 20, 24, 3)).astype(np.uint8)
    stats = image_stats(x, channels_last=True)
    assert stats.shape == (4, 8) and stats.dtype == np.float32
    luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(stats[:, 0], luma.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats[:, 1], luma.std(axis=(1, 2)), rtol=1e-4)
    np.testing.assert_allclose(stats[:, 2:5], x.mean(axis=(1, 2)), rtol=1e-5)


def test_a_flat_image_has_no_sharpness_and_its_hue_s_saturation() -> None:
    stats = image_stats(hwc(flat((200, 100, 50)), flat((128, 128, 128))), channels_last=True)
    assert stats[:, COL["sharpness"]].tolist() == [0.0, 0.0]
    assert stats[0, COL["saturation"]] == pytest.approx(0.75)  # (200 - 50) / 200
    assert stats[1, COL["saturation"]] == 0.0  # grey
    assert stats[:, COL["dark_share"]].tolist() == [0.0, 0.0]


def test_a_black_image_is_all_dark_and_unsaturated() -> None:
    (row,) = image_stats(hwc(flat((0, 0, 0))), channels_last=True)
    assert row[COL["dark_share"]] == 1.0
    assert row[COL["saturation"]] == 0.0 and row[COL["sharpness"]] == 0.0
    assert row[COL["brightness"]] == 0.0


def test_dark_share_counts_pixels_under_40_luma() -> None:
    image = flat((255, 255, 255))
    image[:4] = 39  # a quarter of the rows just under the threshold
    image[4:8] = 40  # and a quarter exactly on it: not dark
    (row,) = image_stats(hwc(image), channels_last=True)
    assert row[COL["dark_share"]] == pytest.approx(0.25)


def test_sharpness_is_the_variance_of_the_laplacian() -> None:
    """A checkerboard: every interior pixel's 4-neighbour Laplacian is +-4 * 255."""
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(board[:, :, None], 3, axis=2)
    (row,) = image_stats(hwc(image), channels_last=True)
    assert row[COL["sharpness"]] == pytest.approx((4 * 255) ** 2, rel=1e-4)


def test_blur_lowers_sharpness() -> None:
    rng = np.random.default_rng(1)
    sharp = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    blurred = sharp.copy()
    for axis in (0, 1):  # a 3-tap box blur each way
        blurred = (np.roll(blurred, 1, axis) + blurred + np.roll(blurred, -1, axis)) / 3
    stats = image_stats(hwc(sharp, blurred), channels_last=True)
    assert stats[1, COL["sharpness"]] < stats[0, COL["sharpness"]] / 5


def test_channels_first_gives_the_same_numbers() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (3, 12, 9, 3)).astype(np.uint8)
    chw = x.transpose(0, 3, 1, 2).astype(np.float32)  # the server's model input
    np.testing.assert_allclose(
        image_stats(x, channels_last=True), image_stats(chw, channels_last=False), rtol=1e-4
    )


def test_tiny_and_empty_batches() -> None:
    assert image_stats(np.zeros((0, 8, 8, 3), np.uint8), channels_last=True).shape == (0, 8)
    (row,) = image_stats(np.full((1, 2, 2, 3), 90, np.uint8), channels_last=True)
    assert row[COL["sharpness"]] == 0.0  # no interior pixel to take a Laplacian at
    assert row[COL["brightness"]] == pytest.approx(90.0, abs=1e-3)


def test_the_server_logs_the_new_statistics_with_each_row() -> None:
    """``_describe`` (the batcher's last act on a batch) fills every row's new keys from
    the same computation, rounded to 3 decimals, for each job of the batch."""
    import asyncio
    import threading

    from loopline.deploy.runtime import InputStats, Job, _describe

    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (3, 3, 16, 16)).astype(np.float32)
    x[2] = 0.0  # a black frame
    loop = asyncio.new_event_loop()
    try:
        ready = threading.Event()
        jobs = [
            Job(None, x[:1], 1, None, "test", 0.0, loop, loop.create_future()),
            Job(None, x[1:], 2, None, "test", 0.0, loop, loop.create_future()),
        ]
        for job in jobs:
            job.stats = [InputStats(ready) for _ in range(job.n)]
        _describe(jobs, x, ready)
    finally:
        loop.close()
    assert ready.is_set()
    rows = [row for job in jobs for row in job.stats]
    want = image_stats(x, channels_last=False)
    for row, expected in zip(rows, want.tolist(), strict=True):
        for name in ("sharpness", "saturation", "dark_share"):
            assert row[name] == pytest.approx(expected[COL[name]], abs=1e-3)
            assert row[name] == round(row[name], 3)
    assert rows[2]["dark_share"] == 1.0 and rows[2]["saturation"] == 0.0
