"""One monitoring pass (``service.run_pass``) on a real store, SQLite and PostgreSQL:
predictions and labels logged as the server logs them, a real deployment record, alerts
that fire once, resolve with hysteresis, survive labels out of order and concurrent
monitors, and a notify-only rule told to a real webhook receiver.

The helpers at the top are shared with ``tests/cli/test_monitor_cli.py``."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from loopline.config import Config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.models import utcnow
from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import NotFound
from loopline.monitor import service

MODEL = "m"
ENV = "production"
# Predictions are stamped from an hour ago, a millisecond apart, in the order they are logged.
_T0 = utcnow() - timedelta(hours=1)
_tick = itertools.count()

ACCURACY_RULE: dict[str, Any] = {
    "name": "accuracy-low",
    "metric": "accuracy",
    "op": "<",
    "threshold": 0.40,
    "window": 50,
    "min_samples": 30,
    "severity": "critical",
    "action": "none",
    "resolve_threshold": 0.50,
    "resolve_window": 100,
}


def make_config(
    rules: list[dict[str, Any]] | None = None,
    channels: list[dict[str, Any]] | None = None,
    **monitor: Any,
) -> Config:
    """A config watching production with the given rules (the accuracy rule by default)."""
    return Config.model_validate(
        {
            "project": "t",
            "model": {"name": MODEL},
            "monitor": {
                "environments": [ENV],
                "rules": rules if rules is not None else [ACCURACY_RULE],
                "channels": channels if channels is not None else [{"kind": "log"}],
                **monitor,
            },
        }
    )


def make_store(url: str, versions: int = 2, *, imported: bool = False) -> MetadataStore:
    """``m:1..versions`` registered, ``m:1`` deployed (direct) to production. ``imported``
    models were trained elsewhere: their retrain loop waits for a person at once."""
    store = MetadataStore(url)
    for v in range(1, versions + 1):
        store.models.register(
            MODEL,
            bundle_uri="/b",
            bundle_sha256=f"{v:064x}",
            aliases=(),
            metrics={"accuracy": 0.9},
            lineage={"imported": True} if imported else None,
        )
    store.deployments.change(
        ENV,
        expected_generation=0,
        action="promote",
        actor="test",
        model_name=MODEL,
        stable_version=1,
    )
    return store


def deploy(store: MetadataStore, **changes: Any) -> None:
    dep = store.deployments.get(ENV)
    assert dep is not None
    store.deployments.change(
        ENV, expected_generation=dep.generation, action="promote", actor="test", **changes
    )


def log_predictions(
    store: MetadataStore,
    pairs: list[tuple[str, str]],
    *,
    version: int = 1,
    camera: str = "cam-1",
    variant: str = "stable",
    label: bool = True,
) -> list[str]:
    """Log one prediction per (predicted, actual), in time order; label them unless told
    not to. Returns their ids."""
    rows, ids = [], []
    for predicted, _actual in pairs:
        pid = uuid.uuid4().hex
        ids.append(pid)
        rows.append(
            {
                "id": pid,
                "at": _T0 + timedelta(milliseconds=next(_tick)),
                "model_name": MODEL,
                "model_version": version,
                "source": "test",
                "label": predicted,
                "confidence": 0.9,
                "probabilities": None,
                "request_metadata": {"camera_id": camera},
                "input_stats": None,
                "environment": ENV,
                "deployment_generation": 1,
                "variant": variant,
                "camera_id": camera,
            }
        )
    store.predictions.log(rows)
    if label:
        label_predictions(store, ids, [actual for _, actual in pairs])
    return ids


def label_predictions(store: MetadataStore, ids: list[str], actuals: list[str]) -> None:
    results = store.predictions.record_feedback(list(zip(ids, actuals, strict=True)))
    assert all(r["status"] in ("recorded", "updated") for r in results), results


def right(n: int) -> list[tuple[str, str]]:
    return [("car", "car")] * n


def wrong(n: int) -> list[tuple[str, str]]:
    return [("car", "bus")] * n


def when(offset_s: float = 0.0) -> datetime:
    return utcnow() + timedelta(seconds=offset_s)


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP server on loopback that keeps every JSON body POSTed to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server interface
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


# -- tests ------------------------------------------------------------------------------------
@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = make_store(db_url)
    yield s
    s.close()


@pytest.fixture
def artifacts(tmp_path: Any) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))


def _pass(config: Config, store: MetadataStore, artifacts: ArtifactStore) -> dict[str, Any]:
    report = service.run_pass(config, store, artifacts, owner="test:1").to_dict()
    assert report["errors"] == [], report["errors"]
    json.dumps(report)  # JSON-ready
    return report


def _kinds(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["rule"], c["kind"]) for c in report["changes"]]


def _global(report: dict[str, Any], rule: str = "accuracy-low") -> dict[str, Any]:
    [m] = [m for m in report["measurements"] if m["rule"] == rule and m["scope"] == "global"]
    return m


def test_an_accuracy_collapse_fires_once_and_resolves_with_hysteresis(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config()
    log_predictions(store, right(20))
    report = _pass(cfg, store, artifacts)
    assert _global(report)["value"] is None  # 20 < min_samples: no-data
    assert report["changes"] == []
    log_predictions(store, right(40))
    assert _global(_pass(cfg, store, artifacts))["value"] == 1.0

    log_predictions(store, wrong(50))  # the last 50: all wrong
    report = _pass(cfg, store, artifacts)
    assert _kinds(report) == [("accuracy-low", "firing")]
    [change] = report["changes"]
    assert (change["version"], change["scope"], change["value"]) == (1, "global", 0.0)
    assert [n["kind"] for n in report["notifications"]] == ["firing"]
    alert_id = change["alert_id"]

    # Deduplicated: more passes, and more bad labels, change nothing.
    assert _pass(cfg, store, artifacts)["changes"] == []
    log_predictions(store, wrong(10))
    report = _pass(cfg, store, artifacts)
    assert report["changes"] == [] and report["notifications"] == []
    assert [a.id for a in store.alerts.list(state="open")] == [alert_id]

    # Hysteresis: the last 50 are back above 0.40 (30 right, 20 wrong: 0.60), but the last
    # 100 (40 right, 60 wrong) are under the 0.50 needed to resolve.
    log_predictions(store, right(30))
    report = _pass(cfg, store, artifacts)
    assert _global(report)["value"] == pytest.approx(0.6)
    assert _global(report)["evidence"]["resolve_value"] == pytest.approx(0.4)
    assert report["changes"] == []
    assert store.alerts.get(alert_id).state == "firing"  # type: ignore[union-attr]

    log_predictions(store, right(40))  # last 100: 70 right, 30 wrong
    report = _pass(cfg, store, artifacts)
    assert _kinds(report) == [("accuracy-low", "resolved")]
    assert [n["kind"] for n in report["notifications"]] == ["resolved"]
    assert store.alerts.get(alert_id).state == "resolved"  # type: ignore[union-attr]
    kinds = [e["kind"] for e in store.alerts.events(alert_id)]
    assert kinds.count("firing") == 1 and kinds.count("resolved") == 1
    assert kinds.count("notified") == 2


def test_labels_out_of_order_land_where_their_predictions_were(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config()
    old = log_predictions(store, wrong(50), label=False)  # older predictions, all wrong
    new = log_predictions(store, right(50), label=False)  # newer ones, all right
    label_predictions(store, new[::-1], ["car"] * 50)  # the newer labelled first, reversed
    report = _pass(cfg, store, artifacts)
    assert (_global(report)["value"], _global(report)["samples"]) == (1.0, 50)
    # The older predictions' labels come last: by label arrival the last 50 are all
    # wrong, but the window is the 50 newest *predictions* with a label, all right.
    label_predictions(store, old[25:], ["bus"] * 25)
    label_predictions(store, old[:25], ["bus"] * 25)
    report = _pass(cfg, store, artifacts)
    assert (_global(report)["value"], _global(report)["samples"]) == (1.0, 50)
    assert report["changes"] == []
    assert report["environments"][0]["new_outcomes"] == 50


class _RacingState:
    """``store.monitor_state`` whose first ``put`` lets a whole competing pass run first,
    so two monitors' passes interleave the worst way, deterministically."""

    def __init__(self, inner: Any, competitor: Any) -> None:
        self.inner, self.competitor = inner, competitor

    def get(self, key: str) -> tuple[int, dict[str, Any]]:
        return self.inner.get(key)  # type: ignore[no-any-return]

    def put(self, key: str, state: dict[str, Any], expected_generation: int) -> bool:
        if self.competitor is not None:
            competitor, self.competitor = self.competitor, None
            competitor()
        return self.inner.put(key, state, expected_generation)  # type: ignore[no-any-return]


def test_two_monitors_in_one_pass_fire_once_and_the_loser_drops_its_state(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config()
    log_predictions(store, right(40) + wrong(50))
    other = MetadataStore(store.url, migrate=False)
    reports: list[dict[str, Any]] = []
    # Monitor A measures (and its alert change lands) first; before A writes its state,
    # monitor B runs a whole pass over the same rows and writes first.
    store.monitor_state = _RacingState(  # type: ignore[assignment]
        store.monitor_state,
        lambda: reports.append(_pass(cfg, other, artifacts)),
    )
    a = _pass(cfg, store, artifacts)
    [b] = reports
    assert a["environments"][0]["state"] == "conflict"
    assert b["environments"][0]["state"] == "saved"
    # Exactly one of them won the alert's transition, and only that one told anyone.
    assert sorted(len(r["changes"]) for r in (a, b)) == [0, 1]
    assert sum(len(r["notifications"]) for r in (a, b)) == 1
    [alert] = store.alerts.list()
    assert [e["kind"] for e in store.alerts.events(alert.id)].count("notified") == 1
    # The next pass goes on from the winner's cursor: nothing is read twice.
    again = _pass(cfg, other, artifacts)
    assert again["environments"][0]["new_outcomes"] == 0
    assert again["changes"] == [] and again["environments"][0]["state"] == "saved"
    other.close()


def test_concurrent_passes_in_threads_never_fire_twice(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config()
    log_predictions(store, right(40) + wrong(50))
    stores = [MetadataStore(store.url, migrate=False) for _ in range(3)]
    reports: list[dict[str, Any]] = []
    barrier = threading.Barrier(len(stores))

    def monitor(s: MetadataStore) -> None:
        barrier.wait()
        for _ in range(2):
            reports.append(service.run_pass(cfg, s, artifacts, owner="t").to_dict())

    threads = [threading.Thread(target=monitor, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert all(r["errors"] == [] for r in reports), [r["errors"] for r in reports]
    assert sum(len(r["changes"]) for r in reports) == 1
    assert sum(len(r["notifications"]) for r in reports) == 1
    [alert] = store.alerts.list()
    assert alert.state == "firing"


def test_a_notify_rule_tells_a_real_webhook_once_and_starts_no_build(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    with webhook_receiver() as (url, received):
        cfg = make_config(
            [{**ACCURACY_RULE, "action": "notify"}],
            owner="qa@example.com",
            channels=[{"kind": "webhook", "url": url}],
        )
        log_predictions(store, right(30) + wrong(50))
        report = _pass(cfg, store, artifacts)
        assert _kinds(report) == [("accuracy-low", "firing")]
        _pass(cfg, store, artifacts)
    [body] = received
    assert body["kind"] == "firing" and body["owner"] == "qa@example.com"
    assert (body["alert"]["rule"], body["alert"]["model_version"]) == ("accuracy-low", 1)
    assert body["alert"]["value"] == 0.0
    [result] = report["notifications"][0]["channels"]
    assert result["ok"] is True
    # A notify action records its loop (one per alert) and builds nothing.
    started = [item for item in report["loops"] if item["event"] == "started"]
    assert [(item["alert_id"], item["action"]) for item in started] == [
        (report["changes"][0]["alert_id"], "notify")
    ]
    assert store.runs.recent() == []


def test_a_new_version_resets_the_windows_and_retires_the_old_alerts(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config()
    log_predictions(store, wrong(50))
    [firing] = _pass(cfg, store, artifacts)["changes"]
    deploy(store, stable_version=2, previous_version=1)
    log_predictions(store, wrong(20), version=1)  # late answers of v1: not v2's
    log_predictions(store, right(10), version=2)
    report = _pass(cfg, store, artifacts)
    assert [(c["alert_id"], c["kind"], c["previous"]) for c in report["changes"]] == [
        (firing["alert_id"], "resolved", "firing")
    ]
    assert "no longer serves" in report["notifications"][0]["message"]
    [m] = report["measurements"]
    assert (m["version"], m["samples"], m["value"]) == (2, 10, None)  # v2 starts empty
    _, state = store.monitor_state.get(f"{ENV}/{MODEL}")
    assert set(state["windows"]["versions"]) == {"2"} and set(state["rules"]) == {"2"}


def test_a_canarys_alerts_are_recorded_but_start_no_loop(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config([{**ACCURACY_RULE, "action": "approve"}])
    deploy(store, candidate_version=2, strategy="canary", candidate_share=0.5)
    log_predictions(store, right(50), version=1)
    log_predictions(store, wrong(50), version=2, variant="canary")
    report = _pass(cfg, store, artifacts)
    assert [(c["version"], c["kind"]) for c in report["changes"]] == [(2, "firing")]
    [skip] = report["loops"]
    assert skip["event"] == "skipped" and "canary" in skip["reason"]
    assert store.loops.get_by_alert(skip["alert_id"]) is None
    assert _pass(cfg, store, artifacts)["loops"] == []  # skipped once, not every pass


def test_a_critical_global_alert_inhibits_the_warnings_of_its_version(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    per_camera = {
        **ACCURACY_RULE,
        "name": "camera-accuracy-low",
        "severity": "warning",
        "scope": "segment",
        "segment_by": ["camera_id"],
    }
    cfg = make_config([ACCURACY_RULE, per_camera])
    log_predictions(store, wrong(50), camera="cam-1")
    report = _pass(cfg, store, artifacts)
    by_rule = {c["rule"]: c for c in report["changes"]}
    assert by_rule["accuracy-low"]["inhibited"] is False
    assert by_rule["camera-accuracy-low"]["inhibited"] is True
    assert by_rule["camera-accuracy-low"]["scope"] == "camera_id=cam-1"
    assert [n["alert_id"] for n in report["notifications"]] == [by_rule["accuracy-low"]["alert_id"]]
    events = store.alerts.events(by_rule["camera-accuracy-low"]["alert_id"])
    assert "inhibited" in [e["kind"] for e in events]


def test_alert_report_follows_the_loop_from_alert_to_deployment(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    cfg = make_config([{**ACCURACY_RULE, "action": "approve"}])
    log_predictions(store, wrong(50))
    [change] = _pass(cfg, store, artifacts)["changes"]
    alert_id = change["alert_id"]
    assert [c["kind"] for c in service.alert_report(store, alert_id)["chain"]] == ["alert"]
    # What the retrain steps record as they go (the steps themselves are the loop's tests):
    # the dataset, the run, the version it built, its replica test, the canary, promotion.
    store.datasets.add(
        version="d" * 64,
        name="m",
        source_uri="lake+captures",
        n_records=120,
        records_sha256="0" * 64,
    )
    store.runs.create(
        "r" * 32,
        pipeline="build",
        project="t",
        config={},
        trigger="alert",
        trigger_ref=f"alert:{alert_id}",
    )
    test = store.replica_tests.record(
        MODEL, 2, environment="staging", passed=True, reasons=[], report={}
    )
    deploy(store, candidate_version=2, strategy="canary", candidate_share=0.1)
    released = store.deployments.get(ENV).generation  # type: ignore[union-attr]
    deploy(
        store,
        stable_version=2,
        previous_version=1,
        candidate_version=None,
        strategy="direct",
        candidate_share=0.0,
    )
    store.loops.create_or_get(alert_id, "retrain", MODEL, ENV, 1, "running", "dataset")
    rec = store.loops.get_by_alert(alert_id)
    assert rec is not None
    store.loops.transition(
        rec.id,
        "running",
        status="succeeded",
        step="done",
        dataset_version="d" * 64,
        run_id="r" * 32,
        model_version=2,
        replica_test_id=test.id,
        deployment_generation=released,
        event={"step": "canary", "status": "promoted"},
    )
    report = service.alert_report(store, alert_id)
    json.dumps(report)
    chain = report["chain"]
    assert [(c["kind"], c["id"]) for c in chain] == [
        ("alert", alert_id),
        ("dataset_version", "d" * 64),
        ("run", "r" * 32),
        ("model_version", "m:2"),
        ("replica_test", test.id),
        ("deployment", f"{ENV}@{released}"),
        ("deployment", f"{ENV}@{released + 1}"),
    ]
    assert all(c.get("at") for c in chain)
    assert "canary m:2 10%" in chain[5]["text"] and "stable m:2" in chain[6]["text"]
    assert "trigger alert" in chain[2]["text"]
    assert report["loop"]["status"] == "succeeded"
    assert "firing" in [e["kind"] for e in report["events"]]
    with pytest.raises(NotFound, match="no alert 999"):
        service.alert_report(store, 999)


def test_the_scheduler_runs_passes_tells_what_loops_wait_for_and_stops(
    db_url: str, artifacts: ArtifactStore
) -> None:
    from loopline.monitor import loop

    store = make_store(db_url, imported=True)  # its retrain loop waits for a person at once
    cfg = make_config([{**ACCURACY_RULE, "action": "approve"}])
    reports: list[dict[str, Any]] = []
    stop = threading.Event()
    told = threading.Event()
    rejected = threading.Event()

    def on_pass(report: service.PassReport) -> None:
        reports.append(report.to_dict())
        kinds = [n["kind"] for n in report.notifications]
        if "awaiting-approval" in kinds:
            told.set()
        if "retrain-rejected" in kinds:
            rejected.set()
            stop.set()

    thread = threading.Thread(
        target=service.run,
        args=(cfg,),
        kwargs={
            "interval_s": 0.05,
            "stop": stop,
            "on_pass": on_pass,
            "store": store,
            "artifacts": artifacts,
            "owner": "test:2",
        },
    )
    thread.start()
    try:
        log_predictions(store, wrong(50))
        assert told.wait(60), reports[-1:]
        [alert] = store.alerts.list()
        loop.decide(store, alert.id, False, actor="qa", reason="not this week")
        assert rejected.wait(60), reports[-1:]
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert all(r["errors"] == [] for r in reports)
    assert len(reports) >= 2
    notices = [n["kind"] for r in reports for n in r["notifications"]]
    assert notices == ["firing", "awaiting-approval", "retrain-rejected"]
    rec = store.loops.get_by_alert(alert.id)
    assert rec is not None and rec.status == "rejected"
    store.close()


def test_the_default_rules_warn_early_then_fire_and_start_a_retrain(
    store: MetadataStore, artifacts: ArtifactStore
) -> None:
    from loopline.monitor.config import default_rules

    cfg = make_config([r.model_dump() for r in default_rules()])
    log_predictions(store, right(100))
    report = _pass(cfg, store, artifacts)
    assert report["changes"] == []
    assert {m["rule"] for m in report["measurements"]} == {r.name for r in default_rules()}
    # The CUSUM sees a collapse within a couple of dozen labels; the window of 50 not yet.
    log_predictions(store, wrong(20))
    report = _pass(cfg, store, artifacts)
    assert _kinds(report) == [("accuracy-collapse", "firing")]
    assert report["loops"][0]["action"] == "notify"
    log_predictions(store, wrong(20))
    report = _pass(cfg, store, artifacts)
    assert _kinds(report) == [("accuracy-low", "firing")]
    [started] = [i for i in report["loops"] if i["event"] == "started"]
    assert (started["action"], started["status"], started["step"]) == (
        "retrain",
        "running",
        "dataset",
    )
    # No reference in this store: the label-free rules are no-data, not errors.
    free = [m for m in report["measurements"] if m["metric"].startswith(("drift", "estimated"))]
    assert free and all(m["value"] is None for m in free)
