"""The replica test of a model the loop retrained, and replayed traffic judged by ground truth.

- A model built as the retrain loop builds it (``data.also``: labelled production captures)
  has ``captures/<prediction_id>`` paths in its test split. ``loopline deploy`` run by hand,
  with the project's config (no ``data.also``), still reads them: the records' source is
  opened from the model's own build run config. A real build, a real temporary server.
- Replayed production requests that have a feedback label are judged by accuracy (the
  candidate's against production's), agreement with production only on those without one:
  a good candidate replacing a failing production model disagrees with it on purpose.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from loopline.config import Config, load_config, parse_config
from loopline.deploy import release
from loopline.deploy.preprod import temporary_server
from loopline.deploy.replica import run_replica_test
from loopline.deploy.replica_inputs import load_test_split, replay_sample
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.data.captures import PREFIX
from loopline.drivers.metadata.store import MetadataStore
from tests.conftest import TINY_CONFIG
from tests.deploy.conftest import LABELS, free_port
from tests.deploy.replica_models import (
    RULE,
    ReplicaProject,
    make_replica_project,
    onnx_labels,
    ridge_onnx,
)
from tests.drivers.test_captures_source import seed_captures

ENVIRONMENTS = """\
environments:
  production: {{port: {prod_port}, serve: {{workers: 1, flush_interval_s: 0.2}}}}
  staging:
    port: {staging_port}
    replica_test: {{rules: ["accuracy >= 0.0"], load_requests: 10, concurrency: 2, replay: 0,
                   timeout_s: 120, max_p95_ms: 600000, max_memory_mb: 4096}}
"""
CAPTURES = {"kind": "captures", "environment": "production", "model_name": "tiny"}


# -- a model built on the lake plus labelled captures -----------------------------------------
@dataclass
class Retrained:
    config_path: Path
    config: Config  # the project's: no data.also
    store: MetadataStore
    artifacts: ArtifactStore
    version: int
    run_id: str
    captured: dict[str, bytes]  # captures/<prediction_id> -> the captured image


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory, tiny_lake: Path) -> Iterator[Retrained]:
    from loopline.builder.pipeline import build
    from loopline.examples.vehicles.datagen import generate_lake

    root = tmp_path_factory.mktemp("retrained")
    path = root / "loopline.yaml"
    path.write_text(
        TINY_CONFIG.format(db=f"sqlite:///{root / 'state' / 'loopline.db'}",
                           artifacts=root / "state" / "artifacts", lake=tiny_lake)
        + ENVIRONMENTS.format(prod_port=free_port(), staging_port=free_port())
    )  # fmt: skip
    cfg = load_config(path)
    store, artifacts = MetadataStore(cfg.metadata_url()), ArtifactStore(cfg.artifacts_url())
    # Labelled production captures: other images than the lake's (another seed).
    generate_lake(root / "production", images=80, seed=11, cameras=2, defect_rate=0.0)
    rows = pd.read_csv(root / "production" / "manifest.csv", dtype=str, keep_default_na=False)
    images = [(root / "production" / p).read_bytes() for p in rows["path"]]
    ids = seed_captures(store, artifacts, images, labels=rows["label"].tolist(),
                        start=datetime.now(UTC) - timedelta(hours=1))  # fmt: skip
    # The build the retrain loop runs: the project's config with the captures in data.also.
    raw = cfg.to_dict()
    raw["data"]["also"] = [CAPTURES]
    loop_cfg = parse_config(raw, cfg.root, "the retrain config").with_credentials_from(cfg)
    result = build(loop_cfg, stores=(store, artifacts), trigger="alert", trigger_ref="1")
    assert result.status == "succeeded" and result.model is not None, result.reason
    assert store.runs.get(result.run_id).config["data"]["also"][0]["kind"] == "captures"
    assert cfg.data.also == []
    captured = {f"{PREFIX}{pid}": data for pid, data in zip(ids, images, strict=True)}
    yield Retrained(path, cfg, store, artifacts, int(result.model["version"]), result.run_id,
                    captured)  # fmt: skip
    store.close()


def _build_test_split(r: Retrained) -> pd.DataFrame:
    from loopline.pipeline import codecs

    step = next(s for s in r.store.steps.for_run(r.run_id) if s.step == "split")
    splits = codecs.decode("parquet", r.artifacts.get_bytes(step.outputs["splits"]["sha256"]))
    return splits[splits["split"] == "test"]


@pytest.mark.slow
def test_deploy_by_hand_reads_the_captured_test_images_of_a_retrained_model(
    retrained: Retrained,
) -> None:
    r = retrained
    expected = _build_test_split(r)
    from_captures = expected[expected["path"].str.startswith(PREFIX)]
    assert len(from_captures) > 0  # the test split holds production captures

    split = load_test_split(r.config, r.store, r.artifacts, r.store.models.get("tiny", r.version))
    assert split.origin == f"the split of build run {r.run_id}"
    assert sorted(split.records["path"]) == sorted(expected["path"])
    for i, path in enumerate(split.records["path"]):  # each read verified by its sha256
        data = split.read(i)
        if path.startswith(PREFIX):
            assert data == r.captured[path]

    # `loopline deploy tiny:N --env staging` with the project's loopline.yaml.
    result = CliRunner().invoke(
        app(), ["deploy", f"tiny:{r.version}", "--env", "staging", "--json", "-c",
                str(r.config_path)], env={"COLUMNS": "200"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    bulk = next(p for p in report["phases"] if p["name"] == "bulk")
    assert bulk["status"] == "passed", bulk
    assert (bulk["details"]["answered"], bulk["details"]["failed"]) == (len(expected), 0)
    assert report["passed"] is True, report["reasons"]


@pytest.mark.slow
def test_a_recomputed_split_of_a_retrained_model_holds_its_captures(
    retrained: Retrained,
) -> None:
    """Without the stored split, the records are ingested again as the build ingested
    them: from the run's sources (the lake and the captures), not the project's one."""
    r = retrained
    expected = _build_test_split(r)
    step = next(s for s in r.store.steps.for_run(r.run_id) if s.step == "split")
    r.artifacts.delete(step.outputs["splits"]["sha256"])
    mv = r.store.models.get("tiny", r.version)
    split = load_test_split(r.config, r.store, r.artifacts, mv)
    assert split.notes == [f"the split of build run {r.run_id} is no longer stored; recomputed"]
    assert sorted(split.records["sha256"]) == sorted(expected["sha256"])
    assert split.records["path"].str.startswith(PREFIX).any()
    captured = [i for i, p in enumerate(split.records["path"]) if p.startswith(PREFIX)]
    assert split.read(captured[0]) == r.captured[split.records["path"].iloc[captured[0]]]


def app() -> Any:
    from loopline.cli.main import app as cli

    return cli


# -- replay judged by ground truth -----------------------------------------------------------
@pytest.fixture(scope="module")
def rp(tmp_path_factory: pytest.TempPathFactory, tiny_lake: Path) -> ReplicaProject:
    return make_replica_project(tmp_path_factory.mktemp("replay-truth"), tiny_lake)


@dataclass
class Served:
    url: str
    split: Any  # the candidate's test split: images with their true labels
    answers: list[str]  # what the candidate (tiny:1, a ridge classifier) answers for them


@pytest.fixture(scope="module")
def served(rp: ReplicaProject) -> Iterator[Served]:
    rows, x = rp.images("train")
    good = ridge_onnx(x, np.array([LABELS.index(label) for label in rows["label"]]))
    assert rp.register(good) == 1
    store = rp.store()
    split = load_test_split(rp.config, store, rp.artifacts(), store.models.get("tiny", 1))
    test_rows, test_x = rp.images("test")
    by_sha = dict(zip(test_rows["sha256"], onnx_labels(good, test_x), strict=True))
    answers = [by_sha[sha] for sha in split.records["sha256"]]
    release.stage(store, "tiny:1", env="preprod")
    try:
        with temporary_server(rp.config, rp.config_path, "preprod", store, "tiny", 1,
                              120.0) as replica:  # fmt: skip
            yield Served(replica.url, split, answers)
    finally:
        store.close()


def _wrong(label: str) -> str:
    return next(lb for lb in LABELS if lb != label)


def _record(
    prod: MetadataStore, artifacts: ArtifactStore, items: Sequence[tuple[bytes, str, str | None]],
    start: datetime,
) -> None:  # fmt: skip
    """Production answered ``answer`` for each image; ``truth`` came back as feedback."""
    rows, caps, feedback = [], [], []
    for i, (image, answer, truth) in enumerate(items):
        pid, at = uuid.uuid4().hex, start + timedelta(milliseconds=i)
        rows.append({"id": pid, "at": at, "model_name": "tiny", "model_version": 7,
                     "source": "v1", "label": answer, "confidence": 0.9,
                     "environment": "production", "deployment_generation": 1,
                     "variant": "stable"})  # fmt: skip
        ref = artifacts.put_bytes(image)
        caps.append({"prediction_id": pid, "sha256": ref.sha256, "bytes": len(image),
                     "media_type": "image/png", "environment": "production", "at": at,
                     "expires_at": at + timedelta(days=30)})  # fmt: skip
        if truth is not None:
            feedback.append((pid, truth))
    prod.predictions.log(rows)
    prod.captures.record(caps)
    if feedback:
        assert all(r["status"] == "recorded" for r in prod.predictions.record_feedback(feedback))


@dataclass
class Production:
    store: MetadataStore
    artifacts: ArtifactStore

    def sample(self) -> Any:
        return replay_sample(self.store, self.artifacts, "production", 500)


@pytest.fixture
def production(tmp_path: Path) -> Iterator[Production]:
    prod = MetadataStore(f"sqlite:///{tmp_path / 'prod.db'}")
    yield Production(prod, ArtifactStore(str(tmp_path / "artifacts")))
    prod.close()


def _replay(rp: ReplicaProject, served: Served, sample: Any, **policy: Any) -> Any:
    changes = {"load_requests": 0, **policy}
    report = run_replica_test(
        served.url, "tiny", 1, rules=[RULE], test_split=served.split, replay=sample,
        policy=rp.config.environment("preprod").replica_test.model_copy(update=changes),
    )  # fmt: skip
    return report, report.phase("replay")


def _accuracy(answers: list[str], truths: list[str]) -> float:
    return float(np.mean([a == t for a, t in zip(answers, truths, strict=True)]))


def test_a_good_candidate_replacing_a_failing_production_passes_replay_on_accuracy(
    rp: ReplicaProject, served: Served, production: Production
) -> None:
    """Production answered wrong on every labelled request (it collapsed); the candidate
    disagrees with it on purpose, and is judged on the ground truth instead."""
    split, truths = served.split, served.split.records["label"].tolist()
    images = [split.read(i) for i in range(len(split))]
    assert len(images) >= 20
    _record(production.store, production.artifacts,
            [(img, _wrong(t), t) for img, t in zip(images, truths, strict=True)],
            datetime.now(UTC))  # fmt: skip
    sample = production.sample()
    assert [item.truth for item in reversed(sample.items)] == truths  # newest first
    report, replay = _replay(rp, served, sample)
    assert replay.status == "passed", report.reasons
    candidate = _accuracy(served.answers, truths)
    d = replay.details
    assert d["labelled"] == len(images) and d["unlabelled"] == 0
    assert d["candidate_accuracy"] == pytest.approx(candidate) and candidate > 0.3
    assert d["production_accuracy"] == 0.0
    assert (d["compared"], d["agreed"]) == (len(images), sum(
        a == _wrong(t) for a, t in zip(served.answers, truths, strict=True)))  # fmt: skip
    names = [c.name for c in replay.checks]
    assert names == ["replay error rate", "replay accuracy"]
    acc = replay.checks[1]
    assert (acc.value, acc.limit) == (pytest.approx(candidate), 0.0)
    assert d["agreement_checked"] is False
    assert d["agreement_note"] == (
        "not checked: every replayed request has ground truth (judged by accuracy)"
    )
    assert report.passed


def test_a_candidate_less_accurate_than_production_on_labelled_requests_fails(
    rp: ReplicaProject, served: Served, production: Production
) -> None:
    split, truths = served.split, served.split.records["label"].tolist()
    images = [split.read(i) for i in range(len(split))]
    _record(production.store, production.artifacts,
            [(img, t, t) for img, t in zip(images, truths, strict=True)],
            datetime.now(UTC))  # fmt: skip
    report, replay = _replay(rp, served, production.sample(), max_accuracy_drop=0.05)
    candidate = _accuracy(served.answers, truths)
    assert candidate < 0.95
    assert replay.status == "failed"
    assert replay.details["production_accuracy"] == 1.0
    assert report.reasons == [
        f"replay accuracy {candidate:.3g} < 0.95 (production's accuracy 1 on "
        f"{len(images)} labelled replayed requests - replica_test.max_accuracy_drop 0.05)"
    ]


def test_agreement_is_checked_on_requests_without_ground_truth_only(
    rp: ReplicaProject, served: Served, production: Production
) -> None:
    split = served.split
    n = len(split)
    images = [split.read(i) for i in range(n)]
    # Unlabelled requests that production answered unlike the candidate in half the cases.
    half = [(img, a if i % 2 else _wrong(a), None)
            for i, (img, a) in enumerate(zip(images, served.answers, strict=True))]  # fmt: skip
    agreed = sum(1 for i in range(n) if i % 2)
    _record(production.store, production.artifacts, half, datetime.now(UTC))
    report, replay = _replay(rp, served, production.sample())
    assert replay.status == "failed"
    d = replay.details
    assert (d["labelled"], d["unlabelled"], d["unlabelled_agreed"]) == (0, n, agreed)
    assert d["agreement_checked"] is True and d["candidate_accuracy"] is None
    assert d["accuracy_note"] == "not checked: no replayed request has ground truth"
    assert report.reasons == [
        f"agreement with production {agreed / n:.3g} < 0.8 (replica_test.min_agreement)"
    ]
    # Too few unlabelled ones to say anything: reported, not checked.
    report, replay = _replay(rp, served, production.sample(), min_replay_requests=n + 1)
    assert replay.status == "passed" and report.passed
    assert replay.details["agreement"] == pytest.approx(agreed / n)
    assert replay.details["agreement_note"] == (
        f"not checked: {n} replayed requests without ground truth, fewer than "
        f"replica_test.min_replay_requests ({n + 1})"
    )
    assert [c.name for c in replay.checks] == ["replay error rate"]


def test_disagreeing_with_a_production_model_shown_less_accurate_is_no_failure(
    rp: ReplicaProject, served: Served, production: Production
) -> None:
    """The newest requests have no label yet (feedback arrives later); production is as
    wrong on them as on the labelled ones, which show it: agreement is not held against
    the candidate."""
    split, truths = served.split, served.split.records["label"].tolist()
    images = [split.read(i) for i in range(len(split))]
    now = datetime.now(UTC)
    _record(production.store, production.artifacts,
            [(img, _wrong(t), t) for img, t in zip(images, truths, strict=True)],
            now - timedelta(minutes=5))  # fmt: skip
    _record(production.store, production.artifacts,
            [(img, _wrong(a), None) for img, a in zip(images, served.answers, strict=True)],
            now)  # fmt: skip
    report, replay = _replay(rp, served, production.sample())
    assert replay.status == "passed", report.reasons
    d = replay.details
    assert d["agreement"] == 0.0 and d["agreement_checked"] is False
    assert d["agreement_note"].startswith(
        f"not checked: on the {len(images)} labelled replayed requests production is less "
        "accurate than the candidate"
    )
    # A tolerance so wide that no accuracy gap counts: agreement is checked again.
    report, replay = _replay(rp, served, production.sample(), max_accuracy_drop=1.0)
    assert replay.details["agreement_checked"] is True
    assert report.reasons == ["agreement with production 0 < 0.8 (replica_test.min_agreement)"]
