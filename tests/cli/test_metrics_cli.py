"""`loopline metrics` and `loopline predictions` over a small store with a log and labels."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.cli.test_cli import invoke, one_line_error


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """m:1 answered 10 (7 right, labelled) over the last 10 minutes plus 2 unlabelled two
    hours ago; m:2 answered 4 as a shadow (never counted)."""
    from loopline.drivers.metadata.store import MetadataStore

    cfg = tmp_path / "loopline.yaml"
    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg.write_text(f"store: {{metadata_url: '{url}'}}\n")
    store = MetadataStore(url)
    for i in (1, 2):
        store.models.register("m", bundle_uri=f"x{i}", bundle_sha256=f"{i}" * 64)
    now = datetime.now(UTC)
    pairs = [("car", "car")] * 3 + [("car", "bus"), ("bus", "bus"), ("bus", "bus"),
             ("bus", "car"), ("van", "van"), ("van", "bus"), ("van", "van")]  # fmt: skip

    def row(pid: str, at: datetime, label: str, **kw: object) -> dict[str, object]:
        return {"id": pid, "at": at, "model_name": "m", "model_version": 1, "source": "v1",
                "label": label, "confidence": 0.75, "probabilities": [0.75, 0.25],
                "request_metadata": {"camera_id": kw.get("camera_id"), "site": "n"},
                "input_stats": {"brightness": 90.5}, "environment": "production",
                "variant": "stable", **kw}  # fmt: skip

    rows, truth = [], []
    for i, (actual, pred) in enumerate(pairs):
        pid = f"p{i:031d}"
        rows.append(row(pid, now - timedelta(minutes=10 - i), pred,
                        camera_id="c1" if i < 5 else "c2"))  # fmt: skip
        truth.append((pid, actual))
    for i in range(2):
        rows.append(row(f"o{i:031d}", now - timedelta(hours=2, seconds=i), "car", camera_id="c1"))
    for i in range(4):
        pid = f"s{i:031d}"
        rows.append(row(pid, now - timedelta(minutes=5), "truck", model_version=2,
                        variant="shadow", camera_id="c1"))  # fmt: skip
        truth.append((pid, "car"))
    store.predictions.log(rows)
    store.predictions.record_feedback(truth)
    store.close()
    return cfg


def test_metrics_per_version_and_camera(project: Path) -> None:
    code, out, err = invoke("metrics", "m", "--json", "--by", "camera_id", "-c", str(project))
    assert code == 0, err
    data = json.loads(out)
    assert (data["model"], data["environment"], data["window"]) == ("m", "production", 200)
    rows = {r["scope"]: r for r in data["rows"]}
    assert list(rows) == ["global", "camera_id=c1", "camera_id=c2"]  # no shadow version
    assert (rows["global"]["n"], rows["global"]["correct"]) == (10, 7)
    assert rows["global"]["accuracy"] == pytest.approx(0.7)
    assert rows["global"]["macro_precision"] == pytest.approx(0.75)
    assert rows["camera_id=c1"]["accuracy"] == pytest.approx(0.8)
    code, out, err = invoke("metrics", "m", "--window", "4", "--json", "-c", str(project))
    assert code == 0 and json.loads(out)["rows"][0]["accuracy"] == pytest.approx(0.5), err
    code, out, err = invoke("metrics", "m", "-c", str(project))
    assert code == 0 and "0.700" in out and "0.750" in out, err
    code, out, err = invoke("metrics", "m", "--env", "staging", "-c", str(project))
    assert code == 0 and "no labelled predictions of m in staging" in out, err


def test_predictions_json_since_labelled_limit(project: Path) -> None:
    c = ["-c", str(project)]
    code, out, err = invoke("predictions", "m", "--json", *c)
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 16  # every variant, shadow included: it is the log
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)  # oldest first
    first = next(r for r in rows if r["id"] == f"p{3:031d}")
    assert (first["predicted"], first["actual"], first["correct"]) == ("bus", "car", False)
    assert first["camera_id"] == "c1" and first["labelled_at"] is not None
    old = next(r for r in rows if r["id"].startswith("o"))
    assert old["actual"] is None and old["correct"] is None

    code, out, err = invoke("predictions", "m", "--since", "1h", "--json", *c)
    assert code == 0 and len(json.loads(out)) == 14, err
    code, out, err = invoke("predictions", "m", "--labelled", "--json", *c)
    assert code == 0 and len(json.loads(out)) == 14, err
    code, out, err = invoke("predictions", "m", "--limit", "3", "--json", *c)
    assert code == 0, err
    assert [r["id"][0] for r in json.loads(out)] == ["p", "p", "p"]  # the newest three
    code, out, err = invoke("predictions", "m", "--since", "2d", *c)
    assert code == 0 and "16 predictions" in out and "shadow" in out, err


def test_predictions_to_parquet(project: Path, tmp_path: Path) -> None:
    import pandas as pd

    out_file = tmp_path / "out" / "log.parquet"
    code, out, err = invoke("predictions", "m", "--labelled", "--out", str(out_file), "-c",
                            str(project))  # fmt: skip
    assert code == 0 and "wrote 14 predictions" in out, err
    frame = pd.read_parquet(out_file)
    assert len(frame) == 14 and list(frame.columns)[:3] == ["id", "at", "model_version"]
    assert str(frame["at"].dtype).startswith("datetime64") and frame["at"].dt.tz is not None
    assert frame["correct"].sum() == 7  # shadow answers were all wrong
    assert json.loads(frame["request_metadata"].iloc[0])["site"] == "n"
    assert list(frame["probabilities"].iloc[0]) == pytest.approx([0.75, 0.25])
    assert [p.name for p in out_file.parent.iterdir()] == ["log.parquet"]  # no temp left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["metrics", "nope"], "no model 'nope'"),
        (["metrics", "m", "--env", "prod"], "no environment 'prod'"),
        (["metrics", "m", "--window", "0"], "window 0"),
        (["predictions", "m", "--since", "yesterday"], "invalid --since 'yesterday'"),
        (["predictions", "m", "--json", "--out", "x.parquet"], "--json or --out"),
        (["predictions", "m", "--limit", "0"], "--limit 0"),
        (["predictions", "nope"], "no model 'nope'"),
    ],
)
def test_mistakes_are_one_line_errors(project: Path, args: list[str], message: str) -> None:
    code, _, err = invoke(*args, "-c", str(project))
    assert code == 1 and message in one_line_error(err)


def test_outside_a_project_nothing_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke("metrics", "m")
    assert code == 1 and one_line_error(err)
    assert list(tmp_path.iterdir()) == []
