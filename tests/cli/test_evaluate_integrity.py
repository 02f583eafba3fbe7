"""`loopline evaluate` verifies the registered bundle on every run, like serve and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import invoke, one_line_error
from tests.deploy.conftest import Project, export_tiny_cnn, make_project


@pytest.fixture
def project(tmp_path: Path, tiny_lake: Path) -> Project:
    onnx = tmp_path / "model.onnx"
    export_tiny_cnn(onnx)
    proj = make_project(tmp_path / "project", onnx.read_bytes())
    with proj.config.open("a") as f:
        f.write(f"data: {{source: {{kind: lake, uri: {tiny_lake}}}}}\n")
        f.write("validate: {max_quarantine_share: 0.3}\n")
    return proj


def _tamper_stored_bundle(project: Project) -> None:
    stored = next(
        (project.root / ".loopline" / "artifacts" / "sha256").rglob(project.bundle_sha256)
    )
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length: only the sha256 tells
    stored.write_bytes(bytes(data))


def test_evaluate_refuses_a_tampered_archive_after_a_good_run(project: Project) -> None:
    code, out, err = invoke("evaluate", "vehicles:1", "-c", str(project.config), "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "vehicles:1"  # scored, and any cache is now filled
    _tamper_stored_bundle(project)
    code, out, err = invoke("evaluate", "vehicles:1", "-c", str(project.config))
    assert code == 1, out
    line = one_line_error(err)
    assert "corrupt or tampered" in line and project.bundle_sha256[:12] in line
    assert "accuracy" not in out


def test_evaluate_refuses_a_tampered_archive(project: Project) -> None:
    _tamper_stored_bundle(project)
    code, out, err = invoke("evaluate", "vehicles@candidate", "-c", str(project.config))
    assert code == 1, out
    assert "corrupt or tampered" in one_line_error(err)
