"""`loopline render`: what a target would apply, written to a folder, never applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loopline.cli.main import app
from loopline.drivers import targets
from tests.deploy.conftest import model_bytes  # noqa: F401 - a fixture
from tests.drivers.targets.conftest import Registered, register_project


@pytest.fixture
def fleet(tmp_path: Path, model_bytes: bytes) -> Registered:  # noqa: F811
    """A project whose registry holds trucks:1..3."""
    return register_project(tmp_path / "project", model_bytes)


def _render(project: Registered, *args: str) -> object:
    return CliRunner().invoke(app, ["render", *args, "-c", str(project.config)])


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("kubernetes", {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml",
                        "inferenceservice.yaml", "kustomization.yaml"}),
        ("container", {"Dockerfile", "run.sh", "bundle/"}),
        ("vm", {"loopline-staging.service", "install.sh", "staging.env.example", "bundle/"}),
    ],
)  # fmt: skip
def test_render_writes_a_target_folder(
    fleet: Registered, tmp_path: Path, target: str, expected: set[str]
) -> None:
    out = tmp_path / "out"
    r = _render(fleet, "trucks:2", "--target", target, "--out", str(out), "--env",
                "staging", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["target"], data["environment"], data["ref"]) == (target, "staging", "trucks:2")
    top = {name.split("/")[0] + ("/" if "/" in name else "") for name in data["files"]}
    assert top == expected
    assert all((out / name).is_file() for name in data["files"])
    identity = {  # version 2, as asked, wherever the target carries it
        "kubernetes": ("deployment.yaml", "loopline.dev/model-version: '2'"),
        "container": ("Dockerfile", 'LOOPLINE_MODEL_VERSION="2"'),
        "vm": ("loopline-staging.service", 'Environment="LOOPLINE_MODEL_VERSION=2"'),
    }[target]
    assert identity[1] in (out / identity[0]).read_text()


def test_render_prints_what_it_wrote(fleet: Registered, tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    r = _render(fleet, "trucks:3", "--target", "kubernetes", "--out", str(out),
                "--canary-percent", "20")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "wrote 6 files for trucks:3 (target kubernetes, environment production)" in r.stdout
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 20


def test_a_non_empty_out_is_refused_and_left_alone(fleet: Registered, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _render(fleet, "trucks:3", "--target", "container", "--out", str(out))
    assert r.exit_code == 1
    assert r.stderr.strip().count("\n") == 0 and "not an empty folder" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trucks:9", "--target", "vm"], "no model version trucks:9"),
        (["trucks:3", "--target", "vm", "--env", "moon"], "no environment 'moon'"),
        (["trucks:3", "--target", "mainframe"], "unknown target 'mainframe'"),
        (["trucks:3", "--target", "vm", "--canary-percent", "5"], "--target kubernetes only"),
        (["trucks:3", "--target", "kubernetes", "--canary-percent", "500"], "0 to 100"),
    ],
)
def test_errors_are_one_line_and_leave_no_folder(
    fleet: Registered, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    r = _render(fleet, *args, "--out", str(out))
    assert r.exit_code == 1, r.output
    assert message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not out.exists()


def test_a_target_that_is_not_installed_says_so(
    fleet: Registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `edge` where its module is absent: here a table entry naming a missing module."""
    monkeypatch.setitem(targets.TARGETS, "edge", "loopline.drivers.targets.no_such:EdgeTarget")
    out = tmp_path / "out"
    r = _render(fleet, "trucks:3", "--target", "edge", "--out", str(out))
    assert r.exit_code == 1
    assert "the edge target is not available in this installation" in r.stderr
    assert not out.exists()


def test_outside_a_project_it_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPLINE_DB_URL", raising=False)
    r = CliRunner().invoke(app, ["render", "trucks:3", "--target", "vm", "--out", "x"])
    assert r.exit_code == 1 and "no Loopline project here" in r.stderr
    assert not (tmp_path / ".loopline").exists() and not (tmp_path / "x").exists()
