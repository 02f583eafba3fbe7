"""The retrain loop's data and its gate on real stores (SQLite and PostgreSQL), without a
build: the gate scores real ONNX bundles (constant classifiers written with onnx.helper)
against the version production serves now; the held-out set is the newest
``holdout_max``; a retrain's config starts from the incumbent's build config (its captures
included); the captures a loop needs are kept from retention until it ends; the replay
of a candidate's replica test skips what it was trained on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loopline.config import Config, parse_config
from loopline.deploy import release
from loopline.deploy.replica_inputs import replay_sample
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.data import open_source
from loopline.drivers.data.captures import PREFIX
from loopline.drivers.metadata.loops import LoopRecord
from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor import loop as loops
from loopline.monitor.retrain import LoopContext, _built, build_config, dataset, gate
from loopline.monitor.retrain_data import loop_marker, release_captures
from tests.deploy.conftest import bundle_files
from tests.deploy.models import SIZE, colour_image, constant_model
from tests.drivers.test_captures_source import T0, png, seed_captures

OWNER = "retrain-test"


@dataclass
class Env:
    root: Path
    config: Config
    store: MetadataStore
    artifacts: ArtifactStore

    def register(self, answers: str, **fields: Any) -> int:
        """A real bundle that answers ``answers`` to every image, registered as tiny:N."""
        from loopline.bundle import write_bundle

        tar = self.root / f"{answers}-{uuid.uuid4().hex[:6]}.tar"
        write_bundle(bundle_files(constant_model(answers), size=SIZE, name="tiny"), tar)
        ref = self.artifacts.put_file(tar)
        reg = self.store.models.register("tiny", bundle_uri=ref.uri, bundle_sha256=ref.sha256,
                                         metrics={}, lineage={}, **fields)  # fmt: skip
        return int(reg.version.version)

    def after(self, version: int, seconds: float = 1.0) -> datetime:
        created = self.store.models.get("tiny", version).created_at
        aware = created.replace(tzinfo=UTC) if created.tzinfo is None else created
        return aware + timedelta(seconds=seconds)

    def backdate(self, version: int, hours: float) -> None:
        """tiny:``version`` was registered ``hours`` earlier."""
        from sqlalchemy import update

        from loopline.drivers.metadata.models import ModelVersion

        when = datetime.now(UTC) - timedelta(hours=hours)
        with self.store.session() as s:
            s.execute(update(ModelVersion).where(ModelVersion.name == "tiny",
                                                 ModelVersion.version == version)
                      .values(created_at=when))  # fmt: skip

    def loop(self, version: int, rule: str = "acc") -> tuple[LoopContext, LoopRecord]:
        """A retrain loop for an alert on tiny:``version``, held by this test."""
        alert = self.store.alerts.open_alert(
            rule, "accuracy", "production", "tiny", version, "global", "critical", "<", 0.4,
            0.3, 50, "retrain", state="firing",
        )  # fmt: skip
        assert alert is not None
        loop = loops.start(self.store, alert, self.config)
        assert loop.step == "dataset", loop.reason
        claimed = self.store.loops.claim(loop.id, OWNER, stale_after_s=60)
        assert claimed is not None
        return LoopContext(self.config, self.store, self.artifacts, OWNER), claimed

    def move(self, loop: LoopRecord, **fields: Any) -> LoopRecord:
        return self.store.loops.advance(loop.id, OWNER, **fields)

    def captures(self, labels: list[str], start: datetime, **kw: Any) -> list[str]:
        images = [colour_image(label, i) for i, label in enumerate(labels)]
        return seed_captures(self.store, self.artifacts, images, labels=list(labels),
                             start=start, **kw)  # fmt: skip

    def marked(self, dataset_version: str) -> int:
        return self.store.captures.count(dataset_version=dataset_version)


def make_env(root: Path, db_url: str, **retrain: Any) -> Env:
    policy = {"min_new_labels": 10, "holdout_min": 4, "holdout_share": 0.5, "cooldown_s": 0,
              **retrain}  # fmt: skip
    cfg = parse_config(
        {"model": {"name": "tiny"},
         "store": {"metadata_url": db_url, "artifacts_url": str(root / "artifacts")},
         "gate": {"rules": ["accuracy >= 0.0"]},
         "monitor": {"retrain": policy}},
        root,
    )  # fmt: skip
    return Env(root, cfg, MetadataStore(cfg.metadata_url()), ArtifactStore(cfg.artifacts_url()))


@pytest.fixture
def envs(db_url: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Env] = []

    def make(**retrain: Any) -> Env:
        made.append(make_env(tmp_path, db_url, **retrain))
        return made[-1]

    yield make
    for env in made:
        env.store.close()


# -- the gate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("promoted_meanwhile", [False, True])
def test_the_gate_scores_the_candidate_against_what_production_serves_now(
    envs: Any, promoted_meanwhile: bool
) -> None:
    env = envs()
    v1, v2, v3 = env.register("bus"), env.register("van"), env.register("car")
    release.promote(env.store, f"tiny:{v1}", to="production", require_replica_test=False,
                    actor="setup")  # fmt: skip
    start = env.after(v3)
    env.captures(["truck"] * 10, start)
    held = env.captures(["car"] * 6 + ["van"] * 4, start + timedelta(seconds=30))
    ctx, loop = env.loop(v1)
    ready = dataset(ctx, loop)
    assert ready is not None and ready.state["holdout"] == held
    if promoted_meanwhile:  # a person released tiny:3 after the alert on tiny:1
        release.promote(env.store, f"tiny:{v3}", to="production", require_replica_test=False,
                        actor="qa")  # fmt: skip
    done = gate(ctx, env.move(ready, step="gate", model_version=v2))
    assert done is not None
    scores = done.state["gate"]
    assert scores["n"] == 10 and scores["candidate"]["accuracy"] == pytest.approx(0.4)
    if promoted_meanwhile:
        # tiny:2 beats tiny:1 (0.4 > 0.0) but trails tiny:3, which serves now (0.6).
        assert (done.status, scores["passed"]) == ("rejected", False)
        assert scores["incumbent"]["version"] == v3 and done.state["gated_against"] == v3
        assert scores["incumbent"]["accuracy"] == pytest.approx(0.6)
        assert f"incumbent tiny:{v3} 0.600" in str(done.reason)
        assert "after the alert on tiny:1" in str(done.reason)
    else:
        assert (done.status, done.step, scores["passed"]) == ("running", "replica", True)
        assert scores["incumbent"]["version"] == v1 and done.state["gated_against"] == v1


def test_the_held_out_captures_are_the_newest_holdout_max(envs: Any) -> None:
    env = envs(holdout_max=3, holdout_min=2, min_new_labels=6)
    v1, v2 = env.register("bus"), env.register("car")
    start = env.after(v2)
    ids = env.captures(["car"] * 10, start)
    ctx, loop = env.loop(v1)
    ready = dataset(ctx, loop)
    assert ready is not None
    # max(2, ceil(0.5 * 10)) = 5 would be held out; holdout_max keeps the newest 3.
    assert ready.state["labelled"] == 10 and ready.state["holdout"] == ids[-3:]
    assert datetime.fromisoformat(ready.state["until"]) == start + timedelta(seconds=7)
    assert datetime.fromisoformat(ready.state["holdout_end"]) == start + timedelta(seconds=9)
    assert ready.state["train_captures"] == 7
    # Newer labelled captures after the dataset step are not scored: the held-out ones are.
    env.captures(["van"] * 5, start + timedelta(seconds=60))
    done = gate(ctx, env.move(ready, step="gate", model_version=v2))
    assert done is not None and done.state["gate"]["n"] == 3, done
    assert done.state["gate"]["candidate"]["accuracy"] == 1.0


# -- the training data -------------------------------------------------------------------------
def test_a_second_retrain_trains_on_the_first_ones_captures_and_the_new_ones(envs: Any) -> None:
    env = envs(set=["train.epochs=2"])
    lake = env.root / "lake" / "car"
    lake.mkdir(parents=True)
    for i in range(3):
        (lake / f"{i}.png").write_bytes(png(500 + i))
    v1 = env.register("bus")  # registered by hand: no build run, the project's config
    env.backdate(v1, hours=1)
    a_ids = env.captures(["car"] * 12, env.after(v1))  # an hour ago, before tiny:2
    ctx, first = env.loop(v1, rule="a")
    first = dataset(ctx, first)
    assert first is not None
    a_held = first.state["holdout"]
    cfg1 = build_config(ctx, first)
    assert [(s.since, s.until) for s in cfg1.data.also] == [
        (first.state["since"], first.state["until"])
    ]
    # tiny:2 was built on that config (captures A), as the loop's build would record it.
    env.store.runs.create("run-tiny-2", pipeline="build", project="tiny", config=cfg1.to_dict(),
                          trigger="alert", trigger_ref=str(first.alert_id))  # fmt: skip
    v2 = env.register("car", run_id="run-tiny-2")
    ctx.finish(first, "succeeded", None)
    b_ids = env.captures(["van"] * 12, env.after(v2))
    ctx, second = env.loop(v2, rule="b")
    second = dataset(ctx, second)
    assert second is not None
    # The new data begins where tiny:2's ended: A's held-out captures are in it.
    assert second.state["since"] == first.state["until"]
    cfg2 = build_config(ctx, second)
    assert [(s.since, s.until) for s in cfg2.data.also] == [
        (first.state["since"], first.state["until"]),
        (second.state["since"], second.state["until"]),
    ]
    assert cfg2.metadata_url() == env.config.metadata_url() and cfg2.train.epochs == 2
    paths = set(open_source(cfg2).list_records()["path"])
    trained = {p[len(PREFIX) :] for p in paths if p.startswith(PREFIX)}
    b_held = set(second.state["holdout"])
    assert set(a_ids) <= trained and set(a_held) <= trained  # A, held out of tiny:2 too
    assert trained == set(a_ids) | (set(b_ids) - b_held) and b_held < set(b_ids)
    assert {p for p in paths if not p.startswith(PREFIX)} == {f"car/{i}.png" for i in range(3)}


# -- retention ---------------------------------------------------------------------------------
def test_the_captures_a_loop_needs_survive_a_purge_until_it_ends(envs: Any) -> None:
    env = envs()
    v1 = env.register("bus")
    old = env.captures(["car"] * 2, T0)  # long before the incumbent: not the loop's
    ids = env.captures(["car"] * 6 + ["van"] * 6, env.after(v1))
    ctx, loop = env.loop(v1)
    ready = dataset(ctx, loop)
    assert ready is not None
    purged = env.store.captures.purge(max_total_bytes=0)  # the size cap takes the oldest first
    assert {r.prediction_id for r in purged.deleted} == set(old)
    assert all(env.store.captures.get(i) is not None for i in ids)
    assert env.marked(loop_marker(loop.id)) == 12 and ready.state["captures_marked"] == 12
    done = ctx.finish(ready, "rejected", "not now")
    assert done.status == "rejected" and env.marked(loop_marker(loop.id)) == 0
    assert {r.prediction_id for r in env.store.captures.purge(max_total_bytes=0).deleted} == set(
        ids
    )


def _run(env: Env, loop: LoopRecord, status: str, dataset_version: str, **fields: Any) -> str:
    """A build run of the loop that ended ``status``, its ingest step listing the loop's
    training captures (what ``_built`` reads)."""
    from loopline.drivers.data.captures import CapturesSource
    from loopline.pipeline import codecs

    run_id = uuid.uuid4().hex[:16]
    env.store.runs.create(run_id, pipeline="build", project="tiny", config={},
                          trigger="alert", trigger_ref=str(loop.alert_id))  # fmt: skip
    until = datetime.fromisoformat(loop.state["until"])
    records = CapturesSource(environment="production", until=until, store=env.store,
                             artifacts=env.artifacts).list_records()  # fmt: skip
    codec, data = codecs.encode(records)
    ref = env.artifacts.put_bytes(data)
    step = env.store.steps.start(run_id, "ingest", cache_key="k", code_version="1")
    env.store.steps.finish(step, status="succeeded",
                           outputs={"records": {"sha256": ref.sha256, "codec": codec}})  # fmt: skip
    env.store.runs.update(run_id, status=status, dataset_version=dataset_version, **fields)
    return run_id


def test_a_candidate_rejected_by_the_builds_gate_keeps_no_captures(envs: Any) -> None:
    env = envs()
    v1 = env.register("bus")
    env.captures(["car"] * 12, env.after(v1))
    ctx, loop = env.loop(v1)
    ready = dataset(ctx, loop)
    assert ready is not None
    run_id = _run(env, ready, "rejected", "ds-rejected",
                  error="gate rejected the candidate: macro_f1 0.1 < 0.8")  # fmt: skip
    done = _built(ctx, env.move(ready, step="build", run_id=run_id), run_id)
    assert done is not None and done.status == "rejected" and "macro_f1 0.1" in str(done.reason)
    assert env.marked("ds-rejected") == 0 and env.marked(loop_marker(loop.id)) == 0


def test_the_dataset_version_takes_over_the_loops_marks_and_keeps_them(envs: Any) -> None:
    env = envs()
    v1, v2 = env.register("bus"), env.register("car")
    env.captures(["car"] * 12, env.after(v2))
    ctx, loop = env.loop(v1)
    ready = dataset(ctx, loop)
    assert ready is not None
    trained, held = ready.state["train_captures"], len(ready.state["holdout"])
    run_id = _run(env, ready, "succeeded", "ds-new", model_name="tiny", model_version=v2)
    built = _built(ctx, env.move(ready, step="build", run_id=run_id), run_id)
    assert built is not None and built.step == "gate" and built.dataset_version == "ds-new"
    assert (trained, held) == (6, 6)
    assert env.marked("ds-new") == trained and env.marked(loop_marker(loop.id)) == held
    assert built.state["dataset_captures"] == trained
    done = ctx.finish(built, "succeeded", None)  # released: its dataset keeps its captures
    assert env.marked("ds-new") == trained and env.marked(loop_marker(loop.id)) == 0
    assert release_captures(env.store, done) == 0


def test_a_rejected_candidates_dataset_lets_its_captures_go_unless_another_build_uses_it(
    envs: Any,
) -> None:
    env = envs()
    v1 = env.register("bus")
    ids = env.captures(["car"] * 4, env.after(v1))
    ctx, loop = env.loop(v1)
    env.store.captures.mark_used(ids[:2], "ds-mine")
    env.store.captures.mark_used(ids[2:], "ds-shared")
    env.store.models.register("tiny", bundle_uri="x", bundle_sha256="e" * 64, metrics={},
                              lineage={}, dataset_version="ds-mine", run_id="run-1")  # fmt: skip
    env.store.models.register("tiny", bundle_uri="x", bundle_sha256="f" * 64, metrics={},
                              lineage={}, dataset_version="ds-shared", run_id="run-0")  # fmt: skip
    mine = replace(loop, status="rejected", run_id="run-1", dataset_version="ds-mine")
    assert release_captures(env.store, replace(mine, status="succeeded")) == 0
    assert release_captures(env.store, mine) == 2 and env.marked("ds-mine") == 0
    # ds-shared: tiny:3 was made by another build (run-0) on it: its captures stay.
    shared = replace(mine, run_id="run-1", dataset_version="ds-shared")
    assert release_captures(env.store, shared) == 0 and env.marked("ds-shared") == 2


# -- the replica test's replay -----------------------------------------------------------------
def test_the_replay_takes_only_requests_predicted_since_the_cutoff(envs: Any) -> None:
    env = envs()
    ids = seed_captures(env.store, env.artifacts, [png(i) for i in range(10)],
                        labels=["car"] * 10, start=T0)  # fmt: skip
    everything = replay_sample(env.store, env.artifacts, "production", 50)
    assert {i.prediction_id for i in everything.items} == set(ids)
    recent = replay_sample(env.store, env.artifacts, "production", 50,
                           since=T0 + timedelta(seconds=6))  # fmt: skip
    assert {i.prediction_id for i in recent.items} == set(ids[6:])
    assert all(i.truth == "car" for i in recent.items)
    later = replay_sample(env.store, env.artifacts, "production", 50,
                          since=T0 + timedelta(hours=1))  # fmt: skip
    assert later.items == [] and later.skip_reason is not None
    assert "since 2025-03-01T13:00:00+00:00" in later.skip_reason
