"""``loopline deploy``: a table of checks and exit 0 when the candidate passes, the reasons
and exit 3 when it fails (and then it cannot be promoted), one line and exit 1 on an error.
Real servers on loopback, real ONNX models (see ``tests/deploy/replica_models.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from loopline.cli.main import app
from loopline.deploy import release
from tests.deploy.conftest import LABELS
from tests.deploy.replica_models import (
    ReplicaProject,
    constant_onnx,
    make_replica_project,
    ridge_onnx,
)


@pytest.fixture(scope="module")
def rp(tmp_path_factory: pytest.TempPathFactory, tiny_lake: Path) -> ReplicaProject:
    project = make_replica_project(tmp_path_factory.mktemp("deploy-cli"), tiny_lake)
    rows, x = project.images("train")
    assert project.register(ridge_onnx(x, np.array([LABELS.index(lb) for lb in rows["label"]])))
    assert project.register(constant_onnx("car")) == 2
    return project


def _deploy(rp: ReplicaProject, *args: str) -> Any:
    return CliRunner().invoke(
        app, ["deploy", *args, "-c", str(rp.config_path)], env={"COLUMNS": "200"}
    )


def test_a_passing_candidate_shows_its_checks_and_exits_0(
    rp: ReplicaProject, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    result = _deploy(rp, "tiny:1", "--env", "staging", "--report", str(out))
    assert result.exit_code == 0, result.output
    text = result.stdout
    for phase in ("bulk", "replay", "load", "memory"):
        assert phase in text
    assert "accuracy" in text and "load p95 latency" in text and "pass" in text
    assert "fail" not in text
    assert "passed tiny:1 in staging" in text
    report = json.loads(out.read_text())
    store = rp.store()
    latest = store.replica_tests.latest("tiny", 1)
    assert latest is not None and report["id"] == latest.id and report["passed"] is True
    assert Path(report["path"]).is_file()
    store.close()


def test_a_failing_candidate_exits_3_with_its_reason_and_cannot_be_promoted(
    rp: ReplicaProject,
) -> None:
    result = _deploy(rp, "tiny:2", "--json")
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert report["reasons"][0].startswith("accuracy 0.")
    assert report["reasons"][0].endswith("< 0.4 (rule accuracy >= 0.4)")
    store = rp.store()
    with pytest.raises(release.PromotionRefused) as refused:
        release.promote(store, "tiny:2", to="production")
    assert report["reasons"][0] in str(refused.value)
    store.close()
    shown = CliRunner().invoke(
        app, ["promote", "tiny:2", "--to", "production", "-c", str(rp.config_path)],
        env={"COLUMNS": "400"},
    )  # fmt: skip
    assert shown.exit_code == 1
    assert "failed its latest replica test" in shown.stderr
    assert report["reasons"][0] in shown.stderr


def test_the_table_names_the_failed_check(rp: ReplicaProject) -> None:
    result = _deploy(rp, "tiny:2")
    assert result.exit_code == 3
    assert "fail" in result.stdout and "failed tiny:2" in result.stdout
    assert "(rule accuracy >= 0.4)" in result.stdout


def test_errors_are_one_line_and_exit_1(rp: ReplicaProject) -> None:
    result = _deploy(rp, "tiny:99")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: no model version tiny:99 (see `loopline models`)"
    ]
    result = _deploy(rp, "tiny:1", "--env", "nowhere")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no environment 'nowhere' in the config")
