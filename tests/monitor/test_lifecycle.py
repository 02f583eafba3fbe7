"""The alert lifecycle on a real store: no-data, pending, firing, hysteresis, cooldown,
dedup and inhibition, with explicit times (never a sleep)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor.config import AlertRule
from loopline.monitor.lifecycle import AlertChange, evaluate, inhibited, resolve_holds
from loopline.monitor.types import GLOBAL, Measurement

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ACCURACY = AlertRule(name="accuracy-low", metric="accuracy", op="<", threshold=0.40, window=50,
                     min_samples=30, severity="critical", action="retrain",
                     resolve_threshold=0.50, resolve_window=100, cooldown_s=600)  # fmt: skip


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def m(value: float | None, samples: int = 50, *, scope: str = GLOBAL, version: int = 1,
      metric: str = "accuracy", **evidence: Any) -> Measurement:  # fmt: skip
    return Measurement(metric, "production", "vehicles", version, scope, value, samples,
                       "last 50", dict(evidence))  # fmt: skip


@pytest.fixture
def store(tmp_path: Any) -> Iterator[MetadataStore]:
    s = MetadataStore(f"sqlite:///{tmp_path / 'loopline.db'}")
    yield s
    s.close()


def kinds(changes: list[AlertChange]) -> list[tuple[str, str | None]]:
    return [(c.kind, c.previous) for c in changes]


def test_no_data_never_opens_nor_resolves(store: MetadataStore) -> None:
    assert evaluate(store, ACCURACY, m(None, 10), at(0)) == []
    assert store.alerts.list() == []
    fired = evaluate(store, ACCURACY, m(0.30), at(1))
    assert kinds(fired) == [("firing", None)]
    assert evaluate(store, ACCURACY, m(None, 5), at(2)) == []
    assert evaluate(store, ACCURACY, m(0.9, stale=True), at(3)) == []  # labels stopped
    assert store.alerts.get(fired[0].alert.id).state == "firing"  # type: ignore[union-attr]


def test_for_s_zero_fires_at_once_with_both_events(store: MetadataStore) -> None:
    changes = evaluate(store, ACCURACY, m(0.31), at(0))
    assert kinds(changes) == [("firing", None)]
    alert = changes[0].alert
    assert (alert.state, alert.value, alert.samples, alert.fired_at) == ("firing", 0.31, 50, T0)
    assert alert.details["window"] == "last 50"
    assert [e["kind"] for e in store.alerts.events(alert.id)] == ["pending", "firing"]
    assert "accuracy-low firing" in (store.alerts.events(alert.id)[1]["message"] or "")
    # The same condition again: no second alert, the value is kept up to date, no event.
    assert evaluate(store, ACCURACY, m(0.28, 60), at(5)) == []
    assert len(store.alerts.list()) == 1
    got = store.alerts.get(alert.id)
    assert got is not None and (got.value, got.samples, got.updated_at) == (0.28, 60, at(5))
    assert len(store.alerts.events(alert.id)) == 2


def test_pending_fires_after_for_s(store: MetadataStore) -> None:
    rule = ACCURACY.model_copy(update={"for_s": 60.0})
    assert kinds(evaluate(store, rule, m(0.3), at(0))) == [("pending", None)]
    assert evaluate(store, rule, m(0.3), at(30)) == []  # held 30 s of 60
    assert evaluate(store, rule, m(None, 3), at(59)) == []  # no-data keeps it pending
    changes = evaluate(store, rule, m(0.35), at(60))
    assert kinds(changes) == [("firing", "pending")]
    assert changes[0].alert.fired_at == at(60) and changes[0].alert.started_at == T0
    assert evaluate(store, rule, m(0.3), at(90)) == []


def test_pending_resolves_when_the_condition_goes(store: MetadataStore) -> None:
    rule = ACCURACY.model_copy(update={"for_s": 60.0})
    opened = evaluate(store, rule, m(0.3), at(0))
    changes = evaluate(store, rule, m(0.42), at(20))  # above 0.40: no hysteresis while pending
    assert kinds(changes) == [("resolved", "pending")]
    assert changes[0].alert.fired_at is None and changes[0].alert.open_key is None
    assert [e["kind"] for e in store.alerts.events(opened[0].alert.id)] == ["pending", "resolved"]
    # It never fired: no cooldown, a new one may open at once.
    assert kinds(evaluate(store, rule, m(0.3), at(21))) == [("pending", None)]


def test_hysteresis_keeps_firing_between_the_thresholds(store: MetadataStore) -> None:
    alert = evaluate(store, ACCURACY, m(0.30), at(0))[0].alert
    for i, value in enumerate((0.40, 0.45, 0.49)):  # not below 0.40, not yet 0.50
        assert evaluate(store, ACCURACY, m(value), at(10 + i)) == []
    # The resolve window (100 labels) is what decides when the metric gives it.
    assert evaluate(store, ACCURACY, m(0.6, resolve_value=0.48, resolve_samples=100), at(20)) == []
    assert evaluate(store, ACCURACY, m(0.6, resolve_value=0.7, resolve_samples=20), at(21)) == []
    assert evaluate(store, ACCURACY, m(0.6, resolve_value=None, resolve_samples=0), at(22)) == []
    # Still below the firing threshold over the short window: not resolved either.
    assert evaluate(store, ACCURACY, m(0.38, resolve_value=0.55, resolve_samples=100), at(23)) == []
    assert store.alerts.get(alert.id).state == "firing"  # type: ignore[union-attr]
    changes = evaluate(store, ACCURACY, m(0.52, resolve_value=0.51, resolve_samples=100), at(30))
    assert kinds(changes) == [("resolved", "firing")]
    assert changes[0].alert.resolved_at == at(30)
    assert [e["kind"] for e in store.alerts.events(alert.id)] == ["pending", "firing", "resolved"]


def test_resolve_without_resolve_window_uses_the_value() -> None:
    rule = ACCURACY.model_copy(update={"resolve_window": None})
    assert not resolve_holds(rule, m(0.49))
    assert resolve_holds(rule, m(0.50))
    plain = ACCURACY.model_copy(update={"resolve_threshold": None})
    assert resolve_holds(plain, m(0.40)) and not resolve_holds(plain, m(0.39))
    cusum = AlertRule(name="c", metric="cusum", op=">", threshold=9.2, min_samples=1)
    assert resolve_holds(cusum, m(9.2, metric="cusum"))
    assert not resolve_holds(cusum, m(9.3, metric="cusum"))


def test_cooldown_after_a_resolve(store: MetadataStore) -> None:
    first = evaluate(store, ACCURACY, m(0.3), at(0))[0].alert
    evaluate(store, ACCURACY, m(0.6), at(100))
    assert store.alerts.get(first.id).state == "resolved"  # type: ignore[union-attr]
    assert evaluate(store, ACCURACY, m(0.3), at(100 + 599)) == []  # within 600 s
    assert len(store.alerts.list()) == 1
    assert evaluate(store, ACCURACY, m(0.3, scope="camera_id=cam-1"), at(200)) != []  # own key
    second = evaluate(store, ACCURACY, m(0.3), at(100 + 600))
    assert kinds(second) == [("firing", None)] and second[0].alert.id != first.id


def test_the_cooldown_is_per_version_and_a_retirement_starts_none(store: MetadataStore) -> None:
    """The loop promotes v2: v1's alert, resolved or retired, never mutes v2's."""
    v1 = evaluate(store, ACCURACY, m(0.3), at(0))[0].alert
    evaluate(store, ACCURACY, m(0.6), at(100))  # v1 recovers: v1's key cools down
    assert kinds(evaluate(store, ACCURACY, m(0.3, version=2), at(101))) == [("firing", None)]
    assert evaluate(store, ACCURACY, m(0.3), at(102)) == []  # v1 still cooling down
    # A version that stops serving is retired by the pass: that starts no cooldown.
    v3 = evaluate(store, ACCURACY, m(0.3, version=3), at(200))[0].alert
    store.alerts.transition(v3.id, "firing", "resolved", message="no longer serves",
                            at=at(210), details={"retired": True})  # fmt: skip
    again = evaluate(store, ACCURACY, m(0.3, version=3), at(220))
    assert kinds(again) == [("firing", None)] and again[0].alert.id != v3.id
    assert store.alerts.get(v1.id).state == "resolved"  # type: ignore[union-attr]


def _count_updates(store: MetadataStore) -> list[str]:
    """The UPDATE statements on the alerts table the store runs from now on."""
    from sqlalchemy import event

    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE ALERTS"):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", before)
    return seen


def test_open_alerts_of_a_pass_and_no_write_when_nothing_changed(store: MetadataStore) -> None:
    rule = ACCURACY.model_copy(update={"for_s": 120.0})
    open_alerts = store.alerts.open_for("production", "vehicles")
    assert open_alerts == {}
    opened = evaluate(store, rule, m(0.3), at(0), open_alerts=open_alerts)[0].alert
    assert list(open_alerts.values()) == [opened]  # kept up to date
    updates = _count_updates(store)
    assert evaluate(store, rule, m(0.3), at(10), open_alerts=open_alerts) == []
    assert updates == []  # same value and samples: nothing written
    assert evaluate(store, rule, m(0.31, 51), at(20), open_alerts=open_alerts) == []
    assert len(updates) == 1  # the value changed: one UPDATE
    got = store.alerts.get(opened.id)
    assert got is not None and (got.value, got.samples) == (0.31, 51)
    assert got.details["evidence"] == {}  # within EVIDENCE_EVERY_S: evidence left as it was
    assert open_alerts[opened.open_key or ""].value == 0.31
    evaluate(store, rule, m(0.32, 52, note="x"), at(61), open_alerts=open_alerts)
    got = store.alerts.get(opened.id)
    assert got is not None and got.details["evidence"] == {"note": "x"}  # 61 s on: rewritten
    # A state change rewrites the evidence and moves the dict's entry.
    changes = evaluate(store, rule, m(0.33, 53, note="y"), at(120), open_alerts=open_alerts)
    assert kinds(changes) == [("firing", "pending")]
    assert changes[0].alert.details["evidence"] == {"note": "y"}
    assert open_alerts[opened.open_key or ""].state == "firing"
    assert kinds(evaluate(store, rule, m(0.9), at(130), open_alerts=open_alerts)) == [
        ("resolved", "firing")
    ]  # fmt: skip
    assert open_alerts == {}


def test_a_stale_open_alerts_entry_loses_the_compare_and_set(store: MetadataStore) -> None:
    """Another monitor resolved the alert after this pass read its open alerts."""
    alert = evaluate(store, ACCURACY, m(0.3), at(0))[0].alert
    open_alerts = store.alerts.open_for("production", "vehicles")
    store.alerts.transition(alert.id, "firing", "resolved", at=at(5))  # the other monitor
    assert evaluate(store, ACCURACY, m(0.9), at(10), open_alerts=open_alerts) == []
    assert open_alerts == {}  # read again: nothing open now
    assert [e["kind"] for e in store.alerts.events(alert.id)] == ["pending", "firing", "resolved"]
    # And one opened by another monitor meanwhile is not opened twice.
    other = evaluate(store, ACCURACY.model_copy(update={"cooldown_s": 0}), m(0.3), at(20))
    assert evaluate(store, ACCURACY.model_copy(update={"cooldown_s": 0}), m(0.3), at(21),
                    open_alerts=open_alerts) == []  # fmt: skip
    assert open_alerts == {other[0].alert.open_key: other[0].alert}
    assert len(store.alerts.list(state="open")) == 1


def test_cusum_rule_lifecycle(store: MetadataStore) -> None:
    rule = AlertRule(name="accuracy-collapse", metric="cusum", op=">", threshold=9.2,
                     min_samples=1, action="notify", cooldown_s=0)  # fmt: skip
    assert evaluate(store, rule, m(3.0, metric="cusum"), at(0)) == []
    assert kinds(evaluate(store, rule, m(10.0, metric="cusum"), at(1))) == [("firing", None)]
    # The pass peaked above h and ended under it: resolved on the next pass.
    ev: dict[str, Any] = {"resolve_value": 8.0, "resolve_samples": 40}
    assert evaluate(store, rule, m(9.5, metric="cusum", **ev), at(2)) == []
    changes = evaluate(store, rule, m(8.0, metric="cusum", **ev), at(3))
    assert kinds(changes) == [("resolved", "firing")]


def test_concurrent_evaluations_open_and_fire_once(db_url: str) -> None:
    url = db_url
    MetadataStore(url).close()
    rule = ACCURACY.model_copy(update={"for_s": 10.0})
    stores = [MetadataStore(url) for _ in range(16)]  # one engine each, as processes would

    def race(measurement: Measurement, now: datetime) -> list[Any]:
        barrier = threading.Barrier(16)
        out: list[Any] = [None] * 16

        def work(i: int) -> None:
            barrier.wait()
            try:
                out[i] = evaluate(stores[i], rule, measurement, now)
            except Exception as err:  # noqa: BLE001 - asserted below
                out[i] = err

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [o for o in out if isinstance(o, Exception)] == []
        return [c for o in out for c in o]

    try:
        assert kinds(race(m(0.3), at(0))) == [("pending", None)]
        assert kinds(race(m(0.3), at(10))) == [("firing", "pending")]
        assert kinds(race(m(0.6), at(20))) == [("resolved", "firing")]
        alerts = stores[0].alerts.list()
        assert len(alerts) == 1
        assert [e["kind"] for e in stores[0].alerts.events(alerts[0].id)] == [
            "pending", "firing", "resolved"
        ]  # fmt: skip
    finally:
        for s in stores:
            s.close()


def test_inhibition_by_a_firing_critical_global_alert(store: MetadataStore) -> None:
    warning = AlertRule(name="input-drift", metric="drift.inputs", op=">", threshold=0.0,
                        window=200, min_samples=50, action="notify")  # fmt: skip
    per_camera = ACCURACY.model_copy(update={"scope": "segment"})
    drift = evaluate(store, warning, m(0.3, metric="drift.inputs"), at(0))[0]
    camera = evaluate(store, per_camera, m(0.2, scope="camera_id=cam-1"), at(0))[0]
    other = evaluate(store, warning, m(0.3, metric="drift.inputs", version=2), at(0))[0]
    assert not inhibited(drift, store.alerts.list(state="open"))  # nothing critical yet
    critical = evaluate(store, ACCURACY, m(0.3), at(1))[0]
    open_now = store.alerts.list(state="open")
    assert inhibited(drift, open_now) and inhibited(camera, open_now)
    assert inhibited(drift.alert, [critical])  # records and changes both accepted
    assert not inhibited(critical, open_now)  # never itself
    assert not inhibited(other, open_now)  # another version
    # Neither a resolved nor a pending critical alert inhibits.
    resolved = store.alerts.transition(critical.alert.id, "firing", "resolved", at=at(1))
    assert resolved is not None and not inhibited(drift, [resolved])
    slow = ACCURACY.model_copy(update={"for_s": 60.0, "cooldown_s": 0.0})
    pending = evaluate(store, slow, m(0.3), at(2))[0]
    assert pending.kind == "pending" and not inhibited(drift, [pending])
