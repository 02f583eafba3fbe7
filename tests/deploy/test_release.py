"""The release library: promote, canary, shadow and rollback change the desired state
atomically, with history, audit and the environment's alias, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loopline.deploy import canary, release
from loopline.drivers.metadata.deployments import DeploymentConflict
from loopline.drivers.metadata.store import MetadataStore
from loopline.environments import EnvironmentConfig
from loopline.errors import Conflict, NotFound


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    for v in range(1, 5):
        s.models.register("vehicles", bundle_uri="/b", bundle_sha256=f"{v:064x}", aliases=(),
                          metrics={"accuracy": 0.9})  # fmt: skip
        reasons = [] if v != 4 else ["accuracy 0.20 < 0.80"]
        s.replica_tests.record("vehicles", v, environment="staging", passed=v != 4,
                               reasons=reasons, report={})  # fmt: skip
    yield s
    s.close()


def test_a_version_without_a_passed_replica_test_cannot_be_promoted(
    store: MetadataStore,
) -> None:
    store.models.register("vehicles", bundle_uri="/b", bundle_sha256="f" * 64, aliases=())
    with pytest.raises(release.PromotionRefused, match="has no replica test; run `loopline deploy"):
        release.promote(store, "vehicles:5")
    with pytest.raises(release.PromotionRefused, match="failed its latest replica test.*0.20"):
        release.promote(store, "vehicles:4")
    assert store.deployments.get("production") is None
    # The latest test counts: a version that failed, then passed, may go.
    store.replica_tests.record("vehicles", 4, environment="staging", passed=True, reasons=[],
                               report={})  # fmt: skip
    assert release.promote(store, "vehicles:4").stable_version == 4


def test_direct_promotion_moves_the_alias_and_writes_history_and_audit(
    store: MetadataStore,
) -> None:
    dep = release.promote(store, "vehicles:1", actor="ana", reason="first release")
    assert (dep.stable_version, dep.generation, dep.strategy) == (1, 1, "direct")
    assert store.models.get("vehicles", alias="production").version == 1
    dep = release.promote(store, "vehicles:2", actor="ana")
    assert (dep.stable_version, dep.previous_version) == (2, 1)
    assert store.models.get("vehicles", alias="production").version == 2
    # Promoting what already serves changes nothing.
    assert release.promote(store, "vehicles:2").generation == 2
    hist = store.deployments.history("production")
    assert [(h["generation"], h["action"], h["stable_version"]) for h in hist] == [
        (2, "promote", 2),
        (1, "promote", 1),
    ]
    assert hist[1]["actor"] == "ana" and hist[1]["reason"] == "first release"
    actions = [e.action for e in store.audit.recent(50)]
    assert actions.count("deployment.promote") == 2


def test_canary_then_rollback_keeps_the_stable_version(store: MetadataStore) -> None:
    release.promote(store, "vehicles:1")
    env = EnvironmentConfig.model_validate({"canary": {"share": 0.25}})
    dep = release.promote(store, "vehicles:2", strategy="canary", env=env)
    assert (dep.stable_version, dep.candidate_version, dep.candidate_share) == (1, 2, 0.25)
    assert dep.candidate_since is not None
    assert store.models.get("vehicles", alias="production").version == 1
    dep = release.set_canary_share(store, "production", 0.5)
    assert dep.candidate_share == 0.5
    dep = release.rollback(store, "vehicles")
    assert (dep.stable_version, dep.candidate_version, dep.strategy) == (1, None, "direct")


def test_rollback_returns_to_the_previous_version_and_never_to_nothing(
    store: MetadataStore,
) -> None:
    with pytest.raises(NotFound, match="production serves nothing"):
        release.rollback(store, "vehicles")
    release.promote(store, "vehicles:1")
    with pytest.raises(Conflict, match="no previous version of vehicles"):
        release.rollback(store, "vehicles")
    release.promote(store, "vehicles:3")
    dep = release.rollback(store, "vehicles", reason="bad numbers")
    assert (dep.stable_version, dep.previous_version) == (1, 3)
    assert store.models.get("vehicles", alias="production").version == 1


def test_a_canary_needs_a_stable_version_and_the_same_model(store: MetadataStore) -> None:
    with pytest.raises(Conflict, match="no stable version yet to run a canary"):
        release.promote(store, "vehicles:1", strategy="canary")
    release.promote(store, "vehicles:1")
    with pytest.raises(Conflict, match="already the stable version"):
        release.promote(store, "vehicles:1", strategy="shadow")


def test_compare_and_set_refuses_a_stale_generation(store: MetadataStore) -> None:
    dep = release.promote(store, "vehicles:1")
    release.promote(store, "vehicles:2")
    with pytest.raises(DeploymentConflict, match="generation 2, not 1"):
        release.rollback(store, "vehicles", expected_generation=dep.generation)
    assert store.deployments.get("production").stable_version == 2  # type: ignore[union-attr]


def test_the_canary_judge_rolls_back_on_errors_and_promotes_when_healthy(
    store: MetadataStore,
) -> None:
    env = EnvironmentConfig.model_validate(
        {"canary": {"share": 0.5, "min_requests": 50, "max_error_rate": 0.05,
                    "promote_needs_labels": False}}
    )  # fmt: skip
    release.promote(store, "vehicles:1")
    dep = release.promote(store, "vehicles:2", strategy="canary", env=env)

    def report(replica: str, cand: dict[str, int], generation: int, version: int = 2) -> None:
        store.deployments.report_replica(
            "production", replica, generation=generation, versions=[1, version], status="ok",
            stats={"versions": {"1": {"requests": 100}, str(version): cand}},
        )  # fmt: skip

    report("a:1", {"requests": 10, "errors": 0}, dep.generation)
    assert canary.act(store, "production", env)[1].action is None  # too few requests
    report("a:1", {"requests": 30, "errors": 3}, dep.generation)
    report("b:2", {"requests": 30, "errors": 1}, dep.generation)
    new, verdict = canary.act(store, "production", env)
    assert verdict.action == "rollback" and "error rate 0.067" in verdict.reason
    assert new is not None and (new.stable_version, new.candidate_version) == (1, None)
    assert store.deployments.history("production")[0]["action"] == "auto-rollback"

    dep = release.promote(store, "vehicles:3", strategy="canary", env=env)
    report("a:1", {"requests": 30, "errors": 0}, dep.generation, 3)
    report("b:2", {"requests": 30, "errors": 0}, dep.generation - 1, 3)  # stale: not counted
    assert canary.act(store, "production", env)[1].action is None
    report("b:2", {"requests": 30, "errors": 0}, dep.generation, 3)
    new, verdict = canary.act(store, "production", env)
    assert verdict.action == "promote"
    assert new is not None and (new.stable_version, new.previous_version) == (3, 1)
    assert store.models.get("vehicles", alias="production").version == 3


def _labelled(store: MetadataStore, version: int, n: int, correct: int, variant: str) -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    rows = [
        {"id": f"{variant}{version}x{i}", "at": now, "model_name": "vehicles",
         "model_version": version, "source": "v1", "label": "car", "confidence": 0.9,
         "probabilities": None, "request_metadata": None, "input_stats": None,
         "environment": "production", "deployment_generation": 2, "variant": variant,
         "camera_id": "cam-1"}
        for i in range(n)
    ]  # fmt: skip
    store.predictions.log(rows)
    store.predictions.record_feedback(
        [(r["id"], "car" if i < correct else "bus") for i, r in enumerate(rows)]
    )


def test_by_default_a_canary_is_promoted_only_once_feedback_confirms_it(
    store: MetadataStore,
) -> None:
    """Requests alone never promote: a broken model answers quickly and without errors."""
    env = EnvironmentConfig.model_validate({"canary": {"min_requests": 50, "min_labels": 20}})
    release.promote(store, "vehicles:1")
    dep = release.promote(store, "vehicles:2", strategy="canary", env=env)
    store.deployments.report_replica(
        "production", "a:1", generation=dep.generation, versions=[1, 2], status="ok",
        stats={"versions": {"1": {"requests": 900}, "2": {"requests": 250}}},
    )  # fmt: skip
    new, verdict = canary.act(store, "production", env)
    assert new is None and "waiting for feedback on 20 of its answers (0 so far)" in verdict.reason
    _labelled(store, 1, 40, 36, "stable")
    _labelled(store, 2, 10, 1, "canary")  # too few labels yet to judge: still waiting
    assert canary.act(store, "production", env)[1].action is None
    _labelled(store, 2, 15, 1, "shadow")  # shadow answers never count
    assert canary.act(store, "production", env)[1].action is None
    _labelled(store, 2, 20, 2, "canary2")  # now 30 labelled, 3 right: far below stable's 0.9
    new, verdict = canary.act(store, "production", env)
    assert verdict.action == "rollback" and "accuracy 0.100 on 30 labelled" in verdict.reason
    assert new is not None and new.candidate_version is None


def test_a_canary_whose_labels_hold_up_is_promoted(store: MetadataStore) -> None:
    env = EnvironmentConfig.model_validate({"canary": {"min_requests": 50, "min_labels": 20}})
    release.promote(store, "vehicles:1")
    dep = release.promote(store, "vehicles:2", strategy="canary", env=env)
    store.deployments.report_replica(
        "production", "a:1", generation=dep.generation, versions=[1, 2], status="ok",
        stats={"versions": {"1": {"requests": 900}, "2": {"requests": 250}}},
    )  # fmt: skip
    _labelled(store, 2, 25, 23, "canary")
    new, verdict = canary.act(store, "production", env)
    assert verdict.action == "promote", verdict
    assert new is not None and new.stable_version == 2


def test_an_alias_moved_by_hand_is_put_back_by_the_next_deployment_change(
    store: MetadataStore,
) -> None:
    release.promote(store, "vehicles:1")
    store.models.set_alias("vehicles", "production", 3)  # behind the deployment's back
    release.promote(store, "vehicles:2", strategy="canary")
    assert store.models.get("vehicles", alias="production").version == 1


def test_only_a_replica_test_of_the_environment_replicating_the_target_counts(
    store: MetadataStore, tmp_path: Path
) -> None:
    from loopline.config import parse_config

    cfg = parse_config({"environments": {"lax": {"replica_test": {"rules": []}}}}, tmp_path)
    envs = release.replica_environments(cfg, "production")
    assert envs == ["staging"]
    store.models.register("vehicles", bundle_uri="/b", bundle_sha256="e" * 64, aliases=())
    store.replica_tests.record("vehicles", 5, environment="lax", passed=True, reasons=[],
                               report={})  # fmt: skip
    with pytest.raises(release.PromotionRefused, match="no replica test in staging"):
        release.promote(store, "vehicles:5", replica_envs=envs)
    assert release.promote(store, "vehicles:5").stable_version == 5  # any env when not given
