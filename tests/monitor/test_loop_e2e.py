"""The loop end to end on a tiny project: real builds on the tiny lake plus labelled
production captures, the gate on real ONNX bundles, the replica test on a real temporary
server, a canary judged by the real canary judge, and a monitor killed mid-build.

Production's servers are not started: the canary's verdict is what ``canary.act`` (which
the serving replicas call every reconcile interval) decides from a replica's reported
counters, written here as a replica would report them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from loopline.config import Config, load_config
from loopline.deploy import canary, release
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor import loop as loops
from loopline.monitor.retrain import GATE_PREFIX
from tests.conftest import TINY_CONFIG
from tests.deploy.conftest import free_port
from tests.drivers.test_captures_source import seed_captures

pytestmark = pytest.mark.slow
OWNER = "monitor-e2e"
LOOP_CONFIG = """\
monitor:
  owner: qa@example.com
  retrain:
    min_new_labels: 40
    holdout_min: 20
    holdout_share: 0.3
    cooldown_s: 0
    strategy: {strategy}
    max_regression: {max_regression}
    set: [{sets}]
environments:
  staging:
    port: {staging_port}
    replica_test: {{rules: ["accuracy >= 0.0"], load_requests: 20, concurrency: 2, {replay},
                   timeout_s: 120, max_p95_ms: 600000, max_memory_mb: 4096}}
  production:
    port: {prod_port}
    canary: {{min_requests: 5, promote_needs_labels: false}}
"""


@dataclass
class LoopProject:
    root: Path
    config_path: Path
    config: Config
    store: MetadataStore
    artifacts: ArtifactStore
    production: pd.DataFrame  # images production sees: path, label (another lake)

    def images(self, n: int, offset: int = 0) -> tuple[list[bytes], list[str]]:
        """``n`` production images (from ``offset``) and their true labels."""
        rows = self.production.iloc[offset : offset + n]
        assert len(rows) == n
        return [Path(p).read_bytes() for p in rows["path"]], rows["label"].tolist()

    def alert(self, action: str, rule: str = "accuracy-low") -> Any:
        alert = self.store.alerts.open_alert(
            rule, "accuracy", "production", "tiny", 1, "global", "critical", "<", 0.4, 0.3, 50,
            action, state="firing",
        )  # fmt: skip
        assert alert is not None
        return alert

    def advance(self, loop_id: int) -> Any:
        return loops.advance(self.config, self.store, self.artifacts, loop_id, owner=OWNER)


@pytest.fixture(scope="session")
def production_images(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Images like the tiny lake's but others (another seed, no defects): what production
    captures."""
    from loopline.examples.vehicles.datagen import generate_lake

    out = tmp_path_factory.mktemp("production")
    generate_lake(out, images=240, seed=11, cameras=2, defect_rate=0.0)
    rows = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    rows["path"] = [str(out / p) for p in rows["path"]]
    return rows[["path", "label"]]


def make_project(
    root: Path, lake: Path, production: pd.DataFrame, *, strategy: str = "canary",
    sets: str = "", max_regression: float = 1.0, db_url: str | None = None,
    replay: str = "replay: 0",
) -> LoopProject:  # fmt: skip
    """tiny:1 built on the lake and serving production (directly, no replica test).

    The loop's gate lets any candidate through unless ``max_regression`` says otherwise:
    tiny models of one epoch are not the point of these tests.
    """
    from loopline.builder.pipeline import build

    root.mkdir(parents=True, exist_ok=True)
    path = root / "loopline.yaml"
    text = TINY_CONFIG.format(db=db_url or f"sqlite:///{root / 'state' / 'loopline.db'}",
                              artifacts=root / "state" / "artifacts", lake=lake)  # fmt: skip
    text += LOOP_CONFIG.format(strategy=strategy, sets=sets, max_regression=max_regression,
                               staging_port=free_port(), prod_port=free_port(),
                               replay=replay)  # fmt: skip
    path.write_text(text)
    cfg = load_config(path)
    store, artifacts = MetadataStore(cfg.metadata_url()), ArtifactStore(cfg.artifacts_url())
    result = build(cfg, stores=(store, artifacts))
    assert result.status == "succeeded" and result.model is not None
    release.promote(store, "tiny:1", to="production", require_replica_test=False, actor="setup")
    return LoopProject(root, path, cfg, store, artifacts, production)


def _after_v1(lp: LoopProject) -> Any:
    created = lp.store.models.get("tiny", 1).created_at
    return (created.replace(tzinfo=UTC) if created.tzinfo is None else created) + timedelta(
        seconds=1
    )


def seed(lp: LoopProject, train: tuple[list[bytes], list[str]],
         held: tuple[list[bytes], list[str]]) -> tuple[list[str], list[str]]:  # fmt: skip
    """Labelled captures after v1: ``train`` first, then the newest, ``held`` (held out)."""
    start = _after_v1(lp)
    first = seed_captures(lp.store, lp.artifacts, train[0], labels=list(train[1]), start=start)
    later = start + timedelta(seconds=len(train[0]) + 10)
    last = seed_captures(lp.store, lp.artifacts, held[0], labels=list(held[1]), start=later)
    return first, last


@pytest.fixture
def projects(
    tmp_path: Path, tiny_lake: Path, production_images: pd.DataFrame
) -> Iterator[Callable[..., LoopProject]]:
    """``projects(**options)``: a new project (see ``make_project``), closed afterwards."""
    made: list[LoopProject] = []

    def make(**options: Any) -> LoopProject:
        made.append(make_project(tmp_path / f"p{len(made)}", tiny_lake, production_images,
                                 **options))  # fmt: skip
        return made[-1]

    yield make
    for project in made:
        project.store.close()


def test_a_worse_candidate_is_rejected_by_the_gate_and_production_keeps_the_incumbent(
    projects: Callable[..., LoopProject],
) -> None:
    from loopline.builder.evaluate_registered import score_bundle

    # The build's own gate lets it through (gate.max_regression): the loop's gate is tested.
    lp = projects(max_regression=0.0, sets='"gate.max_regression=1.0"')
    # Held out: test-split images labelled with what tiny:1 answers (it scores 1.0 there).
    held_images, _ = lp.images(24)
    train_images, _ = lp.images(56, offset=24)  # 80 labelled: the newest 24 held out
    tmp = seed_captures(lp.store, lp.artifacts, held_images, labels=["car"] * 24,
                        environment="scratch")  # fmt: skip
    src = captures_of(lp, "scratch")
    mv1 = lp.store.models.get("tiny", 1)
    _, pred = score_bundle(lp.artifacts, src, mv1.bundle_sha256, src.list_records(),
                           lp.config.data.labels)  # fmt: skip
    answers = [lp.config.data.labels[i] for i in pred]
    # Trained on the rest labelled all as the class tiny:1 answers least: a worse model.
    rare = min(lp.config.data.labels, key=answers.count)
    seed(lp, (train_images, [rare] * 56), (held_images, answers))
    assert len(tmp) == 24
    before = lp.store.deployments.get("production")

    alert = lp.alert("retrain")
    loop = loops.start(lp.store, alert, lp.config)
    done = lp.advance(loop.id)
    assert done.status == "rejected", (done.reason, done.state.get("gate"), answers, rare)
    assert done.reason.startswith(GATE_PREFIX + "accuracy on 24 held-out labelled production")
    gate = done.state["gate"]
    assert gate["incumbent"] == {**gate["incumbent"], "version": 1, "accuracy": 1.0}
    assert gate["candidate"]["version"] == 2 and gate["candidate"]["accuracy"] < 1.0
    assert gate["passed"] is False and gate["n"] == 24
    assert lp.store.alerts.get(alert.id).reason == done.reason
    assert lp.store.deployments.get("production") == before  # production untouched
    # The build was triggered by the alert; rejected, it leaves its captures to retention.
    run = lp.store.runs.get(done.run_id)
    assert (run.trigger, run.trigger_ref, run.status) == ("alert", str(alert.id), "succeeded")
    assert done.dataset_version == run.dataset_version and done.state["gated_against"] == 1
    assert lp.store.captures.count(dataset_version=done.dataset_version) == 0
    assert lp.store.captures.count(dataset_version=f"loop-{done.id}") == 0
    assert [e["step"] for e in done.timeline] == ["start", "dataset", "build", "build", "gate"]


def captures_of(lp: LoopProject, environment: str) -> Any:
    from loopline.drivers.data.captures import CapturesSource

    return CapturesSource(environment=environment, store=lp.store, artifacts=lp.artifacts)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_approval_rejection_then_approval_replica_canary_and_promotion(
    projects: Callable[..., LoopProject], backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_schema_url") if backend == "postgresql" else None
    lp = projects(sets='"gate.max_regression=1.0"', db_url=url)
    seed(lp, lp.images(56), lp.images(24, offset=56))
    before = lp.store.deployments.get("production")

    # A person rejects the first retrain: production keeps tiny:1.
    first = lp.alert("approve", rule="a")
    waiting = lp.advance(loops.start(lp.store, first, lp.config).id)
    assert (waiting.status, waiting.step, waiting.model_version) == ("waiting_approval",
                                                                     "approval", 2)  # fmt: skip
    assert f"`loopline approve {first.id}`" in waiting.reason
    assert lp.advance(waiting.id).status == "waiting_approval"
    rejected = loops.decide(lp.store, first.id, False, actor="qa", reason="not now")
    assert rejected.status == "rejected"
    assert lp.store.deployments.get("production") == before

    # The second is approved: the same build comes from the cache (tiny:2 again).
    second = lp.alert("approve", rule="b")
    loop = lp.advance(loops.start(lp.store, second, lp.config).id)
    assert (loop.status, loop.model_version) == ("waiting_approval", 2)
    loops.decide(lp.store, second.id, True, actor="qa")
    released = lp.advance(loop.id)  # replica test on a real server, then the canary
    assert released.status == "running" and released.step == "canary", released.reason
    test = lp.store.replica_tests.latest("tiny", 2, ["staging"])
    assert test is not None and test.passed and released.replica_test_id == test.id
    assert test.report["server"]["started"] == "temporary"  # a real server served tiny:2
    assert test.actor == "loopline (monitor)"
    # Its test split holds production captures, which the replica test read and passed on.
    assert [p["status"] for p in test.report["phases"]][0] == "passed"
    from loopline.pipeline import codecs

    split = next(s for s in lp.store.steps.for_run(loop.run_id) if s.step == "split")
    splits = codecs.decode("parquet", lp.artifacts.get_bytes(split.outputs["splits"]["sha256"]))
    test_paths = splits.loc[splits["split"] == "test", "path"]
    assert test_paths.str.startswith("captures/").any()
    dep = lp.store.deployments.get("production")
    assert (dep.stable_version, dep.candidate_version, dep.strategy) == (1, 2, "canary")

    # A production replica reports healthy canary traffic; the judge promotes it.
    lp.store.deployments.report_replica(
        "production", "replica-1", generation=dep.generation, versions=[1, 2], status="ok",
        stats={"versions": {"2": {"requests": 8, "errors": 0, "p95_ms": 5.0},
                            "1": {"requests": 80, "errors": 0, "p95_ms": 5.0}}},
    )  # fmt: skip
    new, verdict = canary.act(lp.store, "production", lp.config.environment("production"))
    assert new is not None and verdict.action == "promote", verdict.reason
    done = lp.advance(loop.id)
    assert (done.status, done.step) == ("succeeded", "done")
    assert lp.store.deployments.get("production").stable_version == 2
    steps = [(e["step"], e["status"]) for e in done.timeline]
    assert steps[-4:] == [("replica", "succeeded"), ("release", "succeeded"),
                          ("canary", "waiting"), ("canary", "succeeded")]  # fmt: skip
    kinds = [e["kind"] for e in lp.store.alerts.events(second.id)]
    assert kinds[-4:] == ["loop.started", "loop.waiting_approval", "loop.approved",
                          "loop.succeeded"]  # fmt: skip


def test_the_replica_test_replays_only_production_requests_the_candidate_did_not_train_on(
    projects: Callable[..., LoopProject],
) -> None:
    replay = "replay: 500, min_agreement: 0.0, max_accuracy_drop: 1.0"
    lp = projects(strategy="direct", sets='"gate.max_regression=1.0"', replay=replay)
    trained, held = seed(lp, lp.images(56), lp.images(24, offset=56))
    loop = loops.start(lp.store, lp.alert("retrain"), lp.config)
    done = lp.advance(loop.id)
    assert (done.status, done.step) == ("succeeded", "done"), done.reason
    assert done.state["holdout"] == held and done.state["gated_against"] == 1
    test = lp.store.replica_tests.latest("tiny", 2, ["staging"])
    assert test is not None and test.id == done.replica_test_id
    phase = next(p for p in test.report["phases"] if p["name"] == "replay")
    # 80 captured production requests; the 56 the candidate trained on are not replayed.
    assert phase["details"]["recorded"] == len(held) == 24, phase
    assert phase["details"]["replayed"] == 24 and len(trained) == 56
    # Released: its dataset keeps the captures it trained on; the held-out ones are let go.
    assert lp.store.captures.count(dataset_version=done.dataset_version) == 56
    assert lp.store.captures.count(dataset_version=f"loop-{done.id}") == 0


KILLED = """
import sys
from loopline.config import load_config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor import loop
cfg = load_config(sys.argv[1])
loop.advance(cfg, MetadataStore(cfg.metadata_url()), ArtifactStore(cfg.artifacts_url()),
             int(sys.argv[2]), owner=sys.argv[3])
"""


def test_a_monitor_killed_mid_build_is_resumed_and_the_loop_completes(
    projects: Callable[..., LoopProject],
) -> None:
    slow = '"train.epochs=12", "train.patience=12"'  # long enough to be killed in training
    lp = projects(strategy="direct", sets=f'"gate.max_regression=1.0", {slow}')
    seed(lp, lp.images(56), lp.images(24, offset=56))
    alert = lp.alert("retrain")
    loop = loops.start(lp.store, alert, lp.config)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(lp.config_path), str(loop.id), OWNER],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def training() -> bool:
            run_id = lp.store.loops.get(loop.id).run_id
            if run_id is None:
                return False
            steps = lp.store.steps.for_run(run_id)
            return any(s.step == "train" and s.status == "running" for s in steps)

        deadline = time.monotonic() + 180
        while not training():
            assert proc.poll() is None, "the monitor ended before it was killed"
            assert time.monotonic() < deadline, "the build never reached the train step"
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = lp.store.loops.get(loop.id)
    assert (killed.status, killed.step, killed.owner) == ("running", "build", OWNER)
    assert lp.store.runs.get(killed.run_id).status == "interrupted"
    # Another monitor is refused while the dead one's heartbeat is fresh ...
    other = loops.advance(
        lp.config, lp.store, lp.artifacts, loop.id, owner="someone-else", stale_after_s=3600
    )
    assert other.owner == OWNER and other.step == "build"
    # ... and the same monitor, restarted, resumes the run and completes the loop.
    done = lp.advance(loop.id)
    assert (done.status, done.step) == ("succeeded", "done"), done.reason
    assert done.run_id == killed.run_id and done.model_version == 2
    run = lp.store.runs.get(done.run_id)
    assert run.status == "succeeded" and run.trigger_ref == str(alert.id)
    reused = {s.step for s in lp.store.steps.for_run(run.id) if s.status == "succeeded"}
    assert {"ingest", "validate", "split", "train", "package"} <= reused
    assert len(lp.store.loops.list()) == 1 and done.attempts == 1
    assert lp.store.deployments.get("production").stable_version == 2
    assert ("build", "resumed") in [(e["step"], e["status"]) for e in done.timeline]
