"""Synthetic highway-CCTV data lake for the vehicle classifier example.

Writes ``out/images/<camera_id>/<condition>/<label>_<index>.png`` and ``out/manifest.csv``,
the layout the folder lake driver reads, so the example runs without downloading anything.
Classes differ by silhouette (proportions, wheels, windows), never by colour, so a small CNN
has to learn shapes; weather conditions are a real domain shift (a model trained on ``day``
does clearly worse on ``fog`` and ``night``), which is what the monitor and retrain loop show.
A small share of deliberate defects gives validation something to quarantine.
This module decides what each file is and writes it; :mod:`.scene` draws the pixels.

Output is a pure function of the arguments: image ``i`` draws only from
``numpy.random.default_rng([seed, i])``, so the same seed gives byte-identical files.

:func:`render_image` draws one labelled frame of a lake's camera on demand (the demo's
simulated CCTV traffic): the same cameras as the lake of that seed, from a random stream of
its own, so a production frame is never a copy of a lake file.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from loopline.errors import ConfigError
from loopline.examples.vehicles.scene import Camera, make_camera, render

CLASSES: tuple[str, ...] = ("car", "van", "truck", "bus", "motorcycle")
CONDITIONS: tuple[str, ...] = ("day", "night", "fog", "rain")
DEFECT_KINDS: tuple[str, ...] = ("corrupt", "truncated", "duplicate", "unlabelled", "too_small")
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "camera_id", "captured_at", "condition")
TOO_SMALL_SIZE = (16, 12)

_Row = tuple[str, str, str, str, str]  # one manifest row, in MANIFEST_COLUMNS order
_PROGRESS_EVERY = 50
_EPOCH = datetime(2024, 6, 3, tzinfo=UTC)
_HOURS = {"day": (8, 17), "night": (21, 29), "fog": (5, 10), "rain": (7, 20)}
_STREAM = 0x57EA  # render_image's random stream, apart from the lake's [seed, i]
_CAMERAS: dict[tuple[int, int, tuple[int, int]], Camera] = {}
_CAMERAS_LOCK = threading.Lock()


@dataclass
class LakeSummary:
    """What :func:`generate_lake` wrote.

    ``per_class`` counts manifest rows by label (unlabelled rows are not in it);
    ``per_condition`` counts every row; ``defects`` counts each kind of broken file.
    """

    out: Path
    images: int
    per_class: dict[str, int]
    per_condition: dict[str, int]
    defects: dict[str, int]


def generate_lake(
    out: Path,
    images: int = 5000,
    seed: int = 0,
    conditions: Sequence[str] = CONDITIONS,
    cameras: int = 4,
    image_size: tuple[int, int] = (96, 72),
    defect_rate: float = 0.03,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> LakeSummary:
    """Write a synthetic CCTV image lake with a manifest to ``out``.

    Labels, conditions and cameras are each dealt out evenly and shuffled independently.
    Defects (``DEFECT_KINDS``, about ``defect_rate * images``, at least one of each kind
    from 200 images on) are listed in the manifest like any other row.

    Args:
        out: Lake folder; created if missing. A previous lake there (one with a
            ``manifest.csv``) is refused unless ``overwrite``.
        images: Files to write in total, defects included.
        seed: Seed for everything; the same seed gives byte-identical output.
        conditions: Light/weather conditions to use, a subset of ``CONDITIONS``.
        cameras: Number of cameras; each has its own angle, tint and background.
        image_size: ``(width, height)`` in pixels.
        defect_rate: Share of deliberately broken files, in ``[0, 0.5]``.
        progress: Called with the number of files just written, for a progress bar.
        overwrite: Replace a previous lake in ``out`` (its manifest and images), so the
            folder holds exactly this generation. Files it did not write are never deleted.

    Returns:
        Counts of what was written.

    Raises:
        ConfigError: An argument is out of range, ``out`` is not a lake folder, or it holds
            a lake already and ``overwrite`` is false.
    """
    conds = _check_args(images, conditions, cameras, image_size, defect_rate)
    out = Path(out)
    _prepare_folder(out, overwrite)
    size = (int(image_size[0]), int(image_size[1]))
    master = np.random.default_rng(seed)
    labels = master.permutation(np.arange(images) % len(CLASSES))
    cond_ids = master.permutation(np.arange(images) % len(conds))
    cam_ids = master.permutation(np.arange(images) % cameras)
    defects, sources = _plan_defects(images, defect_rate, master)
    cams = [make_camera(seed, k, size) for k in range(cameras)]

    rows: dict[int, _Row] = {}
    pending = 0
    for i in range(images):
        kind = defects.get(i, "")
        if kind == "duplicate":
            continue
        label, cond, camera_id = CLASSES[labels[i]], conds[cond_ids[i]], _camera_id(cam_ids[i])
        rng = np.random.default_rng([seed, i])
        captured_at = _captured_at(i, images, cond, rng)
        name = "unlabelled" if kind == "unlabelled" else label
        rel = f"images/{camera_id}/{cond}/{name}_{i:05d}.png"
        _write(out / rel, _file_bytes(kind, label, cond, cams[cam_ids[i]], rng, size))
        rows[i] = (rel, "" if kind == "unlabelled" else label, camera_id, captured_at, cond)
        pending = _tick(progress, pending)
    for i, src in sources.items():  # exact copies of a normal file, under a new name
        rel_src, label, camera_id, captured_at, cond = rows[src]
        rel = f"images/{camera_id}/{cond}/{label}_{i:05d}.png"
        _write(out / rel, (out / rel_src).read_bytes())
        rows[i] = (rel, label, camera_id, captured_at, cond)
        pending = _tick(progress, pending)
    if progress is not None and pending:
        progress(pending)

    written = [rows[i] for i in sorted(rows)]
    _write_manifest(out / "manifest.csv", written)
    per_class = Counter(row[1] for row in written if row[1])
    per_condition = Counter(row[4] for row in written)
    kinds = Counter(defects.values())
    return LakeSummary(
        out=out,
        images=len(written),
        per_class={c: per_class[c] for c in CLASSES},
        per_condition={c: per_condition[c] for c in conds},
        defects={k: kinds[k] for k in DEFECT_KINDS},
    )


def render_image(
    seed: int,
    index: int,
    camera_index: int,
    condition: str,
    label: str,
    size: tuple[int, int] = (96, 72),
    image_format: str = "PNG",
) -> bytes:
    """One encoded frame of ``label`` seen by camera ``camera_index`` in ``condition``.

    The camera is the lake's (``generate_lake(seed=seed)`` names it
    ``camera_id(camera_index)``); the frame is a pure function of the arguments, drawn from
    a random stream apart from the lake's, so it never repeats a lake file. Safe to call
    from several threads (cameras are built once and shared read-only).

    Args:
        seed: The lake's seed (which cameras).
        index: Which frame; another index gives another vehicle, pose and noise.
        camera_index: 0-based camera number.
        condition: One of ``CONDITIONS``.
        label: One of ``CLASSES``.
        size: ``(width, height)`` in pixels.
        image_format: ``PNG`` or ``JPEG``.

    Raises:
        ConfigError: An unknown condition, label or format, or an argument out of range.
    """
    if camera_index < 0 or index < 0:
        raise ConfigError(f"camera_index and index must be >= 0, got {camera_index}, {index}")
    _check_args(1, [condition], camera_index + 1, size, 0.0)
    if label not in CLASSES:
        raise ConfigError(f"unknown label {label!r}; allowed: {', '.join(CLASSES)}")
    if image_format not in ("PNG", "JPEG"):
        raise ConfigError(f"unknown image format {image_format!r}; allowed: PNG, JPEG")
    size = (int(size[0]), int(size[1]))
    camera = _camera(seed, camera_index, size)
    rng = np.random.default_rng([seed, _STREAM, camera_index, index])
    buf = io.BytesIO()
    image = Image.fromarray(render(label, condition, camera, rng, size))
    if image_format == "PNG":
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def camera_id(camera_index: int) -> str:
    """The lake's name of camera ``camera_index`` (0-based): ``cam01``, ``cam02``, ..."""
    return _camera_id(camera_index)


def _camera(seed: int, k: int, size: tuple[int, int]) -> Camera:
    key = (int(seed), int(k), size)
    with _CAMERAS_LOCK:
        camera = _CAMERAS.get(key)
        if camera is None:
            camera = _CAMERAS[key] = make_camera(seed, k, size)
    return camera


def _check_args(
    images: int,
    conditions: Sequence[str],
    cameras: int,
    image_size: tuple[int, int],
    defect_rate: float,
) -> tuple[str, ...]:
    """Validate arguments; return the conditions without repeats, in the given order."""
    conds = tuple(dict.fromkeys([conditions] if isinstance(conditions, str) else conditions))
    allowed = ", ".join(CONDITIONS)
    if not conds:
        raise ConfigError(f"conditions is empty; allowed: {allowed}")
    for cond in conds:
        if cond not in CONDITIONS:
            raise ConfigError(f"unknown condition {cond!r}; allowed: {allowed}")
    if images < 1:
        raise ConfigError(f"images must be at least 1, got {images}")
    if cameras < 1:
        raise ConfigError(f"cameras must be at least 1, got {cameras}")
    if not 0.0 <= defect_rate <= 0.5:
        raise ConfigError(f"defect_rate must be between 0 and 0.5, got {defect_rate}")
    if image_size[0] < 32 or image_size[1] < 24:
        raise ConfigError(f"image_size (width, height) must be at least 32x24, got {image_size}")
    return conds


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """Create ``out``, or clear the previous lake in it; never delete files it did not write."""
    manifest, images = out / "manifest.csv", out / "images"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the lake needs a folder")
    if manifest.exists() and not overwrite:
        raise ConfigError(
            f"{out} already holds a lake (manifest.csv and images/); refusing to delete it: "
            "choose another folder, or replace it with --force (overwrite=True)"
        )
    if manifest.exists():
        shutil.rmtree(images, ignore_errors=True)
        manifest.unlink()
    elif images.is_dir() and any(images.iterdir()):
        raise ConfigError(
            f"{out} holds an images/ folder but no manifest.csv; "
            "choose an empty folder or a previous lake to overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)


def _plan_defects(
    images: int, defect_rate: float, rng: np.random.Generator
) -> tuple[dict[int, str], dict[int, int]]:
    """Pick the defect indices and kinds, and the normal image each duplicate copies."""
    count = round(defect_rate * images)
    if defect_rate > 0 and images >= 200:
        count = max(count, len(DEFECT_KINDS))
    count = min(count, images // 2)
    chosen = rng.choice(images, size=count, replace=False).tolist()
    defects = {i: DEFECT_KINDS[k % len(DEFECT_KINDS)] for k, i in enumerate(chosen)}
    normal = [i for i in range(images) if i not in defects]
    sources = {
        i: normal[rng.integers(len(normal))]
        for i, kind in sorted(defects.items())
        if kind == "duplicate"
    }
    return defects, sources


def _file_bytes(
    kind: str,
    label: str,
    condition: str,
    camera: Camera,
    rng: np.random.Generator,
    size: tuple[int, int],
) -> bytes:
    """Encode one image, broken as ``kind`` says (an empty ``kind`` is a normal file)."""
    if kind == "corrupt":
        return rng.bytes(int(rng.integers(256, 4096)))
    image = Image.fromarray(render(label, condition, camera, rng, size))
    if kind == "too_small":
        image = image.resize(TOO_SMALL_SIZE, Image.Resampling.BOX)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # level 1: twice as fast, files ~5% larger
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_manifest(path: Path, rows: list[_Row]) -> None:
    """Write the manifest atomically, so a crash never leaves half a manifest."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, path)


def _tick(progress: Callable[[int], None] | None, pending: int) -> int:
    """Report progress in batches: a call per image would slow a rich progress bar."""
    pending += 1
    if progress is not None and pending >= _PROGRESS_EVERY:
        progress(pending)
        return 0
    return pending


def _camera_id(k: int) -> str:
    return f"cam{int(k) + 1:02d}"


def _captured_at(i: int, images: int, condition: str, rng: np.random.Generator) -> str:
    """A UTC time over four weeks in index order, at an hour that fits the condition."""
    lo, hi = _HOURS[condition]
    when = _EPOCH + timedelta(days=i * 28 // images, seconds=int(rng.uniform(lo, hi) * 3600))
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
