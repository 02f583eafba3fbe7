"""A monitoring pass under failure and over time, on SQLite and PostgreSQL: a failing
evaluation or reference never loses the carried state, notices come from the stored alert
events (so a transition nobody told is told by the next pass, and an inhibited warning once
its critical alert resolves), alerts of scopes no longer measured expire, retirements and
expiries start no cooldown, and a pass reads a bounded number of rows and statements."""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event

from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.models import utcnow
from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor import lifecycle, notices, passes, reference, service
from tests.monitor.test_service import (
    ACCURACY_RULE,
    ENV,
    MODEL,
    deploy,
    label_predictions,
    log_predictions,
    make_config,
    make_store,
    right,
    webhook_receiver,
    wrong,
)

PER_CAMERA: dict[str, Any] = {
    **ACCURACY_RULE,
    "name": "camera-accuracy-low",
    "severity": "warning",
    "scope": "segment",
    "segment_by": ["camera_id"],
}
# A global warning beside the critical accuracy-low: a segment rule measures its segments
# only, so a warning of the global scope is a rule of its own.
GLOBAL_WARNING: dict[str, Any] = {
    **ACCURACY_RULE,
    "name": "accuracy-warning",
    "severity": "warning",
    "threshold": 0.60,
    "resolve_threshold": 0.70,
}
_tick = itertools.count()


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = make_store(db_url)
    yield s
    s.close()


@pytest.fixture
def artifacts(tmp_path: Any) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))


def _run(cfg: Any, store: MetadataStore, artifacts: ArtifactStore, **kw: Any) -> dict[str, Any]:
    return service.run_pass(cfg, store, artifacts, owner="test:1", **kw).to_dict()


def _ok(cfg: Any, store: MetadataStore, artifacts: ArtifactStore, **kw: Any) -> dict[str, Any]:
    report = _run(cfg, store, artifacts, **kw)
    assert report["errors"] == [], report["errors"]
    return report


def _kinds(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["rule"], c["scope"], c["kind"]) for c in report["changes"]]


def _told(report: dict[str, Any]) -> list[tuple[int, str]]:
    return [(n["alert_id"], n["kind"]) for n in report["notifications"]]


def log_at(
    store: MetadataStore,
    pairs: list[tuple[str, str]],
    at: datetime,
    *,
    metadata: dict[str, str],
    version: int = 1,
) -> None:
    """Log and label predictions stamped ``at`` (a microsecond apart), with this request
    metadata; the ``camera_id`` column cut to 200 characters as the server does."""
    rows, ids = [], []
    for predicted, _ in pairs:
        ids.append(uuid.uuid4().hex)
        rows.append(
            {
                "id": ids[-1],
                "at": at + timedelta(microseconds=next(_tick)),
                "model_name": MODEL,
                "model_version": version,
                "source": "test",
                "label": predicted,
                "confidence": 0.9,
                "probabilities": None,
                "request_metadata": metadata,
                "input_stats": None,
                "environment": ENV,
                "deployment_generation": 1,
                "variant": "stable",
                "camera_id": metadata.get("camera_id", "")[:200] or None,
            }
        )
    store.predictions.log(rows)
    label_predictions(store, ids, [actual for _, actual in pairs])


# -- 1. a failure after measuring never loses the carried state -------------------------------
def test_a_failing_evaluation_is_reported_and_the_state_is_still_saved(
    store: MetadataStore, artifacts: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = lifecycle.evaluate

    def broken(st: Any, rule: Any, m: Any, now: Any, **kw: Any) -> Any:
        if m.scope != "global":
            raise RuntimeError("evaluate broke on a segment")
        return real(st, rule, m, now, **kw)

    monkeypatch.setattr(lifecycle, "evaluate", broken)
    cfg = make_config([ACCURACY_RULE, GLOBAL_WARNING, PER_CAMERA])
    log_predictions(store, wrong(50))
    report = _run(cfg, store, artifacts)
    [error] = report["errors"]
    assert "rule camera-accuracy-low (camera_id=cam-1): RuntimeError: evaluate broke" in error
    # The global rules still fired (the warning's notice inhibited by the critical one),
    # the critical alert was told, and the state was written.
    assert _kinds(report) == [
        ("accuracy-low", "global", "firing"),
        ("accuracy-warning", "global", "firing"),
    ]
    assert [kind for _, kind in _told(report)] == ["firing"]
    [env] = report["environments"]
    assert (env["state"], env["new_outcomes"]) == ("saved", 50)
    # The next pass goes on from the cursor: it does not read (and fail on) the same rows.
    again = _run(cfg, store, artifacts)
    assert again["environments"][0]["new_outcomes"] == 0
    assert again["changes"] == [] and again["notifications"] == []
    monkeypatch.setattr(lifecycle, "evaluate", real)
    fixed = _ok(cfg, store, artifacts)
    assert _kinds(fixed) == [("camera-accuracy-low", "camera_id=cam-1", "firing")]


def test_a_10000_character_segment_value_does_not_stop_the_pass(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    long_camera, long_site = "c" * 10_000, "s" * 10_000
    per_site = {**PER_CAMERA, "name": "site-accuracy-low", "segment_by": ["camera_id", "site"]}
    cfg = make_config([ACCURACY_RULE, per_site])
    log_at(store, wrong(50), utcnow(), metadata={"camera_id": long_camera, "site": long_site})
    report = _ok(cfg, store, artifacts)
    kinds = _kinds(report)
    assert ("accuracy-low", "global", "firing") in kinds
    scopes = [s for rule, s, _ in kinds if rule == "site-accuracy-low"]  # not global
    assert len(scopes) == 2 and all(len(s) < 300 for s in scopes)
    assert {s.split("=")[0] for s in scopes} == {"camera_id", "site"}
    assert report["environments"][0]["state"] == "saved"


# -- 2. notices come from the stored events -------------------------------------------------
def test_a_transition_nobody_told_is_told_by_the_next_pass_once(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    with webhook_receiver() as (url, received):
        cfg = make_config(channels=[{"kind": "webhook", "url": url}])
        log_predictions(store, wrong(50))
        # A monitor fired the alert and died before telling anyone.
        alert = store.alerts.open_alert(
            "accuracy-low", "accuracy", ENV, MODEL, 1, "global", "critical", "<", 0.4,
            0.0, 50, "none", "firing",
        )  # fmt: skip
        assert alert is not None
        report = _ok(cfg, store, artifacts)
        assert report["changes"] == []  # nothing new for the lifecycle
        assert _told(report) == [(alert.id, "firing")]
        assert _ok(cfg, store, artifacts)["notifications"] == []
    assert [body["kind"] for body in received] == ["firing"]
    kinds = [e["kind"] for e in store.alerts.events(alert.id)]
    assert kinds.count("notified") == 1


def test_an_inhibited_warning_is_told_once_its_critical_alert_resolves(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config([ACCURACY_RULE, GLOBAL_WARNING, PER_CAMERA])
    log_predictions(store, wrong(50), camera="cam-1")
    report = _ok(cfg, store, artifacts)
    ids = {(c["rule"], c["scope"]): c["alert_id"] for c in report["changes"]}
    assert set(ids) == {("accuracy-low", "global"), ("accuracy-warning", "global"),
                        ("camera-accuracy-low", "camera_id=cam-1")}  # fmt: skip
    critical, warning = ids["accuracy-low", "global"], ids["camera-accuracy-low", "camera_id=cam-1"]
    assert _told(report) == [(critical, "firing")]  # the warnings are held back
    assert _ok(cfg, store, artifacts)["notifications"] == []  # and stays held while it fires
    # cam-2 answers right: the global accuracy recovers (last 100: all right), cam-1 does not.
    log_predictions(store, right(100), camera="cam-2")
    report = _ok(cfg, store, artifacts)
    assert _kinds(report) == [
        ("accuracy-low", "global", "resolved"),
        ("accuracy-warning", "global", "resolved"),  # never told: nothing to say
    ]
    assert sorted(_told(report)) == sorted([(critical, "resolved"), (warning, "firing")])
    [late] = [n for n in report["notifications"] if n["kind"] == "firing"]
    assert "held back" in late["message"]
    assert _ok(cfg, store, artifacts)["notifications"] == []
    events = [e["kind"] for e in store.alerts.events(warning)]
    assert events.count("inhibited") == 1 and events.count("notified") == 1


# -- 3. a reference that fails to load ----------------------------------------------------------
def test_a_reference_that_raises_is_no_data_and_not_fetched_every_pass(
    store: MetadataStore,
    artifacts: ArtifactStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def broken(st: Any, arts: Any, name: str, version: int) -> Any:
        calls.append(version)
        raise ValueError("monitoring.json: Expecting value: line 1 column 1")

    monkeypatch.setattr(reference, "load_reference", broken)
    estimate = {
        "name": "estimated-accuracy-low", "metric": "estimated_accuracy", "op": "<",
        "threshold": 0.6, "window": 50, "min_samples": 30, "action": "notify",
    }  # fmt: skip
    cfg = make_config([ACCURACY_RULE, estimate])
    log_predictions(store, wrong(50))
    with caplog.at_level(logging.WARNING, logger="loopline.monitor"):
        report = _ok(cfg, store, artifacts)
        assert _kinds(report) == [("accuracy-low", "global", "firing")]
        [free] = [m for m in report["measurements"] if m["rule"] == "estimated-accuracy-low"]
        assert free["value"] is None  # no reference: no-data
        _ok(cfg, store, artifacts)
        assert calls == [1]  # not fetched again within REFERENCE_RETRY_S
        for key in [k for k in passes._REFERENCE_RETRY if k[0] == store.url]:
            monkeypatch.setitem(passes._REFERENCE_RETRY, key, 0.0)  # as if a minute passed
        _ok(cfg, store, artifacts)
        assert calls == [1, 1]
    said = [r for r in caplog.records if "no reference for m:1" in r.getMessage()]
    assert len(said) == 1  # said once, not every pass


# -- 5, 6. retired and expired alerts, and the cooldown -----------------------------------------
def test_a_retired_alert_says_so_and_starts_no_cooldown(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config([{**ACCURACY_RULE, "cooldown_s": 3600}])
    log_predictions(store, wrong(50))
    [first] = _ok(cfg, store, artifacts)["changes"]
    deploy(store, stable_version=2, previous_version=1)
    report = _ok(cfg, store, artifacts)
    assert [(c["alert_id"], c["kind"]) for c in report["changes"]] == [
        (first["alert_id"], "resolved")
    ]
    [resolved] = [e for e in store.alerts.events(first["alert_id"]) if e["kind"] == "resolved"]
    assert resolved["details"]["retired"] is True
    # Rolled back to m:1, still bad: a new alert fires at once, within the rule's cooldown.
    deploy(store, stable_version=1, previous_version=2)
    log_predictions(store, wrong(50))
    report = _ok(cfg, store, artifacts)
    assert [(c["kind"], c["version"]) for c in report["changes"]] == [("firing", 1)]
    assert report["changes"][0]["alert_id"] != first["alert_id"]


def test_an_alert_of_a_scope_no_longer_measured_expires_and_starts_no_cooldown(
    db_url: str, artifacts: ArtifactStore
) -> None:
    store = make_store(db_url)
    rule = {**PER_CAMERA, "window": None, "window_s": 300, "resolve_window": None}
    cfg = make_config([rule], stale_labels_s=600)
    t1 = utcnow() - timedelta(hours=1)  # pass times run ahead from here; labels are now
    log_at(store, right(40), t1 - timedelta(seconds=30), metadata={"camera_id": "cam-1"})
    log_at(store, wrong(40), t1 - timedelta(seconds=30), metadata={"camera_id": "cam-2"})
    report = _ok(cfg, store, artifacts, now=t1)
    [fired] = report["changes"]
    assert (fired["scope"], fired["kind"]) == ("camera_id=cam-2", "firing")
    # cam-2 goes quiet; cam-1 goes on. After 400 s cam-2 is out of the 300 s window, but
    # not yet silent for stale_labels_s (600 s).
    for offset in (400, 700):
        at = t1 + timedelta(seconds=offset - 30)
        log_at(store, right(40), at, metadata={"camera_id": "cam-1"})
        report = _ok(cfg, store, artifacts, now=t1 + timedelta(seconds=offset))
        scopes = {m["scope"]: m["value"] for m in report["measurements"]}
        assert scopes.get("camera_id=cam-1") == 1.0 and scopes.get("camera_id=cam-2") is None
        if offset == 400:
            assert report["changes"] == []
    [expired] = report["changes"]
    assert (expired["alert_id"], expired["kind"]) == (fired["alert_id"], "resolved")
    [told] = report["notifications"]
    assert told["kind"] == "resolved" and "no data for 700s" in told["message"]
    [event_] = [e for e in store.alerts.events(fired["alert_id"]) if e["kind"] == "resolved"]
    assert event_["details"]["expired"] is True and event_["message"].startswith("no data for")
    alert = store.alerts.get(fired["alert_id"])
    assert alert is not None and alert.reason == "no data for 700s"
    # cam-2 comes back, still wrong: a new alert fires at once (no cooldown after an expiry).
    log_at(store, wrong(40), t1 + timedelta(seconds=690), metadata={"camera_id": "cam-2"})
    report = _ok(cfg, store, artifacts, now=t1 + timedelta(seconds=710))
    assert [(c["scope"], c["kind"]) for c in report["changes"]] == [("camera_id=cam-2", "firing")]
    _, state = store.monitor_state.get(f"{ENV}/{MODEL}")
    assert set(state["seen"]) == {str(report["changes"][0]["alert_id"])}  # only open alerts
    store.close()


# -- 4. a pass reads a bounded number of rows and statements -------------------------------------
@contextmanager
def statements(store: MetadataStore) -> Iterator[list[str]]:
    """Every SQL statement the store's engine runs inside the block."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        seen.append(" ".join(sql.split()).lower())

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def test_a_steady_pass_reads_the_open_alerts_once_and_writes_none(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config([ACCURACY_RULE, PER_CAMERA])
    for camera in range(10):
        log_predictions(store, wrong(40), camera=f"cam-{camera}")
    report = _ok(cfg, store, artifacts)
    assert len(report["changes"]) == 11  # one global and ten cameras
    with statements(store) as sql:
        report = _ok(cfg, store, artifacts)
    assert len(report["measurements"]) == 11 and report["changes"] == []
    reads = [s for s in sql if s.startswith("select") and " from alerts" in s]
    assert len(reads) <= 3, reads  # the open ones, the recently resolved ones
    assert not [s for s in sql if s.startswith("update alerts")]


def test_loop_notices_read_the_recent_loops_events_in_one_query(
    store: MetadataStore,
) -> None:
    cfg = make_config()
    for i in range(30):
        alert = store.alerts.open_alert(
            "accuracy-low", "accuracy", ENV, MODEL, 1, f"camera_id=cam-{i}", "critical", "<",
            0.4, 0.0, 50, "approve", "firing",
        )  # fmt: skip
        assert alert is not None
        rec, _ = store.loops.create_or_get(alert.id, "approve", MODEL, ENV, 1, "running", "gate")
        store.loops.transition(rec.id, "running", status="rejected", finished_at=utcnow())
    first = notices.notify_loop_events(cfg, store)
    assert len(first) == 30 and {n["kind"] for n in first} == {"retrain-rejected"}
    with statements(store) as sql:
        assert notices.notify_loop_events(cfg, store) == []  # each told once
    assert len([s for s in sql if "from alert_events" in s]) == 1
    assert len([s for s in sql if "from loops" in s]) <= 2


# -- 8. the chain finds its replica test by id -----------------------------------------------------
def test_alert_report_finds_an_old_replica_test_by_id(store: MetadataStore) -> None:
    alert = store.alerts.open_alert(
        "accuracy-low", "accuracy", ENV, MODEL, 1, "global", "critical", "<", 0.4, 0.0, 50,
        "retrain", "firing",
    )  # fmt: skip
    assert alert is not None
    test = store.replica_tests.record(MODEL, 2, environment="staging", passed=True, reasons=[],
                                      report={})  # fmt: skip
    for _ in range(201):  # newer tests of the same model
        store.replica_tests.record(MODEL, 2, environment="staging", passed=False,
                                   reasons=["slow"], report={})  # fmt: skip
    rec, _ = store.loops.create_or_get(alert.id, "retrain", MODEL, ENV, 1, "running", "release")
    store.loops.transition(rec.id, "running", replica_test_id=test.id)
    chain = service.alert_report(store, alert.id)["chain"]
    [link] = [c for c in chain if c["kind"] == "replica_test"]
    assert link["id"] == test.id and link["text"] == "passed in staging" and link["at"]
