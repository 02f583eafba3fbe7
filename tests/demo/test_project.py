"""The demo folder: made fresh, reset when it is a previous demo's, refused otherwise."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from loopline.config import load_config
from loopline.demo.project import MARKER, prepare
from loopline.demo.scenario import Scenario
from loopline.errors import ConfigError

SMALL = Scenario(lake_images=120, cameras=3)


def test_a_new_folder_gets_a_config_and_a_day_only_lake(tmp_path: Path) -> None:
    project = prepare(tmp_path / "demo", SMALL)
    assert project.config_path.is_file() and (project.root / MARKER).is_file()
    with (project.lake / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120
    assert {r["condition"] for r in rows} == {"day"}
    assert {r["camera_id"] for r in rows} == {"cam01", "cam02", "cam03"}
    cfg = load_config(project.config_path)
    assert cfg.environment("production").port == project.port
    assert cfg.data.source.uri == "./lake" and cfg.root == project.root
    assert project.endpoint == f"http://127.0.0.1:{project.port}" and project.token


def test_a_previous_demo_is_reset_and_its_lake_kept(tmp_path: Path) -> None:
    first = prepare(tmp_path / "demo", SMALL)
    state = first.root / ".loopline"
    state.mkdir()
    (state / "loopline.db").write_bytes(b"old store")
    manifest = (first.lake / "manifest.csv").stat().st_mtime_ns
    again = prepare(tmp_path / "demo", SMALL)
    assert again.lake_reused and not state.exists()
    assert (again.lake / "manifest.csv").stat().st_mtime_ns == manifest
    other = prepare(tmp_path / "demo", SMALL.with_(seed=5))  # another lake: written anew
    assert not other.lake_reused
    assert (other.lake / "manifest.csv").stat().st_mtime_ns != manifest


def test_a_folder_holding_other_files_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that are not a previous demo's"):
        prepare(tmp_path, SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare(tmp_path / "file", SMALL)
