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
    assert [s["status"] for s in first["steps"]] == ["succeeded"] * 7
    assert first["registered"] is True and first["equals"] is None

    code, out, _ = cli("models", "show", "tiny:1", "-c", str(project), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["bundle_sha256"] == model["bundle_sha256"]
    assert shown["lineage"]["dataset_version"] == model["dataset_version"]
    assert shown["lineage"]["run_id"] == first["run_id"]

    code, again = build_json(project)
    assert code == 0
    assert [s["status"] for s in again["steps"]] == ["cached"] * 7
    assert again["model"]["version"] == 1  # nothing new to register
    assert again["registered"] is False and again["equals"] == "tiny:1"

    code, changed = build_json(project, "train.epochs=2")
    assert code == 0
    status = {s["step"]: s["status"] for s in changed["steps"]}
    assert status["ingest"] == status["validate"] == status["split"] == "cached"
    assert all(status[s] == "succeeded" for s in ("train", "evaluate", "gate", "package"))
    assert changed["model"]["version"] == 2 and changed["registered"] is True

    code, out, _ = cli("runs", "show", changed["run_id"], "-c", str(project), "--json")
    run = json.loads(out)
    assert run["status"] == "succeeded" and run["model_version"] == 2
    assert run["dataset_version"] == model["dataset_version"]
    assert len(run["trials"]) == 1 and run["trials"][0]["state"] == "complete"

    # The bundle in the store is verified and serves the same labels.
    store = store_of(project)
    assert store.models.resolve("tiny@candidate").version == 2


def test_gate_rejects_with_exit_3_and_registers_nothing(project: Path) -> None:
    code, result = build_json(project, "gate.rules=[macro_f1 >= 0.999]")
    assert code == 3
    assert result["status"] == "rejected" and result["model"] is None
    assert "macro_f1 >= 0.999" in result["reason"]
    assert store_of(project).models.versions() == []
    steps = [s["step"] for s in result["steps"]]
    assert steps[-1] == "gate" and "register" not in steps


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
                runs = store_of(project).runs.recent()
            except Exception:
                return False
            if not runs:
                return False
            steps = store_of(project).steps.for_run(runs[0].id)
            return any(s.step == "train" and s.status == "running" for s in steps)

        assert _wait_for(training, 120), "the build never reached the train step"
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    store = store_of(project)
    run = store.runs.recent()[0]
    assert run.status == "interrupted"
    assert store.models.versions() == []
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
    assert store.runs.get(run.id).status == "succeeded"


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
    assert alias["details"] == {"alias": "production", "previous": None}


def _bundle_metadata(project: Path, digest: str) -> dict:
    from loopline.bundle import fetch_bundle
    from loopline.drivers.artifacts import ArtifactStore

    artifacts = ArtifactStore(str(project.parent / "state" / "artifacts"))
    return fetch_bundle(artifacts, digest, project.parent / "extracted").metadata


def test_an_unchanged_build_registers_nothing_and_names_the_equal_version(project: Path) -> None:
    code, first = build_json(project)
    assert code == 0 and first["model"]["version"] == 1
    code, out, err = cli("models", "alias", "tiny:1", "production", "-c", str(project))
    assert code == 0, err
    # The gate now compares with production (it re-runs), but the bundle is the same.
    code, again = build_json(project)
    assert code == 0, again
    assert again["status"] == "succeeded"
    assert again["registered"] is False and again["equals"] == "tiny:1"
    assert again["model"]["version"] == 1
    assert [m.version for m in store_of(project).models.versions()] == [1]
    code, out, _ = cli("build", "-c", str(project))
    assert code == 0 and "nothing registered, the bundle equals tiny:1" in " ".join(out.split())


def test_a_rebuild_without_cache_gives_the_same_bundle_bytes(project: Path) -> None:
    code, first = build_json(project)
    assert code == 0
    meta = _bundle_metadata(project, first["model"]["bundle_sha256"])
    # Only what package's key covers: no run id, no git commit (they are in the lineage).
    assert "run_id" not in meta and "git_commit" not in meta
    assert first["run_id"] not in json.dumps(meta)
    assert meta["name"] == "tiny"
    code, out, err = cli("build", "-c", str(project), "--no-cache", "--json")
    again = json.loads(out)
    assert code == 0, err
    assert {s["status"] for s in again["steps"]} == {"succeeded"}  # everything re-ran
    assert again["model"]["bundle_sha256"] == first["model"]["bundle_sha256"]
    assert again["registered"] is False and again["equals"] == "tiny:1"


def test_a_new_model_name_makes_a_new_bundle(project: Path) -> None:
    code, first = build_json(project)
    assert code == 0
    code, other = build_json(project, "model.name=other")
    assert code == 0, other
    status = {s["step"]: s["status"] for s in other["steps"]}
    assert status["train"] == "cached" and status["package"] == "succeeded"
    assert other["registered"] is True
    assert (other["model"]["name"], other["model"]["version"]) == ("other", 1)
    assert other["model"]["bundle_sha256"] != first["model"]["bundle_sha256"]
    assert _bundle_metadata(project, other["model"]["bundle_sha256"])["name"] == "other"


CONSTANT_NET = '''\
import torch


class Constant(torch.nn.Module):
    """Always predicts class {cls}: a candidate worse than any trained model."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(num_classes))
        fixed = torch.zeros(num_classes)
        fixed[{cls}] = 10.0
        self.register_buffer("fixed", fixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] * 0.0 + self.fixed + self.unused * 0.0
'''


@pytest.fixture
def user_arch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's architecture package on sys.path: ``usernet.constant:Constant``."""
    root = tmp_path / "userpkgs"
    (root / "usernet").mkdir(parents=True)
    (root / "usernet" / "__init__.py").write_text("")
    (root / "usernet" / "constant.py").write_text(CONSTANT_NET.format(cls=0))
    monkeypatch.syspath_prepend(str(root))
    yield root / "usernet" / "constant.py"
    for name in [m for m in sys.modules if m.split(".")[0] == "usernet"]:
        del sys.modules[name]


def test_editing_the_user_architecture_reruns_training(project: Path, user_arch: Path) -> None:
    arch = "train.architecture=usernet.constant:Constant"
    code, first = build_json(project, arch)
    assert code == 0, first
    code, again = build_json(project, arch)
    assert [s["status"] for s in again["steps"]] == ["cached"] * 7
    user_arch.write_text(CONSTANT_NET.format(cls=1))
    st = user_arch.stat()
    os.utime(user_arch, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    for name in [m for m in sys.modules if m.split(".")[0] == "usernet"]:
        del sys.modules[name]
    code, edited = build_json(project, arch)
    assert code == 0, edited
    status = {s["step"]: s["status"] for s in edited["steps"]}
    assert status["split"] == "cached"
    assert status["train"] == status["evaluate"] == status["package"] == "succeeded"
    assert edited["registered"] is True and edited["model"]["version"] == 2


def test_gate_rejects_a_regression_against_production(project: Path, user_arch: Path) -> None:
    code, first = build_json(project)
    assert code == 0
    store = store_of(project)
    store.models.set_alias("tiny", "production", 1)
    # A candidate that always answers 'car', scored against production on the same split.
    code, second = build_json(
        project, "train.architecture=usernet.constant:Constant", "gate.max_regression=0.0"
    )
    assert code == 3, second
    assert second["status"] == "rejected" and second["model"] is None
    assert "macro_f1" in second["reason"] and "worse than production tiny:1" in second["reason"]
    gate_step = [s for s in store.steps.for_run(second["run_id"]) if s.step == "gate"][0]
    from loopline.drivers.artifacts import ArtifactStore

    artifacts = ArtifactStore(str(project.parent / "state" / "artifacts"))
    baseline = artifacts.get_json(gate_step.outputs["decision"]["sha256"])["baseline"]
    assert baseline["candidate"] < baseline["baseline"]
    assert baseline["baseline"] == pytest.approx(first["model"]["metrics"]["macro_f1"])
    assert [m.version for m in store.models.versions()] == [1]
    assert [s["step"] for s in second["steps"]][-1] == "gate"


def test_evaluate_scores_a_registered_model_on_the_source(project: Path) -> None:
    code, first = build_json(project)
    assert code == 0
    code, out, err = cli("evaluate", "tiny:1", "-c", str(project), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "tiny:1" and report["n"] > 200  # every valid record, no split
    assert report["dataset_version"] == first["model"]["dataset_version"]
    assert set(report["segments"]) == {"condition", "camera_id"}


def test_the_gate_compares_with_the_model_its_cache_key_names(
    project: Path, user_arch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alias moves between the gate's key (production = the good tiny:1) and its run:
    the decision must still be against tiny:1, the model its key names."""
    from loopline.builder.resources import BuildResources

    code, first = build_json(project)
    assert code == 0, first
    arch = "train.architecture=usernet.constant:Constant"
    code, second = build_json(project, arch)  # tiny:2, a constant (bad) model
    assert code == 0 and second["model"]["version"] == 2, second
    store = store_of(project)
    store.models.set_alias("tiny", "production", 1)

    real = BuildResources.find_model
    lookups: list[int] = []

    def then_move(self: BuildResources, name: str, alias: str) -> object:
        mv = real(self, name, alias)
        lookups.append(mv.version)
        if len(lookups) == 1:  # right after the first read, as a concurrent promotion would
            store.models.set_alias("tiny", "production", 2)
        return mv

    monkeypatch.setattr(BuildResources, "find_model", then_move)
    code, third = build_json(project, arch, "gate.max_regression=0.0")
    assert lookups[0] == 1
    gate_step = [s for s in store.steps.for_run(third["run_id"]) if s.step == "gate"][0]
    from loopline.drivers.artifacts import ArtifactStore

    artifacts = ArtifactStore(str(project.parent / "state" / "artifacts"))
    baseline = artifacts.get_json(gate_step.outputs["decision"]["sha256"])["baseline"]
    assert baseline["model"] == "tiny:1", baseline  # not tiny:2, where the alias is now
    assert code == 3 and "worse than production tiny:1" in third["reason"], third
    assert lookups == [1]  # read once: the key and the decision agree by construction
