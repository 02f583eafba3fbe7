"""`loopline predict`: a thin shell over ``predict_source`` and the schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cli.test_cli import invoke, one_line_error


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A project whose registry holds vehicles:1 (a tiny untrained CNN), and a small lake."""
    from loopline.examples.vehicles.datagen import generate_lake
    from tests.deploy.conftest import export_tiny_cnn, make_project

    root = tmp_path_factory.mktemp("predict-cli")
    export_tiny_cnn(root / "model.onnx")
    proj = make_project(root / "project", (root / "model.onnx").read_bytes())
    generate_lake(root / "lake", images=30, seed=5, cameras=2)
    return proj.config, root / "lake"


def test_predict_writes_parquet_and_reports(project: tuple[Path, Path], tmp_path: Path) -> None:
    config, lake = project
    out = tmp_path / "p.parquet"
    code, stdout, err = invoke(
        "predict", "vehicles:1", "--source", str(lake), "--out", str(out), "-c", str(config),
        "--batch-size", "8", "--limit", "20", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["records"] == 20 and summary["rows"] + summary["failed"] == 20
    assert (summary["model"], summary["version"]) == ("vehicles", 1)
    assert pq.read_table(out).num_rows == summary["rows"]
    code, stdout, err = invoke(
        "predict", "vehicles@candidate", "--source", str(lake), "--out", str(out),
        "-c", str(config),
    )  # fmt: skip
    assert code == 0, err
    rows = pq.read_table(out).num_rows
    assert f"predicted {rows} of 30 records with vehicles:1" in stdout, stdout
    assert "accuracy" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--every", "5x"], "invalid --every '5x'"),
        (["--every", "0s"], "too short"),
        (["--runs", "2"], "--runs needs --every"),
        (["--batch-size", "0"], "batch size 0"),
    ],
)
def test_bad_options_are_one_line_errors(
    project: tuple[Path, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    config, lake = project
    out = tmp_path / "p.parquet"
    code, _, err = invoke(
        "predict", "vehicles:1", "--source", str(lake), "--out", str(out), "-c", str(config),
        *args,
    )  # fmt: skip
    assert code == 1
    assert message in one_line_error(err)
    assert not out.exists()


def test_unknown_model_and_source(project: tuple[Path, Path], tmp_path: Path) -> None:
    config, lake = project
    out = str(tmp_path / "p.parquet")
    code, _, err = invoke("predict", "vehicles:7", "--source", str(lake), "--out", out,
                          "-c", str(config))  # fmt: skip
    assert code == 1 and "no model version vehicles:7" in one_line_error(err)
    code, _, err = invoke("predict", "vehicles:1", "--source", str(tmp_path / "none"),
                          "--out", out, "-c", str(config))  # fmt: skip
    assert code == 1 and "does not exist" in one_line_error(err)
    # With --every, a mistake in the first run ends the command at once.
    code, _, err = invoke("predict", "vehicles:7", "--source", str(lake), "--out", out,
                          "-c", str(config), "--every", "1h")  # fmt: skip
    assert code == 1 and "no model version vehicles:7" in one_line_error(err)


def test_every_writes_one_timestamped_file_per_run(
    project: tuple[Path, Path], tmp_path: Path
) -> None:
    config, lake = project
    out = tmp_path / "runs" / "p.parquet"
    code, stdout, err = invoke(
        "predict", "vehicles:1", "--source", str(lake), "--out", str(out), "-c", str(config),
        "--limit", "5", "--every", "1s", "--runs", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in stdout.splitlines()]
    files = sorted((tmp_path / "runs").iterdir())
    assert len(lines) == 2 and [Path(x["out"]) for x in lines] == files
    assert all(f.name.startswith("p-") and f.name.endswith("Z.parquet") for f in files)
    assert not out.exists()
