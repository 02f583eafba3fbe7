"""Tests for the synthetic CCTV lake generator: layout, determinism, defects, domain shift."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from loopline.errors import ConfigError
from loopline.examples.vehicles.datagen import (
    CLASSES,
    CONDITIONS,
    DEFECT_KINDS,
    MANIFEST_COLUMNS,
    LakeSummary,
    generate_lake,
)


def read_manifest(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def image_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "images").rglob("*") if p.is_file())


def classify(path: Path) -> str:
    """What a file is, judged only by decoding it: corrupt, truncated, too_small or ok."""
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        return "corrupt"
    try:
        image.load()
    except OSError:
        return "truncated"
    return "too_small" if image.size == (16, 12) else "ok"


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LakeSummary]:
    """One lake with defects, shared by the read-only tests (generating it takes ~1 s)."""
    out = tmp_path_factory.mktemp("lake")
    return out, generate_lake(out, images=250, seed=7, cameras=3, defect_rate=0.04)


def test_manifest_has_the_columns_and_one_row_per_file(lake: tuple[Path, LakeSummary]) -> None:
    out, summary = lake
    columns, rows = read_manifest(out)
    assert tuple(columns) == MANIFEST_COLUMNS
    assert len(rows) == summary.images == 250
    assert sorted(out / r["path"] for r in rows) == image_files(out)
    pattern = re.compile(r"images/(cam\d\d)/(\w+)/(\w+)_(\d{5})\.png")
    for row in rows:
        match = pattern.fullmatch(row["path"])
        assert match, row["path"]
        assert match.group(1) == row["camera_id"]
        assert match.group(2) == row["condition"] in CONDITIONS
        assert row["label"] in (*CLASSES, "")
        stamp = datetime.fromisoformat(row["captured_at"].replace("Z", "+00:00"))
        assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0


def test_normal_images_are_png_of_the_requested_size(lake: tuple[Path, LakeSummary]) -> None:
    out, _ = lake
    _, rows = read_manifest(out)
    sizes = Counter()
    for row in rows:
        if classify(out / row["path"]) == "ok":
            with Image.open(out / row["path"]) as image:
                sizes[(image.format, image.mode, image.size)] += 1
    assert list(sizes) == [("PNG", "RGB", (96, 72))]


def test_every_condition_camera_and_class_is_present_and_balanced(
    lake: tuple[Path, LakeSummary],
) -> None:
    out, summary = lake
    _, rows = read_manifest(out)
    cameras = Counter(r["camera_id"] for r in rows)
    conditions = Counter(r["condition"] for r in rows)
    assert sorted(cameras) == ["cam01", "cam02", "cam03"]
    assert sorted(conditions) == sorted(CONDITIONS)
    # Dealt out evenly; duplicates copy another row's label, condition and camera.
    slack = summary.defects["duplicate"] + summary.defects["unlabelled"] + 1
    assert max(cameras.values()) - min(cameras.values()) <= slack
    assert max(conditions.values()) - min(conditions.values()) <= slack
    assert max(summary.per_class.values()) - min(summary.per_class.values()) <= slack
    assert summary.per_condition == dict(conditions)


def test_defects_are_present_and_of_the_right_kind(lake: tuple[Path, LakeSummary]) -> None:
    out, summary = lake
    _, rows = read_manifest(out)
    assert set(summary.defects) == set(DEFECT_KINDS)
    assert all(n >= 1 for n in summary.defects.values()), summary.defects
    assert sum(summary.defects.values()) == 10  # 4% of 250

    kinds = Counter(classify(out / r["path"]) for r in rows)
    for kind in ("corrupt", "truncated", "too_small"):
        assert kinds[kind] == summary.defects[kind], kind
    assert sum(1 for r in rows if r["label"] == "") == summary.defects["unlabelled"]

    by_digest: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        digest = hashlib.sha256((out / row["path"]).read_bytes()).hexdigest()
        by_digest.setdefault(digest, []).append(row)
    copies = [group for group in by_digest.values() if len(group) > 1]
    assert sum(len(group) - 1 for group in copies) == summary.defects["duplicate"]
    for group in copies:
        assert len({r["path"] for r in group}) == len(group)
        assert len({(r["label"], r["camera_id"], r["condition"]) for r in group}) == 1
        assert group[0]["label"] in CLASSES


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((first, 3), (second, 3), (other, 4)):
        generate_lake(out, images=60, seed=seed, defect_rate=0.05)
    assert (first / "manifest.csv").read_bytes() == (second / "manifest.csv").read_bytes()
    files = [p.relative_to(first) for p in image_files(first)]
    assert files == [p.relative_to(second) for p in image_files(second)]
    assert all((first / p).read_bytes() == (second / p).read_bytes() for p in files)
    assert (first / "manifest.csv").read_bytes() != (other / "manifest.csv").read_bytes()
    other_bytes = {p.read_bytes() for p in image_files(other)}
    assert not other_bytes & {(first / p).read_bytes() for p in files}


def test_a_previous_lake_is_kept_unless_overwrite(tmp_path: Path) -> None:
    generate_lake(tmp_path, images=30, seed=1)
    before = {p: p.read_bytes() for p in image_files(tmp_path)}
    manifest = (tmp_path / "manifest.csv").read_bytes()
    with pytest.raises(ConfigError, match="already holds a lake"):
        generate_lake(tmp_path, images=10, seed=2)
    assert {p: p.read_bytes() for p in image_files(tmp_path)} == before
    assert (tmp_path / "manifest.csv").read_bytes() == manifest


def test_a_previous_lake_is_replaced_not_merged(tmp_path: Path) -> None:
    generate_lake(tmp_path, images=70, seed=1)
    summary = generate_lake(
        tmp_path, images=40, seed=2, conditions=["fog"], cameras=2, overwrite=True
    )
    _, rows = read_manifest(tmp_path)
    assert len(rows) == summary.images == 40
    assert sorted(tmp_path / r["path"] for r in rows) == image_files(tmp_path)
    assert {r["condition"] for r in rows} == {"fog"}
    assert summary.per_condition == {"fog": 40}


def test_a_folder_with_foreign_images_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "holiday.png").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="no manifest.csv"):
        generate_lake(tmp_path, images=10)
    assert (tmp_path / "images" / "holiday.png").exists()


def test_progress_reports_every_file_once(tmp_path: Path) -> None:
    calls: list[int] = []
    generate_lake(tmp_path, images=123, progress=calls.append, defect_rate=0.05)
    assert sum(calls) == 123
    assert all(n > 0 for n in calls)


def test_image_size_is_honoured(tmp_path: Path) -> None:
    generate_lake(tmp_path, images=10, image_size=(64, 48), defect_rate=0)
    _, rows = read_manifest(tmp_path)
    for row in rows:
        with Image.open(tmp_path / row["path"]) as image:
            assert image.size == (64, 48)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conditions": ["day", "snow"]}, "unknown condition 'snow'; allowed: day, night"),
        ({"conditions": []}, "conditions is empty"),
        ({"images": 0}, "images must be at least 1, got 0"),
        ({"cameras": 0}, "cameras must be at least 1, got 0"),
        ({"defect_rate": 0.6}, "defect_rate must be between 0 and 0.5, got 0.6"),
        ({"defect_rate": -0.1}, "defect_rate must be between 0 and 0.5, got -0.1"),
        ({"image_size": (16, 12)}, "image_size"),
    ],
)
def test_bad_arguments_raise_config_error(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        generate_lake(tmp_path / "lake", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "lake").exists()


def test_night_fog_and_rain_shift_the_pixel_statistics(tmp_path: Path) -> None:
    """Without torch: night is dark and blue, fog washed out and blurred, rain darker."""
    generate_lake(tmp_path, images=160, seed=5, defect_rate=0)
    _, rows = read_manifest(tmp_path)
    stats: dict[str, list[tuple[float, float, float, float]]] = {}
    for row in rows:
        rgb = np.asarray(Image.open(tmp_path / row["path"]), dtype=np.float32) / 255
        grey = rgb.mean(axis=2)
        sharpness = float(np.abs(np.diff(grey, axis=1)).mean())
        blue = float(rgb[..., 2].mean() - rgb[..., 0].mean())
        stats.setdefault(row["condition"], []).append(
            (float(grey.mean()), float(grey.std()), blue, sharpness)
        )
    mean = {c: np.mean(v, axis=0) for c, v in stats.items()}
    day, night, fog, rain = (mean[c] for c in ("day", "night", "fog", "rain"))
    assert night[0] < 0.5 * day[0]  # very dark
    assert night[1] < 0.6 * day[1]  # low contrast
    assert night[2] > day[2] + 0.05  # blue cast
    assert fog[0] > day[0]  # toward light grey
    assert fog[1] < 0.6 * day[1]  # washed out
    assert fog[3] < 0.6 * day[3]  # blurred
    assert rain[0] < 0.85 * day[0]  # darker
