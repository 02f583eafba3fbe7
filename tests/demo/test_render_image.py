"""``datagen.render_image``: one labelled frame of a lake's camera, on demand."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loopline.errors import ConfigError
from loopline.examples.vehicles.datagen import generate_lake, render_image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255


def test_frames_are_pure_functions_of_their_arguments() -> None:
    a = render_image(0, 7, 1, "day", "bus")
    assert a == render_image(0, 7, 1, "day", "bus")
    assert a != render_image(0, 8, 1, "day", "bus")
    assert a != render_image(0, 7, 2, "day", "bus")
    assert a != render_image(1, 7, 1, "day", "bus")
    image = Image.open(io.BytesIO(a))
    assert (image.format, image.size) == ("PNG", (96, 72))
    jpeg = Image.open(io.BytesIO(render_image(0, 7, 1, "fog", "car", (64, 48), "JPEG")))
    assert (jpeg.format, jpeg.size) == ("JPEG", (64, 48))


def test_the_camera_is_the_lakes_and_the_frame_no_copy_of_a_lake_file(tmp_path: Path) -> None:
    generate_lake(tmp_path, images=40, seed=0, conditions=["day"], cameras=2, defect_rate=0)
    lake = {p.read_bytes() for p in (tmp_path / "images").rglob("*.png")}
    frames = [render_image(0, i, i % 2, "day", "car") for i in range(40)]
    assert not lake & set(frames)
    # Same camera: the frames share its background (the top rows, sky and horizon, are
    # mostly the same); another seed's camera has another background.
    same = np.abs(pixels(frames[0])[:10] - pixels(frames[2])[:10]).mean()
    other = np.abs(pixels(frames[0])[:10] - pixels(render_image(9, 0, 0, "day", "car"))[:10])
    assert same < 0.5 * other.mean()


def test_conditions_shift_the_pixels_as_in_the_lake() -> None:
    mean = {
        c: np.mean([pixels(render_image(0, i, i % 4, c, "van")).mean() for i in range(20)])
        for c in ("day", "night", "fog")
    }
    assert mean["night"] < 0.5 * mean["day"] and mean["fog"] > mean["day"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0, 0, "snow", "car"), "unknown condition 'snow'"),
        ((0, 0, 0, "day", "tractor"), "unknown label 'tractor'"),
        ((0, -1, 0, "day", "car"), "must be >= 0"),
        ((0, 0, -1, "day", "car"), "must be >= 0"),
    ],
)
def test_bad_arguments_raise_config_error(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        render_image(*args)  # type: ignore[arg-type]
