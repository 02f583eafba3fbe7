"""End to end: `loopline build` on a tiny lake, caching, gate rejection, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopline.cli.main import app
from loopline.drivers.metadata.store import MetadataStore

pytestmark = pytest.mark.slow

MODEL_KEYS = {
    "name",
    "version",
    "aliases",
    "metrics",
    "dataset_version",
    "run_id",
    "bundle_uri",
    "bundle_sha256",
    "created_at",
}
METRIC_KEYS = {"accuracy", "macro_precision", "macro_recall", "macro_f1"}


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def build_json(project: Path, *sets: str) -> tuple[int, dict]:
    args = ["build", "-c", str(project), "--json"]
    for s in sets:
        args += ["--set", s]
    code, out, err = cli(*args)
    assert out.strip(), err
    return code, json.loads(out)


def store_of(project: Path) -> MetadataStore:
    return MetadataStore(f"sqlite:///{project.parent / 'state' / 'loopline.db'}")


def test_build_registers_then_caches_then_reruns_what_changed(project: Path) -> None:
    code, first = build_json(project)
    assert code == 0, first
    assert first["status"] == "succeeded"
    model = first["model"]
    assert set(model) >= MODEL_KEYS and set(model["metrics"]) >= METRIC_KEYS
    assert model["version"] == 1 and model["aliases"] == ["candidate"]
    assert [s["status"] for s in first["steps"]] == ["succeeded"] * 8

    code, out, _ = cli("models", "show", "tiny:1", "-c", str(project), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["bundle_sha256"] == model["bundle_sha256"]
    assert shown["lineage"]["dataset_version"] == model["dataset_version"]
    assert shown["lineage"]["run_id"] == first["run_id"]

    code, again = build_json(project)
    assert code == 0
    assert [s["status"] for s in again["steps"]] == ["cached"] * 8
    assert again["model"]["version"] == 1  # nothing new to register

    code, changed = build_json(project, "train.epochs=2")
    assert code == 0
    status = {s["step"]: s["status"] for s in changed["steps"]}
    assert status["ingest"] == status["validate"] == status["split"] == "cached"
    assert all(
        status[s] == "succeeded" for s in ("train", "evaluate", "gate", "package", "register")
    )
    assert changed["model"]["version"] == 2

    code, out, _ = cli("runs", "show", changed["run_id"], "-c", str(project), "--json")
    run = json.loads(out)
    assert run["status"] == "succeeded" and run["model_version"] == 2
    assert run["dataset_version"] == model["dataset_version"]
    assert len(run["trials"]) == 1 and run["trials"][0]["state"] == "complete"

    # The bundle in the store is verified and serves the same labels.
    store = store_of(project)
    assert store.resolve_model("tiny@candidate").version == 2


def test_gate_rejects_with_exit_3_and_registers_nothing(project: Path) -> None:
    code, result = build_json(project, "gate.rules=[macro_f1 >= 0.999]")
    assert code == 3
    assert result["status"] == "rejected" and result["model"] is None
    assert "macro_f1 >= 0.999" in result["reason"]
    assert store_of(project).list_model_versions() == []
    steps = [s["step"] for s in result["steps"]]
    assert steps[-1] == "gate" and "register" not in steps


def test_gate_compares_with_production(project: Path) -> None:
    from loopline.drivers.artifacts import ArtifactStore

    code, first = build_json(project)
    assert code == 0
    store = store_of(project)
    store.set_alias("tiny", "production", 1)
    # A barely trained candidate, compared with production on the same test split.
    code, second = build_json(project, "train.lr=0.0000001", "gate.max_regression=0.0")
    gate_step = [s for s in store.list_steps(second["run_id"]) if s.step == "gate"][0]
    assert gate_step.status == "succeeded" and not gate_step.cached
    artifacts = ArtifactStore(str(project.parent / "state" / "artifacts"))
    decision = artifacts.get_json(gate_step.outputs["decision"]["sha256"])
    baseline = decision["baseline"]
    assert baseline["model"] == "tiny:1" and baseline["alias"] == "production"
    # Production scored on this split as it scored at its own build (same split, same model).
    assert baseline["baseline"] == pytest.approx(first["model"]["metrics"]["macro_f1"])
    worse = baseline["candidate"] < baseline["baseline"]
    assert decision["accepted"] is not worse
    if worse:
        assert code == 3 and "worse than production" in second["reason"]
        assert [m.version for m in store.list_model_versions()] == [1]
    else:
        assert code == 0 and second["model"]["version"] == 2


def _wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_during_training_leaves_nothing_then_resume_finishes(project: Path) -> None:
    state = project.parent / "state"
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loopline.cli.main",
            "build",
            "-c",
            str(project),
            "--set",
            "train.epochs=12",
            "--set",
            "train.patience=12",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def training() -> bool:
            if not (state / "loopline.db").exists():
                return False
            try:
                runs = store_of(project).list_runs()
            except Exception:
                return False
            if not runs:
                return False
            steps = store_of(project).list_steps(runs[0].id)
            return any(s.step == "train" and s.status == "running" for s in steps)

        assert _wait_for(training, 120), "the build never reached the train step"
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    store = store_of(project)
    run = store.list_runs()[0]
    assert run.status == "interrupted"
    assert store.list_model_versions() == []
    sha_dir = state / "artifacts" / "sha256"
    # Every artifact under a final name is whole: its content hashes to its name.
    import hashlib

    for f in sha_dir.rglob("*"):
        if f.is_file():
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name

    code, out, err = cli("build", "-c", str(project), "--resume", run.id, "--json")
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["run_id"] == run.id and resumed["status"] == "succeeded"
    status = {s["step"]: s["status"] for s in resumed["steps"]}
    assert status["ingest"] == status["validate"] == status["split"] == "cached"
    assert status["train"] == "succeeded"
    assert resumed["model"]["version"] == 1
    assert store.get_run(run.id).status == "succeeded"


def test_resume_refuses_a_succeeded_run(project: Path) -> None:
    code, first = build_json(project)
    assert code == 0
    code, _, err = cli("build", "-c", str(project), "--resume", first["run_id"])
    assert code == 1 and "only failed or interrupted runs" in err


def test_audit_log_lists_register_and_alias(project: Path) -> None:
    code, first = build_json(project)
    assert code == 0
    code, out, err = cli("models", "alias", "tiny:1", "production", "-c", str(project))
    assert code == 0, err
    code, out, _ = cli("audit", "-c", str(project), "--json")
    events = json.loads(out)
    assert code == 0
    actions = [(e["action"], e["subject"]) for e in events]
    assert ("model.alias", "tiny:1") in actions and ("model.register", "tiny:1") in actions
    alias = next(e for e in events if e["action"] == "model.alias")
    assert alias["details"] == {"alias": "production"}
