"""Bulk inference (``predict_source``) on a real lake, a real warehouse and a real registry."""

from __future__ import annotations

import csv
import hashlib
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from loopline.deploy import bulk, bulk_output
from loopline.deploy.bulk import predict_source
from loopline.deploy.schedule import parse_every, run_every, timestamped_path
from loopline.errors import ConfigError, LooplineError, NotFound
from tests.deploy.conftest import LABELS, Project, serving

BAD = {  # path -> the reason it must be skipped with
    "images/missing.png": "unreadable",
    "images/notes.png": "unsupported format",
    "images/empty.png": "empty",
}


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated lake of 60 images (two of them broken by the generator) plus three bad
    rows of our own: a missing file, a text file, an empty file."""
    from loopline.examples.vehicles.datagen import generate_lake

    root = tmp_path_factory.mktemp("bulk-lake")
    generate_lake(root, images=60, seed=3, cameras=2)
    (root / "images" / "notes.png").write_text("not an image")
    (root / "images" / "empty.png").write_bytes(b"")
    with open(root / "manifest.csv", "a", newline="") as f:
        for path in BAD:
            csv.writer(f).writerow([path, "car", "cam01", "2024-06-03T10:00:00Z", "day"])
    return root


def records(lake: Path) -> list[dict[str, str]]:
    with open(lake / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_rows_are_the_records_that_decode(
    module_project: Project, lake: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds.parquet"
    seen: list[tuple[int, int]] = []
    summary = predict_source(
        "vehicles:1", lake, out, config=module_project.config, batch_size=16,
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    rows = records(lake)
    table = pq.read_table(out).to_pandas()
    assert summary.records == len(rows) == 63
    assert summary.rows == len(table) and summary.rows + summary.failed == len(rows)
    assert (summary.model, summary.version) == ("vehicles", 1)
    assert summary.bundle_sha256 == module_project.bundle_sha256
    # Every bad row is skipped with its reason, and nothing else is.
    reasons = {f["path"]: f["reason"] for f in summary.failures}
    assert {p: reasons[p] for p in BAD} == BAD
    assert set(reasons) == {r["path"] for r in rows} - set(table["path"])
    assert sum(summary.failed_by_reason.values()) == summary.failed == 5
    # One row per decoded record, in source order, with the source's metadata and label.
    expected = [r for r in rows if r["path"] not in reasons]
    assert table["path"].tolist() == [r["path"] for r in expected]
    assert table["camera_id"].tolist() == [r["camera_id"] for r in expected]
    assert table["condition"].tolist() == [r["condition"] for r in expected]
    assert table["true_label"].tolist() == [r["label"] or None for r in expected]
    assert set(table["model_name"]) == {"vehicles"} and set(table["model_version"]) == {1}
    for path, digest in zip(table["path"][:5], table["sha256"][:5], strict=True):
        assert digest == hashlib.sha256((lake / path).read_bytes()).hexdigest()
    probs = table[[f"prob_{label}" for label in LABELS]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert table["label"].tolist() == [LABELS[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(table["confidence"], probs.max(axis=1), rtol=1e-6)
    labelled = table["true_label"].notna()
    assert summary.labelled == int(labelled.sum())
    accuracy = (table["label"][labelled] == table["true_label"][labelled]).mean()
    assert summary.accuracy == pytest.approx(accuracy)
    assert seen[0] == (0, 63) and seen[-1] == (63, 63) and len(seen) == 1 + 4


def test_same_predictions_as_the_server(
    module_project: Project, lake: Path, tmp_path: Path
) -> None:
    import httpx

    out = tmp_path / "preds.parquet"
    predict_source("vehicles:1", lake, out, config=module_project.config, limit=12)
    table = pq.read_table(out).to_pandas()
    assert len(table) >= 10
    with serving(module_project, log_predictions=False) as running:
        for row in table.itertuples():
            r = httpx.post(
                f"{running.url}/v1/models/vehicles/predict",
                content=(lake / row.path).read_bytes(),
                headers={"Content-Type": "image/png"},
            )
            assert r.status_code == 200, r.text
            answer = r.json()["predictions"][0]
            assert answer["label"] == row.label
            for label in LABELS:
                assert answer["probabilities"][label] == pytest.approx(
                    getattr(row, f"prob_{label}"), abs=1e-5
                )


def test_decoding_processes_give_the_same_file(
    module_project: Project, lake: Path, tmp_path: Path
) -> None:
    a, b = tmp_path / "thread.parquet", tmp_path / "procs.parquet"
    s0 = predict_source("vehicles:1", lake, a, config=module_project.config, workers=0)
    s2 = predict_source(
        "vehicles:1", lake, b, config=module_project.config, workers=1, batch_size=8
    )
    assert (s0.decode_workers, s2.decode_workers) == (0, 1)
    assert pq.read_table(a).equals(pq.read_table(b))
    assert s0.failed_by_reason == s2.failed_by_reason


def test_a_failed_run_writes_nothing(
    module_project: Project, lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "preds.parquet"
    out.write_bytes(b"the previous run")
    monkeypatch.setattr(bulk_output, "ROW_GROUP_ROWS", 4)  # row groups hit the disk before the end

    def interrupt(done: int, total: int) -> None:
        if done > 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_source(
            "vehicles:1", lake, out, config=module_project.config, batch_size=8,
            progress=interrupt,
        )  # fmt: skip
    assert out.read_bytes() == b"the previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.parquet"]


def test_a_bundle_and_a_config_source_with_its_filter(
    module_project: Project, lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "source.yaml"
    cfg.write_text(
        f"data:\n  source: {{kind: lake, uri: {lake}}}\n  filter: {{condition: [fog]}}\n"
    )
    out = tmp_path / "fog.parquet"
    monkeypatch.chdir(tmp_path)  # no project here: the bundle is named by its metadata
    summary = predict_source(module_project.bundle_tar, cfg, out, batch_size=7)
    table = pq.read_table(out).to_pandas()
    fog = [r for r in records(lake) if r["condition"] == "fog"]
    assert summary.records == len(fog) and summary.rows == len(table) > 0
    assert set(table["condition"]) == {"fog"}
    assert (summary.model, summary.version) == ("vehicles", 0)
    # With the project, the bundle is known by its registry identity (by sha256).
    known = predict_source(module_project.bundle_tar, cfg, out, config=module_project.config)
    assert (known.model, known.version) == ("vehicles", 1)
    assert set(pq.read_table(out).column("model_version").to_pylist()) == {1}


def test_a_warehouse_query(module_project: Project, lake: Path, tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "wh.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE frames (path TEXT, label TEXT, camera_id TEXT, site TEXT)")
        rows = [(r["path"], r["label"], r["camera_id"], "north") for r in records(lake)[:20]]
        conn.executemany("INSERT INTO frames VALUES (?, ?, ?, ?)", rows)
    cfg = tmp_path / "wh.yaml"
    cfg.write_text(
        "data:\n  source:\n    kind: warehouse\n"
        f"    url: sqlite:///{db}\n"
        "    query: SELECT path, label, camera_id, site FROM frames WHERE camera_id = 'cam01'\n"
        f"    images_root: {lake}\n"
    )
    out = tmp_path / "wh.parquet"
    summary = predict_source("vehicles:1", cfg, out, config=module_project.config)
    table = pq.read_table(out).to_pandas()
    cam01 = [r for r in rows if r[2] == "cam01"]
    assert summary.records == len(cam01) and summary.rows + summary.failed == len(cam01)
    assert set(table["site"]) == {"north"} and set(table["camera_id"]) == {"cam01"}


def test_clear_errors(module_project: Project, lake: Path, tmp_path: Path) -> None:
    cfg = module_project.config
    out = tmp_path / "x.parquet"
    with pytest.raises(NotFound, match="no model version vehicles:9"):
        predict_source("vehicles:9", lake, out, config=cfg)
    with pytest.raises(NotFound, match="bundle nowhere/b.tar does not exist"):
        predict_source("nowhere/b.tar", lake, out, config=cfg)
    with pytest.raises(LooplineError, match="does not exist: give a lake folder or URL"):
        predict_source("vehicles:1", tmp_path / "nolake", out, config=cfg)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="must be a loopline.yaml"):
        predict_source("vehicles:1", tmp_path / "x.txt", out, config=cfg)
    with pytest.raises(ConfigError, match="batch size 0"):
        predict_source("vehicles:1", lake, out, config=cfg, batch_size=0)
    with pytest.raises(ConfigError, match="is a folder"):
        predict_source("vehicles:1", lake, tmp_path, config=cfg)
    assert not out.exists()


def test_an_empty_selection_writes_an_empty_file_with_the_columns(
    module_project: Project, lake: Path, tmp_path: Path
) -> None:
    out = tmp_path / "none.parquet"
    summary = predict_source("vehicles:1", lake, out, config=module_project.config, limit=0)
    table = pq.read_table(out)
    assert summary.rows == table.num_rows == 0 and summary.accuracy is None
    assert {"path", "label", "prob_car", "true_label", "camera_id"} <= set(table.column_names)


# -- the schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1d", 86400), ("1h30m", 5400), ("1.5s", 1.5)],
)
def test_parse_every(text: str, seconds: float) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5x", "invalid --every '5x'"),
        ("h", "invalid --every 'h'"),
        ("", "invalid --every ''"),
        ("10", "invalid --every '10'"),
        ("-5m", "invalid --every '-5m'"),
        ("1h 5m", "invalid --every"),
        ("0s", "too short"),
        ("0.5s", "too short"),
    ],
)
def test_parse_every_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_every(text)


def test_run_every_runs_on_slots_and_survives_a_failed_run() -> None:
    calls: list[tuple[int, datetime]] = []
    errors: list[int] = []

    def job(run: int, when: datetime) -> None:
        calls.append((run, when))
        if run == 2:
            raise LooplineError("the lake is offline")

    runs = run_every(0.02, job, max_runs=4, on_error=lambda run, err: errors.append(run))
    assert runs == 4 and [c[0] for c in calls] == [1, 2, 3, 4] and errors == [2]
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    assert len({c[1] for c in calls}) == 4
    with pytest.raises(LooplineError, match="offline"):  # no handler: the error propagates
        run_every(0.02, job, max_runs=4)


def test_run_every_stops_when_asked() -> None:
    stop = threading.Event()
    calls: list[Any] = []

    def job(run: int, when: datetime) -> None:
        calls.append(run)
        if run == 3:
            stop.set()

    assert run_every(3600, lambda r, w: stop.set() or calls.append(r), stop=stop) == 1
    calls.clear()
    stop.clear()
    assert run_every(0.01, job, stop=stop) == 3 and calls == [1, 2, 3]


def test_timestamped_path() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    got = timestamped_path(Path("out/preds.parquet"), when)
    assert got == Path("out/preds-20260102T030405Z.parquet")


def test_auto_workers_start_processes_only_for_long_runs_on_many_cores(lake: Path) -> None:
    from loopline.drivers.data.lake import Lake

    source = Lake(str(lake))
    assert bulk.auto_workers(source, 10, 64, cores=8) == 0
    assert bulk.auto_workers(source, 16 * 64, 64, cores=8) == 7  # one core runs the model
    assert bulk.auto_workers(source, 10**6, 64, cores=2) == 0
    unpicklable = type("Source", (), {"__reduce__": lambda self: 1 / 0})()
    assert bulk.auto_workers(unpicklable, 10**6, 64, cores=8) == 0


BULK_CHECK = """
import sys
from loopline.deploy.bulk import predict_source
s = predict_source(sys.argv[1], sys.argv[2], sys.argv[3], workers=1, batch_size=16)
assert s.rows > 0, s
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))))
"""


def test_bulk_inference_imports_no_torch(
    module_project: Project, lake: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    args = [str(module_project.bundle_tar), str(lake), str(tmp_path / "p.parquet")]
    out = subprocess.run(
        [sys.executable, "-c", BULK_CHECK, *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"bulk inference imported {out.stdout.strip()}"


def test_a_record_whose_bytes_differ_from_the_sources_sha256_is_skipped(
    module_project: Project, lake: Path, tmp_path: Path
) -> None:
    import shutil

    rows = [r for r in records(lake) if r["path"] not in BAD][:3]
    folder = tmp_path / "lake"
    folder.mkdir()
    with open(folder / "manifest.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "sha256"])
        for k, r in enumerate(rows):
            (folder / r["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lake / r["path"], folder / r["path"])
            digest = hashlib.sha256((lake / r["path"]).read_bytes()).hexdigest()
            out.writerow([r["path"], r["label"], "0" * 64 if k == 1 else digest])
    summary = predict_source(
        "vehicles:1", folder, tmp_path / "p.parquet", config=module_project.config
    )
    assert summary.failed_by_reason == {"sha256 mismatch": 1}
    assert summary.failures[0]["path"] == rows[1]["path"]
    table = pq.read_table(tmp_path / "p.parquet").to_pandas()
    assert table["path"].tolist() == [rows[0]["path"], rows[2]["path"]]
