"""The loop's state machine without a build: start (idempotent, notify, imported, a second
retrain), the dataset step waiting for labels and holding the newest out, approval
decisions, reusing a replica test, release and the canary's verdicts, on real stores
(SQLite and PostgreSQL). The build, the gate on real bundles and the replica test on a real
server are in ``test_loop_e2e.py``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loopline.config import Config, parse_config
from loopline.deploy import release
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import ConfigError, Conflict, NotFound
from loopline.monitor import loop as loops
from loopline.monitor.retrain import LoopContext, dataset
from tests.drivers.test_captures_source import png, seed_captures

OWNER = "monitor-test"


@dataclass
class Env:
    config: Config
    store: MetadataStore
    artifacts: ArtifactStore

    def register(self, n: int = 1, **lineage: Any) -> list[int]:
        out = []
        for i in range(n):
            reg = self.store.models.register(
                "tiny", bundle_uri="x", bundle_sha256=f"{len(out) + 1 + 100 * i:064x}",
                metrics={"accuracy": 0.9}, lineage=dict(lineage),
            )  # fmt: skip
            out.append(reg.version.version)
        return out

    def alert(self, action: str = "retrain", version: int | None = 1, rule: str = "acc") -> Any:
        alert = self.store.alerts.open_alert(
            rule, "accuracy", "production", "tiny", version, "global", "critical", "<", 0.4,
            0.3, 50, action, state="firing",
        )  # fmt: skip
        assert alert is not None
        return alert

    def advance(self, loop_id: int, **kw: Any) -> Any:
        return loops.advance(self.config, self.store, self.artifacts, loop_id, owner=OWNER, **kw)

    def at(self, alert: Any, step: str, **fields: Any) -> Any:
        """The loop of ``alert`` moved to ``step`` (as if the steps before had run)."""
        loop = loops.start(self.store, alert, self.config)
        self.store.loops.claim(loop.id, "setup", stale_after_s=60)
        self.store.loops.advance(loop.id, "setup", step=step, **fields)
        self.store.loops.release(loop.id, "setup")
        return self.store.loops.get(loop.id)


def make_config(root: Path, db_url: str, **retrain: Any) -> Config:
    policy = {"min_new_labels": 10, "holdout_min": 4, "holdout_share": 0.3, "cooldown_s": 600,
              **retrain}  # fmt: skip
    return parse_config(
        {"model": {"name": "tiny"},
         "store": {"metadata_url": db_url, "artifacts_url": str(root / "artifacts")},
         "monitor": {"owner": "qa@example.com", "retrain": policy}},
        root,
    )  # fmt: skip


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[Env]:
    cfg = make_config(tmp_path, db_url)
    store = MetadataStore(cfg.metadata_url())
    yield Env(cfg, store, ArtifactStore(cfg.artifacts_url()))
    store.close()


def kinds(env: Env, alert_id: int) -> list[str]:
    return [e["kind"] for e in env.store.alerts.events(alert_id)]


# -- start ---------------------------------------------------------------------------------
def test_start_is_idempotent_one_loop_per_alert(env: Env) -> None:
    env.register()
    alert = env.alert()
    first = loops.start(env.store, alert, env.config)
    again = loops.start(env.store, alert, env.config)
    assert first.id == again.id and len(env.store.loops.list()) == 1
    assert (first.status, first.step, first.incumbent_version) == ("running", "dataset", 1)
    assert first.timeline[0]["step"] == "start"
    assert kinds(env, alert.id).count("loop.started") == 1
    assert [x.id for x in loops.open_loops(env.store)] == [first.id]


def test_notify_records_that_the_owner_was_told_and_ends(env: Env) -> None:
    env.register()
    alert = env.alert("notify")
    loop = loops.start(env.store, alert, env.config)
    assert (loop.status, loop.step) == ("succeeded", "done") and loop.finished_at is not None
    assert "qa@example.com told of alert" in loop.timeline[0]["detail"]
    assert loops.open_loops(env.store) == []
    assert env.advance(loop.id).status == "succeeded"  # nothing to do
    with pytest.raises(ConfigError, match="only retrain, approve, notify start a loop"):
        loops.start(env.store, env.alert("none", rule="other"), env.config)


def test_an_imported_model_waits_for_a_person_instead_of_retraining(env: Env) -> None:
    env.register(imported=True)
    alert = env.alert("retrain")
    loop = loops.start(env.store, alert, env.config)
    assert (loop.status, loop.step) == ("waiting_approval", "approval")
    assert "tiny:1 was imported (trained elsewhere): Loopline cannot retrain it" in loop.reason
    assert env.store.alerts.get(alert.id).reason == loop.reason
    assert env.advance(loop.id).status == "waiting_approval"  # advancing changes nothing
    done = loops.decide(env.store, alert.id, True, actor="qa")
    assert (done.status, done.step, done.decided_by) == ("succeeded", "done", "qa")
    assert "loop.approved" in kinds(env, alert.id)


def test_a_second_retrain_of_the_same_model_only_notifies(env: Env) -> None:
    env.register()
    first = loops.start(env.store, env.alert(rule="a"), env.config)
    second = loops.start(env.store, env.alert(rule="b"), env.config)
    assert (second.status, second.step) == ("succeeded", "done")
    assert f"no retrain: loop {first.id}" in second.reason
    assert [x.id for x in loops.open_loops(env.store)] == [first.id]


# -- dataset -------------------------------------------------------------------------------
def test_dataset_waits_for_labels_then_holds_the_newest_out(env: Env) -> None:
    (v1,) = env.register()
    created = env.store.models.get("tiny", v1).created_at
    start = created.replace(tzinfo=UTC) if created.tzinfo is None else created
    # Captures before the incumbent was registered are not new.
    seed_captures(env.store, env.artifacts, [png(100)], labels=["car"],
                  start=start - timedelta(hours=1))  # fmt: skip
    ids = seed_captures(env.store, env.artifacts, [png(i) for i in range(8)],
                        labels=["car", "bus", None, "van", "zebra", "car", "bus", "van"],
                        start=start + timedelta(seconds=1))  # fmt: skip
    loop = loops.start(env.store, env.alert(), env.config)
    env.store.loops.claim(loop.id, OWNER, stale_after_s=60)
    ctx = LoopContext(env.config, env.store, env.artifacts, OWNER)
    # 6 labelled with a known label (None unlabelled, zebra unknown); 10 needed.
    assert dataset(ctx, loop) is None
    extra = seed_captures(env.store, env.artifacts, [png(30)], labels=["car"],
                          start=start + timedelta(seconds=10))  # fmt: skip
    assert dataset(ctx, env.store.loops.get(loop.id)) is None  # the reason follows the count
    waiting = env.store.loops.get(loop.id)
    assert (waiting.status, waiting.step) == ("running", "dataset")
    assert waiting.reason == "waiting for labels (7 of 10)"
    more = seed_captures(env.store, env.artifacts, [png(10 + i) for i in range(3)],
                         labels=["car"] * 3, start=start + timedelta(seconds=20))  # fmt: skip
    done = dataset(ctx, env.store.loops.get(loop.id))
    assert done is not None and done.step == "build" and done.reason is None
    # 10 known labels: max(4, ceil(0.3 * 10)) = 4 newest held out, from the 4th newest on.
    assert done.state["labelled"] == 10
    assert done.state["holdout"] == [*extra, *more]
    assert datetime.fromisoformat(done.state["until"]) == start + timedelta(seconds=10)
    assert done.state["train_captures"] == 7  # every labelled one before until (zebra too)
    assert datetime.fromisoformat(done.state["since"]) == start
    waits = [e for e in done.timeline if e["status"] == "waiting"]
    assert len(waits) == 1 and len(ids) == 8


# -- approval ------------------------------------------------------------------------------
def test_decide_approves_or_rejects_only_a_waiting_loop(env: Env) -> None:
    env.register(2)
    a, b = env.alert(rule="a"), env.alert(rule="b")
    env.config.monitor.retrain.cooldown_s = 0.0
    with pytest.raises(NotFound, match="has no loop"):
        loops.decide(env.store, a.id, True, actor="qa")
    la = env.at(a, "approval", status="waiting_approval", model_version=2)
    approved = loops.decide(env.store, a.id, True, actor="qa", reason="looks good")
    assert (approved.status, approved.step, approved.decided_by) == ("running", "replica", "qa")
    assert approved.timeline[-1]["detail"] == "approved by qa: looks good"
    with pytest.raises(Conflict, match="not waiting for approval"):
        loops.decide(env.store, a.id, True, actor="qa")
    # Until its release begins, a person may still stop it.
    assert loops.decide(env.store, a.id, False, actor="qa", reason="wait").status == "rejected"
    with pytest.raises(Conflict, match="has ended"):
        loops.decide(env.store, a.id, False, actor="qa")
    lb = env.at(b, "approval", status="waiting_approval", model_version=2)
    rejected = loops.decide(env.store, b.id, False, actor="qa", reason="too risky")
    assert (rejected.status, rejected.reason) == ("rejected", "too risky")
    assert env.store.alerts.get(b.id).reason == "the retrain was rejected by qa: too risky"
    assert "loop.rejected" in kinds(env, b.id)
    assert env.store.deployments.get("production") is None  # production untouched
    assert la.id != lb.id


# -- replica, release, canary -----------------------------------------------------------------
def _production(env: Env, version: int = 1) -> Any:
    return release.promote(env.store, f"tiny:{version}", to="production",
                           require_replica_test=False, actor="setup")  # fmt: skip


def _passed_test(env: Env, version: int) -> Any:
    return env.store.replica_tests.record("tiny", version, environment="staging", passed=True,
                                          reasons=[], report={}, actor="setup")  # fmt: skip


def test_a_passed_replica_test_is_reused_and_the_canary_promoted_by_the_servers_succeeds(
    env: Env,
) -> None:
    env.register(2)
    _production(env, 1)
    test = _passed_test(env, 2)
    alert = env.alert()
    loop = env.at(alert, "replica", model_version=2)
    waiting = env.advance(loop.id)  # replica (reused) -> release (canary) -> canary: waits
    assert waiting.replica_test_id == test.id and waiting.step == "canary"
    assert waiting.status == "running" and "waiting for its verdict" in waiting.reason
    dep = env.store.deployments.get("production")
    assert (dep.stable_version, dep.candidate_version, dep.strategy) == (1, 2, "canary")
    assert waiting.deployment_generation == dep.generation
    assert env.advance(loop.id).deployment_generation == dep.generation  # no second release
    assert env.store.deployments.get("production").generation == dep.generation
    # The servers' judge promotes the canary (the change canary.act writes).
    env.store.deployments.change("production", expected_generation=dep.generation,
                                 action="auto-promote", actor="loopline (canary)",
                                 reason="tiny:2: healthy", stable_version=2,
                                 previous_version=1, candidate_version=None,
                                 strategy="direct", candidate_share=0.0,
                                 candidate_since=None)  # fmt: skip
    done = env.advance(loop.id)
    assert (done.status, done.step) == ("succeeded", "done") and done.finished_at is not None
    assert [e["step"] for e in done.timeline] == ["start", "replica", "release", "canary",
                                                  "canary"]  # fmt: skip
    assert "loop.succeeded" in kinds(env, alert.id) and done.owner is None


def test_a_canary_rolled_back_by_the_servers_fails_the_loop_with_their_reason(env: Env) -> None:
    env.register(2)
    _production(env, 1)
    _passed_test(env, 2)
    alert = env.alert()
    loop = env.at(alert, "release", model_version=2)
    assert env.advance(loop.id).step == "canary"
    gen = env.store.deployments.get("production").generation
    release.rollback(env.store, "tiny", env="production", actor="loopline (canary)",
                     reason="tiny:2: error rate 0.300 over 40 requests is above 0.020")  # fmt: skip
    done = env.advance(loop.id)
    assert done.status == "failed"
    assert done.reason == "canary rolled back: error rate 0.300 over 40 requests is above 0.020"
    assert env.store.alerts.get(alert.id).reason == done.reason
    dep = env.store.deployments.get("production")
    assert (dep.stable_version, dep.candidate_version) == (1, None) and dep.generation == gen + 1


def test_a_canary_not_promoted_in_time_is_rolled_back(env: Env, db_url: str) -> None:
    env.config.monitor.retrain.release_timeout_s = 0.01
    env.register(2)
    _production(env, 1)
    _passed_test(env, 2)
    loop = env.at(env.alert(), "release", model_version=2)
    env.advance(loop.id)  # released, then already past its timeout
    import time

    time.sleep(0.05)
    done = env.advance(loop.id)
    assert done.status == "failed"
    assert "was not promoted within 0.01 s (release_timeout_s); rolled back" in done.reason
    dep = env.store.deployments.get("production")
    assert (dep.stable_version, dep.candidate_version) == (1, None)


def test_direct_release_and_a_failed_replica_test_rejects(env: Env) -> None:
    env.config.monitor.retrain.strategy = "direct"
    env.config.monitor.retrain.cooldown_s = 0.0
    env.register(3)
    _production(env, 1)
    _passed_test(env, 2)
    ok = env.advance(env.at(env.alert(rule="a"), "replica", model_version=2).id)
    assert (ok.status, env.store.deployments.get("production").stable_version) == ("succeeded", 2)
    failed = env.store.replica_tests.record("tiny", 3, environment="staging", passed=False,
                                            reasons=["accuracy 0.1 < 0.4"], report={})  # fmt: skip
    loop = env.at(env.alert(rule="b"), "replica", model_version=3,
                  state={"replica_started_at": (failed.started_at - timedelta(seconds=1))
                         .astimezone(UTC).isoformat()})  # fmt: skip
    bad = env.advance(loop.id)
    assert bad.status == "rejected" and bad.replica_test_id == failed.id
    assert bad.reason.endswith("failed its replica test in staging "
                               f"({failed.id[:12]}): accuracy 0.1 < 0.4")  # fmt: skip
    assert env.store.deployments.get("production").stable_version == 2  # untouched


def test_another_holder_keeps_the_loop(env: Env) -> None:
    env.register()
    loop = loops.start(env.store, env.alert(), env.config)
    env.store.loops.claim(loop.id, "other-monitor", stale_after_s=60)
    seen = env.advance(loop.id)
    assert seen.owner == "other-monitor" and seen.step == "dataset" and seen.reason is None


def test_a_release_already_written_before_a_crash_is_not_made_again(env: Env) -> None:
    env.register(2)
    _production(env, 1)
    _passed_test(env, 2)
    # The monitor promoted tiny:2 as a canary, then died before recording it.
    state = release.promote(env.store, "tiny:2", to="production", strategy="canary",
                            env=env.config.environment("production"), actor="loopline")  # fmt: skip
    loop = env.at(env.alert(), "release", model_version=2)
    resumed = env.advance(loop.id)
    assert resumed.step == "canary" and resumed.deployment_generation == state.generation
    assert env.store.deployments.get("production").generation == state.generation
    assert "already released" in resumed.timeline[-2]["detail"]
    # Had the servers promoted it meanwhile, a canary promote would be refused: not made.
    env.config.monitor.retrain.cooldown_s = 0.0
    promoted = release.promote(env.store, "tiny:2", to="production", actor="loopline (canary)")
    assert env.advance(loop.id).status == "succeeded"
    again = env.at(env.alert(rule="other"), "release", model_version=2)
    done = env.advance(again.id)
    assert (done.status, done.deployment_generation) == ("succeeded", promoted.generation)
    assert done.timeline[1]["detail"].endswith("(already released, generation 3)")


def test_the_loop_imports_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, loopline.monitor.loop, loopline.drivers.data.captures; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- no loop is stuck for ever, nor two retrains of one model ---------------------------------
def test_sixteen_monitors_starting_retrains_of_one_model_open_one_loop(env: Env) -> None:
    import threading

    env.register()
    alerts = [env.alert(rule=f"r{i}") for i in range(16)]
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            loops.start(env.store, alerts[i], env.config)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    all_loops = env.store.loops.list()
    assert len(all_loops) == 16
    (running,) = [x for x in all_loops if x.status == "running"]
    skipped = [x for x in all_loops if x.state.get("skipped")]
    assert len(skipped) == 15 and all(x.state["other_loop"] == running.id for x in skipped)
    assert all(f"no retrain: loop {running.id}" in (x.reason or "") for x in skipped)
    for x in all_loops:  # each loop's start is on its alert
        assert "loop.started" in kinds(env, x.alert_id)


def test_waiting_for_labels_gives_up_after_labels_timeout_s(env: Env) -> None:
    import time

    env.register()
    alert = env.alert()
    loop = loops.start(env.store, alert, env.config)
    waiting = env.advance(loop.id)
    assert (waiting.status, waiting.step) == ("running", "dataset")
    assert waiting.reason is not None and waiting.reason.startswith("waiting for labels")
    env.config.monitor.retrain.labels_timeout_s = 0.01
    time.sleep(0.05)
    done = env.advance(loop.id)
    assert done.status == "failed" and done.open_key is None
    assert done.reason == (
        f"gave up at step dataset after 0.01 s (retrain.labels_timeout_s): {waiting.reason}"
    )
    assert env.store.alerts.get(alert.id).reason == done.reason
    assert kinds(env, alert.id)[-1] == "loop.failed"
    # The model is free again: a later alert's retrain starts.
    env.config.monitor.retrain.cooldown_s = 0.0
    assert loops.start(env.store, env.alert(rule="later"), env.config).status == "running"


def test_a_loop_waiting_for_approval_gives_up_after_approval_timeout_s(env: Env) -> None:
    import time

    env.register(2)
    alert = env.alert("approve")
    loop = env.at(alert, "approval", status="waiting_approval", model_version=2)
    assert env.advance(loop.id).status == "waiting_approval"
    env.config.monitor.retrain.approval_timeout_s = 0.01
    time.sleep(0.05)
    done = env.advance(loop.id)
    assert done.status == "rejected"
    assert done.reason.startswith("gave up at step approval after 0.01 s "
                                  "(retrain.approval_timeout_s)")  # fmt: skip
    assert kinds(env, alert.id)[-1] == "loop.rejected"
    assert env.store.deployments.get("production") is None  # production untouched
    with pytest.raises(Conflict, match="rejected"):
        loops.decide(env.store, alert.id, True, actor="qa")


def test_a_loop_whose_alert_resolved_before_its_build_ends(env: Env) -> None:
    env.register()

    def resolve(a: Any) -> None:
        env.store.alerts.transition(a.id, "firing", "resolved", value=0.6, samples=100,
                                    message="back above 0.5", actor="test")  # fmt: skip

    a, b = env.alert(rule="a"), env.alert(rule="b")
    la = loops.start(env.store, a, env.config)
    resolve(a)
    # Alert b's retrain starts: la no longer counts (it had not started its build) and ends.
    lb = loops.start(env.store, b, env.config)
    assert (lb.status, lb.step) == ("running", "dataset")
    ended = env.store.loops.get(la.id)
    assert (ended.status, ended.reason) == ("succeeded", loops.RESOLVED)
    assert loops.RESOLVED == "the alert resolved before the retrain started"
    assert ended.state.get("skipped") and "loop.succeeded" in kinds(env, a.id)
    # The next advance ends a loop whose alert resolved meanwhile, too.
    resolve(b)
    done = env.advance(lb.id)
    assert (done.status, done.step) == ("succeeded", "done")
    assert done.reason == "the alert resolved before the retrain started"


def test_reject_ends_any_open_loop_before_its_release(env: Env) -> None:
    env.register(2)
    a, b = env.alert(rule="a"), env.alert(rule="b")
    env.config.monitor.retrain.cooldown_s = 0.0
    # A build recorded as running on another host, which died: the loop waits for it.
    env.store.runs.create("r-elsewhere", pipeline="build", project="tiny", config={},
                          trigger="alert", trigger_ref=str(a.id))  # fmt: skip
    env.store.runs.update("r-elsewhere", host="elsewhere", pid=1)
    la = env.at(a, "build", run_id="r-elsewhere")
    stuck = env.advance(la.id)
    assert (stuck.status, stuck.step) == ("running", "build") and "elsewhere" in stuck.reason
    with pytest.raises(Conflict, match="not waiting for approval"):
        loops.decide(env.store, a.id, True, actor="qa")
    rejected = loops.decide(env.store, a.id, False, actor="qa", reason="the build host died")
    assert (rejected.status, rejected.reason) == ("rejected", "the build host died")
    assert rejected.open_key is None
    assert (
        env.store.alerts.get(a.id).reason == "the retrain was rejected by qa: the build host died"
    )
    assert env.advance(la.id).status == "rejected"  # nothing resumes it
    # Once releasing, it is too late: `loopline rollback` undoes a release.
    lb = env.at(b, "canary", model_version=2)
    with pytest.raises(Conflict, match="too late to reject"):
        loops.decide(env.store, b.id, False, actor="qa")
    assert env.store.loops.get(lb.id).status == "running"


def test_a_step_that_keeps_crashing_fails_the_loop_after_five_tries(env: Env) -> None:
    env.register()
    alert = env.alert()
    # A step this Loopline does not know (a loop row written by another version).
    loop = env.at(alert, "nonsense")
    for n in range(1, 5):
        with pytest.raises(KeyError):
            env.advance(loop.id)
        seen = env.store.loops.get(loop.id)
        assert seen.status == "running" and seen.state["failures"] == n
    done = env.advance(loop.id)
    assert done.status == "failed" and done.reason.startswith("nonsense: KeyError")
    assert done.reason.endswith("(5 failures in a row)")
    assert env.store.alerts.get(alert.id).reason == done.reason


def test_a_success_resets_the_count_of_failures(env: Env) -> None:
    env.register()
    loop = env.at(env.alert(), "nonsense")
    with pytest.raises(KeyError):
        env.advance(loop.id)
    env.store.loops.claim(loop.id, "setup", stale_after_s=60)
    env.store.loops.advance(loop.id, "setup", step="dataset")
    env.store.loops.release(loop.id, "setup")
    waited = env.advance(loop.id)  # waits for labels: it ran without an error
    assert waited.status == "running" and "failures" not in waited.state


def test_a_stale_holder_is_taken_over_after_loop_stale_s(env: Env) -> None:
    import time

    env.register()
    loop = loops.start(env.store, env.alert(), env.config)
    env.store.loops.claim(loop.id, "dead-monitor", stale_after_s=60)
    assert env.advance(loop.id).owner == "dead-monitor"
    env.config.monitor.loop_stale_s = 0.01
    time.sleep(0.05)
    taken = env.advance(loop.id)
    assert taken.attempts == 2 and taken.reason is not None  # it ran the dataset step


# -- the release after production changed, staging busy, the canary's words -----------------------
def test_production_changed_meanwhile_rejects_unless_the_gate_saw_it(env: Env) -> None:
    env.register(3)
    _production(env, 1)
    _passed_test(env, 2)
    env.config.monitor.retrain.cooldown_s = 0.0
    a = env.alert(rule="a")
    la = env.at(a, "release", model_version=2)
    # A person promotes tiny:3 while the loop was in its replica test.
    _production(env, 3)
    gen = env.store.deployments.get("production").generation
    done = env.advance(la.id)
    assert done.status == "rejected"
    assert done.reason.startswith("production changed meanwhile (v3 now serves production")
    dep = env.store.deployments.get("production")
    assert (dep.stable_version, dep.candidate_version, dep.generation) == (3, None, gen)
    # A gate that compared against tiny:3 (the current stable) lets the release go on.
    lb = env.at(env.alert(rule="b"), "release", model_version=2, state={"gated_against": 3})
    assert env.advance(lb.id).step == "canary"
    assert env.store.deployments.get("production").candidate_version == 2


def test_a_canary_replaced_by_a_person_says_so_not_rolled_back(env: Env) -> None:
    env.register(3)
    _production(env, 1)
    _passed_test(env, 2)
    loop = env.at(env.alert(), "release", model_version=2)
    assert env.advance(loop.id).step == "canary"
    release.promote(env.store, "tiny:3", to="production", require_replica_test=False,
                    actor="alice", reason="hotfix")  # fmt: skip
    done = env.advance(loop.id)
    assert done.status == "failed" and "rolled back" not in done.reason
    assert done.reason == "canary ended: promote of tiny:3 by alice: hotfix"


def test_the_canary_timeout_counts_from_the_release_not_from_a_resume(env: Env) -> None:
    import time

    env.config.monitor.retrain.release_timeout_s = 0.01
    env.register(2)
    _production(env, 1)
    _passed_test(env, 2)
    # The monitor promoted tiny:2 as a canary, then died before recording it ...
    release.promote(env.store, "tiny:2", to="production", strategy="canary",
                    env=env.config.environment("production"), actor="loopline")  # fmt: skip
    time.sleep(0.05)  # ... longer ago than the canary may take
    loop = env.at(env.alert(), "release", model_version=2)
    done = env.advance(loop.id)
    assert done.status == "failed" and "release_timeout_s" in done.reason
    dep = env.store.deployments.get("production")
    assert (dep.stable_version, dep.candidate_version) == (1, None)


def test_a_busy_staging_is_waited_for(db_url: str, tmp_path: Path, tiny_lake: Path) -> None:
    import fcntl

    cfg = parse_config(
        {"model": {"name": "tiny"}, "data": {"source": {"kind": "lake", "uri": str(tiny_lake)}},
         "validate": {"max_quarantine_share": 0.3},
         "store": {"metadata_url": db_url, "artifacts_url": str(tmp_path / "artifacts")},
         "monitor": {"retrain": {"cooldown_s": 0}}},
        tmp_path,
    )  # fmt: skip
    (tmp_path / "loopline.yaml").write_text("model: {name: tiny}\n")  # a replica server's
    env = Env(cfg, MetadataStore(cfg.metadata_url()), ArtifactStore(cfg.artifacts_url()))
    try:
        env.register(2)
        _production(env, 1)
        since = datetime.now(UTC)
        window = {"since": since.isoformat(), "until": (since + timedelta(seconds=1)).isoformat()}
        loop = env.at(env.alert(), "replica", model_version=2, state=window)
        lock = cfg.state_dir / "envs" / "staging" / "replica-test.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as held:  # a person's `loopline deploy` holds staging
            fcntl.flock(held, fcntl.LOCK_EX)
            waiting = env.advance(loop.id)
            assert (waiting.status, waiting.step) == ("running", "replica"), waiting.reason
            assert waiting.reason.startswith("waiting for staging: a replica test is already "
                                             "running in staging")  # fmt: skip
            again = env.advance(loop.id)  # tried again, still busy: one timeline entry
            assert again.reason == waiting.reason and len(again.timeline) == len(waiting.timeline)
        # Staging is free; the person's test of tiny:2 passed meanwhile: it is used.
        _passed_test(env, 2)
        done = env.advance(loop.id)
        assert done.step == "canary" and done.status == "running"
    finally:
        env.store.close()
