"""``store.alerts`` on SQLite and PostgreSQL: one open alert per key, compare-and-set
transitions with their events, and no IntegrityError when callers race."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loopline.drivers.metadata.alerts import AlertRecord, open_key
from loopline.drivers.metadata.store import MetadataStore

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
KEY = ("accuracy-low", "production", "vehicles", 1, "global")


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    yield s
    s.close()


def _open(store: MetadataStore, state: str = "pending", *, version: int = 1,
          scope: str = "global", at: datetime = T0) -> AlertRecord | None:  # fmt: skip
    return store.alerts.open_alert(
        "accuracy-low", "accuracy", "production", "vehicles", version, scope, "critical", "<",
        0.40, 0.31, 50, "retrain", state, {"window": "last 50"}, at=at,
    )  # fmt: skip


def _race(n: int, call: Callable[[int], Any]) -> list[Any]:
    """Run ``call(i)`` in ``n`` threads released at once; results, or the exceptions."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def work(i: int) -> None:
        barrier.wait()
        try:
            out[i] = call(i)
        except Exception as err:  # noqa: BLE001 - the test asserts there is none
            out[i] = err

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_open_then_duplicate_returns_none_and_resolve_frees_the_key(store: MetadataStore) -> None:
    alert = _open(store)
    assert alert is not None
    assert (alert.state, alert.value, alert.samples, alert.fired_at) == ("pending", 0.31, 50, None)
    assert alert.open_key == open_key(*KEY) == "accuracy-low|production|vehicles|1|global"
    assert alert.started_at == T0 and alert.is_open
    assert alert.to_dict()["started_at"] == T0.isoformat()
    assert _open(store) is None  # the same key while open
    assert _open(store, version=2) is not None  # another version is another key
    assert _open(store, scope="camera_id=cam-1") is not None  # and another scope
    assert store.alerts.find_open(*KEY) == alert

    fired = store.alerts.transition(alert.id, "pending", "firing", value=0.30, samples=51,
                                    message="fired", at=T0 + timedelta(seconds=60))  # fmt: skip
    assert fired is not None and fired.state == "firing"
    assert fired.fired_at == T0 + timedelta(seconds=60) and fired.value == 0.30
    resolved = store.alerts.transition(alert.id, "firing", "resolved", value=0.55, samples=100,
                                       at=T0 + timedelta(seconds=120))  # fmt: skip
    assert resolved is not None and resolved.open_key is None and not resolved.is_open
    assert resolved.resolved_at == T0 + timedelta(seconds=120)
    assert store.alerts.find_open(*KEY) is None
    again = _open(store, at=T0 + timedelta(seconds=200))
    assert again is not None and again.id != alert.id

    kinds = [(e["kind"], e["value"]) for e in store.alerts.events(alert.id)]
    assert kinds == [("pending", 0.31), ("firing", 0.30), ("resolved", 0.55)]
    assert store.alerts.events(alert.id)[1]["message"] == "fired"
    assert store.alerts.last_resolved(*KEY) == store.alerts.get(alert.id)
    # The cooldown is per version: version 2's key has resolved nothing.
    assert store.alerts.last_resolved("accuracy-low", "production", "vehicles", 2, "global") is None


def test_transition_is_compare_and_set(store: MetadataStore) -> None:
    alert = _open(store)
    assert alert is not None
    assert store.alerts.transition(alert.id, "firing", "resolved") is None  # not firing
    assert store.alerts.transition(alert.id, "pending", "firing") is not None
    assert store.alerts.transition(alert.id, "pending", "firing") is None  # already done
    assert store.alerts.transition(alert.id + 999, "pending", "firing") is None
    with pytest.raises(ValueError, match="resolved->firing is not allowed"):
        store.alerts.transition(alert.id, "resolved", "firing")
    assert [e["kind"] for e in store.alerts.events(alert.id)] == ["pending", "firing"]


def test_opening_firing_records_pending_then_firing(store: MetadataStore) -> None:
    alert = _open(store, "firing")
    assert alert is not None and alert.state == "firing" and alert.fired_at == T0
    assert [e["kind"] for e in store.alerts.events(alert.id)] == ["pending", "firing"]
    with pytest.raises(ValueError, match="opens pending or firing"):
        _open(store, "resolved", version=3)


def test_update_value_notes_reason_and_list(store: MetadataStore) -> None:
    a = _open(store)
    b = _open(store, "firing", version=2, at=T0 + timedelta(seconds=1))
    assert a is not None and b is not None
    assert store.alerts.update_value(a.id, "pending", value=0.2, samples=60, details={"x": 1})
    assert not store.alerts.update_value(a.id, "firing", value=0.1, samples=61)  # wrong state
    got = store.alerts.get(a.id)
    assert got is not None and (got.value, got.samples, got.details) == (0.2, 60, {"x": 1})
    assert [e["kind"] for e in store.alerts.events(a.id)] == ["pending"]  # no event

    event_id = store.alerts.add_event(a.id, "notified", "told qa@example.com", "loopline",
                                      {"channels": ["log"]})  # fmt: skip
    assert store.alerts.events(a.id)[-1]["id"] == event_id
    assert store.alerts.set_reason(a.id, "the gate rejected v2")
    assert store.alerts.get(a.id).reason == "the gate rejected v2"  # type: ignore[union-attr]
    assert not store.alerts.set_reason(a.id + 999, "nothing")
    assert store.alerts.get(a.id + 999) is None

    assert [x.id for x in store.alerts.list()] == [b.id, a.id]  # newest first
    assert [x.id for x in store.alerts.list(state="firing")] == [b.id]
    assert [x.id for x in store.alerts.list(state="open", model_version=1)] == [a.id]
    assert store.alerts.list(environment="staging") == []
    assert store.alerts.list(model_name="vehicles", limit=1)[0].id == b.id
    with pytest.raises(ValueError, match="allowed pending, firing, resolved or open"):
        store.alerts.list(state="closed")


def test_last_resolved_counts_only_fired_alerts(store: MetadataStore) -> None:
    never = _open(store)
    assert never is not None
    store.alerts.transition(never.id, "pending", "resolved", at=T0 + timedelta(seconds=5))
    assert store.alerts.last_resolved(*KEY) is None
    assert store.alerts.last_resolved(*KEY, fired_only=False).id == never.id  # type: ignore[union-attr]


@pytest.mark.parametrize("flag", ["retired", "expired"])
def test_a_retired_or_expired_resolution_starts_no_cooldown(
    store: MetadataStore, flag: str
) -> None:
    counted = _open(store, "firing")
    assert counted is not None
    store.alerts.transition(counted.id, "firing", "resolved", at=T0 + timedelta(seconds=10))
    retired = _open(store, "firing", at=T0 + timedelta(seconds=20))
    assert retired is not None
    done = store.alerts.transition(retired.id, "firing", "resolved", message="no longer serves",
                                   at=T0 + timedelta(seconds=30), details={flag: True})  # fmt: skip
    assert done is not None and done.details[flag] is True and not done.starts_cooldown
    assert done.details["window"] == "last 50"  # the flag is added to what was there
    assert store.alerts.events(retired.id)[-1]["details"][flag] is True
    # The newer, retired resolution is skipped: the cooldown is the older one's.
    assert store.alerts.last_resolved(*KEY).id == counted.id  # type: ignore[union-attr]
    assert store.alerts.last_resolved(*KEY, fired_only=False).id == retired.id  # type: ignore[union-attr]


def test_open_for_returns_the_open_alerts_of_a_model_by_key(store: MetadataStore) -> None:
    a = _open(store)
    b = _open(store, "firing", version=2, scope="camera_id=cam-1")
    gone = _open(store, version=3)
    assert a is not None and b is not None and gone is not None
    store.alerts.transition(gone.id, "pending", "resolved")
    store.alerts.open_alert("accuracy-low", "accuracy", "staging", "vehicles", 1, "global",
                            "critical", "<", 0.4, 0.3, 50, "none")  # fmt: skip
    got = store.alerts.open_for("production", "vehicles")
    assert got == {a.open_key: a, b.open_key: b}
    assert store.alerts.open_for("production", "other") == {}


def test_sixteen_threads_open_one_alert(store: MetadataStore) -> None:
    got = _race(16, lambda i: _open(store, "firing"))
    errors = [g for g in got if isinstance(g, Exception)]
    assert errors == []
    opened = [g for g in got if g is not None]
    assert len(opened) == 1
    assert len(store.alerts.list()) == 1
    assert [e["kind"] for e in store.alerts.events(opened[0].id)] == ["pending", "firing"]


def test_sixteen_threads_one_transition_wins(store: MetadataStore) -> None:
    alert = _open(store)
    assert alert is not None
    got = _race(16, lambda i: store.alerts.transition(alert.id, "pending", "firing", value=i))
    assert [g for g in got if isinstance(g, Exception)] == []
    winners = [g for g in got if g is not None]
    assert len(winners) == 1
    assert [e["kind"] for e in store.alerts.events(alert.id)] == ["pending", "firing"]
    # Resolve and reopen, racing: one resolve, then one new open alert for the key.
    got = _race(16, lambda i: store.alerts.transition(alert.id, "firing", "resolved"))
    assert len([g for g in got if g is not None and not isinstance(g, Exception)]) == 1
    got = _race(16, lambda i: _open(store))
    assert [g for g in got if isinstance(g, Exception)] == []
    assert len([g for g in got if g is not None]) == 1
    assert len(store.alerts.list(state="open")) == 1
