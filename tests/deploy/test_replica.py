"""The replica test and ``deploy``: real servers on loopback, real ONNX models, a real lake.

A ridge classifier fit on the tiny lake's train split passes ``accuracy >= 0.4`` on its
test split; a constant-class model cannot. ``deploy`` starts a temporary server for the
staging environment (``python -m loopline.deploy.server --env staging``), runs the test
over HTTP, stops it and records the outcome that ``release.promote`` checks.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from loopline.deploy import release
from loopline.deploy.preprod import ReplicaStartFailed, deploy, temporary_server
from loopline.deploy.replica import run_replica_test
from loopline.deploy.replica_inputs import load_test_split, replay_sample
from loopline.deploy.replica_procs import alive, process_tree
from loopline.errors import ConfigError, Conflict
from tests.deploy.conftest import LABELS
from tests.deploy.replica_models import (
    RULE,
    ReplicaProject,
    constant_onnx,
    make_replica_project,
    onnx_labels,
    ridge_onnx,
)

ACCURACY_REASON = re.compile(r"^accuracy 0\.\d+ < 0\.4 \(rule accuracy >= 0\.4\)$")


@pytest.fixture(scope="module")
def rp(tmp_path_factory: pytest.TempPathFactory, tiny_lake: Path) -> ReplicaProject:
    return make_replica_project(tmp_path_factory.mktemp("replica"), tiny_lake)


@pytest.fixture(scope="module")
def models(rp: ReplicaProject) -> dict[str, Any]:
    """tiny:1 the ridge classifier, tiny:2 the constant one (always ``car``)."""
    rows, x = rp.images("train")
    good = ridge_onnx(x, np.array([LABELS.index(label) for label in rows["label"]]))
    const = constant_onnx("car")
    return {"good": good, "const": const, "v_good": rp.register(good),
            "v_const": rp.register(const)}  # fmt: skip


@pytest.fixture(scope="module")
def store(rp: ReplicaProject) -> Iterator[Any]:
    s = rp.store()
    yield s
    s.close()


@pytest.fixture(scope="module")
def served(rp: ReplicaProject, models: dict[str, Any], store: Any) -> Iterator[Any]:
    """tiny:1 served for environment ``preprod`` by the library's own temporary server."""
    release.stage(store, "tiny:1", env="preprod")
    with temporary_server(rp.config, rp.config_path, "preprod", store, "tiny", 1,
                          120.0) as replica:  # fmt: skip
        yield replica


def _policy(rp: ReplicaProject, **changes: Any) -> Any:
    return rp.config.environment("preprod").replica_test.model_copy(update=changes)


def _split(rp: ReplicaProject, store: Any, version: int = 1) -> Any:
    return load_test_split(rp.config, store, rp.artifacts(), store.models.get("tiny", version))


# A sitecustomize (on PYTHONPATH) that makes the first server process to load one version
# take longer: one worker of a server is then ready well before the other, on purpose.
SLOW_LOAD = """
import os, time
_spec = os.environ.get("LOOPLINE_TEST_SLOW_LOAD")
if _spec:
    import loopline.deploy.environment_app as _app
    _version, _seconds, _marker = _spec.split(":", 2)
    _load = _app.load_version
    def _slow(store, artifacts_url, name, version, settings):
        if version == int(_version):
            try:
                os.close(os.open(_marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                time.sleep(float(_seconds))
        return _load(store, artifacts_url, name, version, settings)
    _app.load_version = _slow
"""


def slow_load_env(folder: Path, version: int, seconds: float = 5.0) -> dict[str, str]:
    """Variables making the first process that loads ``version`` wait ``seconds`` first;
    ``folder / "claimed"`` exists once one did."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SLOW_LOAD)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    spec = f"{version}:{seconds}:{folder / 'claimed'}"
    return {"PYTHONPATH": path, "LOOPLINE_TEST_SLOW_LOAD": spec}


def _serving_replicas(
    store: Any, env: str, pids: list[int], generation: int, version: int
) -> list[Any]:
    ours = set(process_tree(pids))
    return [
        r
        for r in store.deployments.replicas(env)
        if r.pid in ours
        and r.generation >= generation
        and version in r.versions
        and r.status == "ok"
    ]


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


# -- the test split ------------------------------------------------------------------------------
def test_test_split_is_the_one_the_build_computes(rp: ReplicaProject, models: Any, store: Any):
    expected = sorted(rp.splits.loc[rp.splits["split"] == "test", "sha256"])
    split = _split(rp, store)
    assert sorted(split.records["sha256"]) == expected
    assert split.origin.startswith(f"dataset {rp.dataset_version[:12]} recomputed")
    assert split.notes == []  # the lake did not change since the version was registered

    few = load_test_split(rp.config, store, rp.artifacts(), store.models.get("tiny", 1),
                          max_images=5)  # fmt: skip
    assert len(few) == 5 and set(few.records["sha256"]) <= set(expected)
    assert few.notes == [f"5 of {len(expected)} test images (replica_test.max_test_images)"]


def test_imported_model_uses_the_configured_source_split_the_same_way(
    rp: ReplicaProject, models: Any, store: Any
) -> None:
    version = rp.register(constant_onnx("van"), dataset=False)
    imported = store.models.get("tiny", version)
    assert imported.dataset_version is None and imported.run_id is None
    split = load_test_split(rp.config, store, rp.artifacts(), imported)
    assert sorted(split.records["sha256"]) == sorted(
        rp.splits.loc[rp.splits["split"] == "test", "sha256"]
    )
    assert "no dataset of its own" in split.origin


# -- phases against one running replica --------------------------------------------------------
def test_bulk_scores_like_onnx_runtime_and_a_tiny_p95_budget_fails_load(
    rp: ReplicaProject, models: Any, store: Any, served: Any
) -> None:
    split = _split(rp, store)
    report = run_replica_test(
        served.url, "tiny", 1, policy=_policy(rp, max_p95_ms=0.001), rules=[RULE],
        test_split=split, pids=lambda: list(served.pids), environment="preprod",
    )  # fmt: skip
    bulk = report.phase("bulk")
    rows, x = rp.images("test")
    expected = np.mean(np.array(onnx_labels(models["good"], x)) == rows["label"].to_numpy())
    assert bulk.status == "passed"
    assert bulk.details["metrics"]["accuracy"] == pytest.approx(expected)
    assert bulk.details["answered"] == len(rows) and bulk.details["failed"] == 0
    load = report.phase("load")
    assert load.status == "failed" and load.details["requests"] == 40
    assert load.details["errors"] == 0
    assert not report.passed
    assert len(report.reasons) == 1
    assert re.fullmatch(
        r"load p95 latency [\d.]+ ms > 0\.001 ms \(replica_test\.max_p95_ms\)", report.reasons[0]
    ), report.reasons
    memory = report.phase("memory")
    assert memory.status == "passed" and served.pids[0] in memory.details["processes"]
    assert 10 < memory.details["peak_mb"] < 4096


def test_memory_over_budget_fails_and_unknown_processes_are_skipped(
    rp: ReplicaProject, store: Any, served: Any
) -> None:
    split = _split(rp, store)
    policy = _policy(rp, max_memory_mb=1.0, load_requests=0)
    report = run_replica_test(served.url, "tiny", 1, policy=policy, rules=[RULE],
                              test_split=split, pids=lambda: list(served.pids))  # fmt: skip
    assert report.phase("load").status == "skipped"
    assert report.phase("memory").status == "failed"
    assert re.fullmatch(r"server memory \(peak RSS\) [\d.]+ MB > 1 MB "
                        r"\(replica_test\.max_memory_mb\)", report.reasons[0])  # fmt: skip
    remote = run_replica_test(served.url, "tiny", 1, policy=policy.model_copy(
        update={"max_memory_mb": 4096.0}), rules=[RULE], test_split=split, pids=None)  # fmt: skip
    assert remote.phase("memory").status == "skipped" and remote.passed


def _record_production(
    store: Any, artifacts: Any, images: list[bytes], labels: list[str], *,
    env: str = "production", variant: str | None = "stable", capture: bool = True,
) -> None:  # fmt: skip
    now = datetime.now(UTC)
    rows, caps = [], []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pid = uuid.uuid4().hex
        rows.append(
            {
                "id": pid,
                "at": now + timedelta(milliseconds=i),
                "model_name": "tiny",
                "model_version": 1,
                "source": "v1",
                "label": label,
                "confidence": 0.9,
                "environment": env,
                "deployment_generation": 1,
                "variant": variant,
            }
        )
        if capture:
            ref = artifacts.put_bytes(image)
            caps.append({"prediction_id": pid, "sha256": ref.sha256, "bytes": len(image),
                         "media_type": "image/png", "environment": env, "at": now,
                         "expires_at": now + timedelta(days=30)})  # fmt: skip
    store.predictions.log(rows)
    store.captures.record(caps)


def test_replay_measures_agreement_with_production(
    rp: ReplicaProject, models: Any, store: Any, served: Any, tmp_path: Path
) -> None:
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    split = _split(rp, store)
    images = [split.read(i) for i in range(8)]
    rows, x = rp.images("test")
    by_sha = dict(zip(rows["sha256"], onnx_labels(models["good"], x), strict=True))
    answers = [by_sha[sha] for sha in split.records["sha256"][:8]]
    other = [next(lb for lb in LABELS if lb != a) for a in answers]
    # Production answered 4 of 6 as the candidate does; the other rows must not count.
    prod = MetadataStore(f"sqlite:///{tmp_path / 'prod.db'}")
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    _record_production(prod, artifacts, images[:6], answers[:4] + other[4:6])
    _record_production(prod, artifacts, images[6:8], other[6:8], variant="canary")
    _record_production(prod, artifacts, images[6:8], other[6:8], env="staging")
    _record_production(prod, artifacts, images[:3], answers[:3], capture=False)

    sample = replay_sample(prod, artifacts, "production", 50)
    assert len(sample.items) == 6 and sample.without_image == 3
    # None has ground truth: all six are judged by agreement (enough of them, here).
    report = run_replica_test(served.url, "tiny", 1, policy=_policy(rp, min_agreement=0.8,
                              load_requests=0, min_replay_requests=5), rules=[RULE],
                              test_split=split, replay=sample)  # fmt: skip
    replay = report.phase("replay")
    assert replay.status == "failed"
    assert (replay.details["compared"], replay.details["agreed"]) == (6, 4)
    assert (replay.details["unlabelled"], replay.details["unlabelled_agreed"]) == (6, 4)
    assert replay.details["labelled"] == 0 and replay.details["agreement_checked"] is True
    assert replay.details["without_image"] == 3
    assert report.reasons == ["agreement with production 0.667 < 0.8 (replica_test.min_agreement)"]
    assert "cannot be replayed" in replay.details["note"]
    lenient = run_replica_test(served.url, "tiny", 1, policy=_policy(rp, min_agreement=0.6,
                               load_requests=0, min_replay_requests=5), rules=[RULE],
                               test_split=split, replay=sample)  # fmt: skip
    assert lenient.phase("replay").status == "passed" and lenient.passed
    prod.close()


def test_replay_without_captured_requests_is_skipped_and_says_why(tmp_path: Path) -> None:
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    prod = MetadataStore(f"sqlite:///{tmp_path / 'prod.db'}")
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    _record_production(prod, artifacts, [b"x", b"y"], ["car", "van"], capture=False)
    sample = replay_sample(prod, artifacts, "production", 50)
    assert sample.items == [] and sample.without_image == 2
    assert sample.skip_reason is not None
    assert sample.skip_reason.startswith("no recorded production requests with a captured image")
    assert "2 logged without their image cannot be replayed" in sample.skip_reason
    assert replay_sample(prod, artifacts, None, 50).skip_reason == (
        "the environment replicates none (replica_of is not set)"
    )
    prod.close()


def test_a_temporary_server_of_two_workers_is_used_once_both_serve_the_candidate(
    rp: ReplicaProject, models: Any, store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``workers: 2`` a worker still loading answers 503: the test starts only once
    every worker reports the staged generation with the version loaded."""
    for key, value in slow_load_env(tmp_path / "slow", 1).items():
        monkeypatch.setenv(key, value)  # the temporary server inherits them
    cfg = rp.config
    cfg.environments["staging"].serve = {**cfg.environments["staging"].serve, "workers": 2}
    state = release.stage(store, "tiny:1", env="staging")
    with temporary_server(cfg, rp.config_path, "staging", store, "tiny", 1, 120.0) as replica:
        assert (tmp_path / "slow" / "claimed").exists()  # one worker was held up
        assert replica.pids is not None
        serving = _serving_replicas(store, "staging", replica.pids, state.generation, 1)
        assert len(serving) == 2, store.deployments.replicas("staging")
        for _ in range(20):  # new connections, which the kernel spreads over both workers
            r = httpx.get(f"{replica.url}/v2/models/tiny/versions/1/ready", timeout=10)
            assert r.status_code == 200, r.text
    assert store.deployments.replicas("staging") == []


# -- deploy: stage, temporary server, test, record -------------------------------------------------
def test_good_candidate_passes_and_can_then_be_promoted(
    rp: ReplicaProject, models: Any, store: Any
) -> None:
    with pytest.raises(release.PromotionRefused, match="has no replica test"):
        release.promote(store, "tiny:1", to="production")
    result = deploy(rp.config, store, "tiny:1", config_path=rp.config_path)
    report = result.report
    assert result.passed, report.reasons
    assert [p.status for p in report.phases] == ["passed", "skipped", "passed", "passed"]
    assert report.phase("replay").reason == (
        "no recorded production requests with a captured image"
    )
    # The temporary server is gone, its heartbeat too, and staging serves the candidate.
    assert report.server["started"] == "temporary" and report.server["left_running"] == []
    assert not alive(report.server["pid"]) and _port_closed(report.endpoint)
    assert store.deployments.replicas("staging") == []
    assert store.deployments.get("staging").stable_version == 1
    record = store.replica_tests.latest("tiny", 1)
    assert record is not None and record.passed and record.id == result.record.id
    assert result.path == rp.root / ".loopline" / "replica-tests" / f"{record.id}.json"
    import json

    assert json.loads(result.path.read_text())["passed"] is True
    state = release.promote(store, "tiny:1", to="production")
    assert (state.model_name, state.stable_version) == ("tiny", 1)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_constant_candidate_fails_on_accuracy_and_cannot_be_promoted(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, tiny_lake: Path
) -> None:
    db = (f"sqlite:///{tmp_path / 'state' / 'loopline.db'}" if backend == "sqlite"
          else str(request.getfixturevalue("pg_schema_url")))  # fmt: skip
    project = make_replica_project(tmp_path / "p", tiny_lake, db)
    version = project.register(constant_onnx("car"))
    store = project.store()
    try:
        result = deploy(project.config, store, f"tiny:{version}",
                        config_path=project.config_path)  # fmt: skip
        assert not result.passed
        assert len(result.report.reasons) == 1
        assert ACCURACY_REASON.fullmatch(result.report.reasons[0]), result.report.reasons
        assert result.report.phase("bulk").status == "failed"
        latest = store.replica_tests.latest("tiny", version)
        assert latest is not None and not latest.passed
        assert latest.reasons == result.report.reasons
        with pytest.raises(release.PromotionRefused) as refused:
            release.promote(store, f"tiny:{version}", to="production")
        assert result.report.reasons[0] in str(refused.value)
        assert "failed its latest replica test" in str(refused.value)
        assert store.deployments.get("production") is None
    finally:
        store.close()


def test_running_servers_of_the_environment_are_used(
    rp: ReplicaProject, models: Any, store: Any, tmp_path: Path
) -> None:
    """A staging server already running (as `loopline up --env staging` runs it) takes the
    new deployment; no temporary server is started. Its two workers take the candidate one
    after the other (one is held up on purpose): the test waits for both."""
    env = rp.config.environment("staging")
    log = rp.root / "staging-server.log"
    slow = slow_load_env(tmp_path / "slow", models["v_const"])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loopline.deploy.server", "--env", "staging", "--config",
             str(rp.config_path), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, cwd=rp.root,
            env={**os.environ, "LOOPLINE_SERVE_WORKERS": "2", **slow},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while (
            len([r for r in store.deployments.replicas("staging", seen_within_s=10)
                 if r.pid in process_tree([proc.pid])]) < 2
        ):  # fmt: skip
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the staging workers never reported"
            time.sleep(0.2)
        result = deploy(rp.config, store, f"tiny:{models['v_const']}",
                        config_path=rp.config_path)  # fmt: skip
        assert (tmp_path / "slow" / "claimed").exists()  # one worker was held up
        assert result.report.server["started"] == "running"
        workers = {f"{r.host}:{r.pid}" for r in store.deployments.replicas("staging")
                   if r.pid in process_tree([proc.pid]) and r.pid != proc.pid}  # fmt: skip
        assert len(workers) == 2
        assert sorted(result.report.server["replicas"]) == sorted(workers)
        assert result.report.endpoint == env.endpoint
        assert ACCURACY_REASON.fullmatch(result.report.reasons[0])
        assert proc.poll() is None  # left running: it is not ours to stop
        measured = result.report.phase("memory").details["processes"]
        assert set(measured) <= set(process_tree([proc.pid])) and measured
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_replica_that_cannot_start_shows_its_log_and_records_nothing(
    rp: ReplicaProject, models: Any, store: Any
) -> None:
    version = rp.register(constant_onnx("bus"))
    env = rp.config.environment("staging")
    with socket.socket() as taken:  # the staging port is in use by something else
        taken.bind((env.host, env.port))
        with pytest.raises(ReplicaStartFailed) as failed:
            deploy(rp.config, store, f"tiny:{version}", config_path=rp.config_path)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"the replica server for tiny:{version} exited with code")
    assert re.search(r"address already in use|errno 98", message, re.IGNORECASE), message
    assert store.replica_tests.latest("tiny", version) is None


def test_mistakes_are_refused_before_anything_changes(
    rp: ReplicaProject, models: Any, store: Any
) -> None:
    before = store.deployments.get("staging")
    with pytest.raises(ConfigError, match="production is a live environment"):
        deploy(rp.config, store, "tiny:1", env="production", config_path=rp.config_path)
    cfg = rp.config
    cfg.environments["staging"].replica_test.rules = ["per_class.plane.recall >= 0.5"]
    with pytest.raises(ConfigError, match="unknown metric 'per_class.plane.recall'"):
        deploy(cfg, store, "tiny:1", config_path=rp.config_path)
    cfg.environments["staging"].replica_test.rules = ["accuracy is high"]
    with pytest.raises(ConfigError, match="is not 'METRIC OP NUMBER'"):
        deploy(cfg, store, "tiny:1", config_path=rp.config_path)
    assert store.deployments.get("staging") == before


def test_one_replica_test_at_a_time_per_environment(
    rp: ReplicaProject, models: Any, store: Any
) -> None:
    before = store.deployments.get("staging")
    (rp.config.state_dir / "envs" / "staging").mkdir(parents=True, exist_ok=True)
    held = subprocess.Popen(  # another `loopline deploy` holding the staging test
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242'); f.flush(); print('held', "
         "flush=True); time.sleep(60)", str(rp.config.state_dir / "envs" / "staging" /
                                            "replica-test.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert held.stdout is not None and held.stdout.readline().strip() == "held"
        with pytest.raises(Conflict, match="a replica test is already running in staging"):
            deploy(rp.config, store, "tiny:1", config_path=rp.config_path)
    finally:
        held.kill()
        held.wait()
    assert store.deployments.get("staging") == before


# -- the split of a real build -------------------------------------------------------------------
@pytest.mark.slow
def test_a_built_model_is_tested_on_its_build_split(project: Path) -> None:
    from loopline.builder.pipeline import build, open_stores
    from loopline.config import load_config
    from loopline.pipeline import codecs

    cfg = load_config(project)
    result = build(cfg)
    assert result.status == "succeeded" and result.model is not None
    store, artifacts = open_stores(cfg)
    mv = store.models.get("tiny", result.model["version"])
    step = next(s for s in store.steps.for_run(result.run_id) if s.step == "split")
    splits = codecs.decode("parquet", artifacts.get_bytes(step.outputs["splits"]["sha256"]))
    expected = sorted(splits.loc[splits["split"] == "test", "sha256"])

    split = load_test_split(cfg, store, artifacts, mv)
    assert split.origin == f"the split of build run {result.run_id}"
    assert sorted(split.records["sha256"]) == expected
    # Without the stored split, recomputing it gives the same records.
    artifacts.delete(step.outputs["splits"]["sha256"])
    again = load_test_split(cfg, store, artifacts, mv)
    assert sorted(again.records["sha256"]) == expected
    assert again.notes == [
        f"the split of build run {result.run_id} is no longer stored; recomputed"
    ]
    store.close()
