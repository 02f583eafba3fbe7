"""``store.loops`` on SQLite and PostgreSQL: one loop per alert under concurrent creation,
one open retrain per model and environment, compare-and-set claims, only the holder writes,
the timeline, ending a loop and its alert's event in one transaction, listing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from loopline.drivers.metadata.loops import AlertNote, LoopBusy, LoopEnded, LoopNotHeld
from loopline.drivers.metadata.store import MetadataStore


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    yield s
    s.close()


def open_alert(store: MetadataStore, version: int = 1, rule: str = "accuracy-low") -> Any:
    alert = store.alerts.open_alert(
        rule, "accuracy", "production", "tiny", version, "global", "critical", "<", 0.4,
        0.3, 50, "retrain", state="firing",
    )  # fmt: skip
    assert alert is not None
    return alert


def create(store: MetadataStore, alert_id: int, **kw: Any) -> Any:
    return store.loops.create(alert_id, "retrain", "tiny", "production", 1, "running",
                              "dataset", **kw)  # fmt: skip


def test_sixteen_concurrent_creates_make_one_loop(store: MetadataStore) -> None:
    alert = open_alert(store)
    barrier = threading.Barrier(16)
    results: list[Any] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            loop, created = store.loops.create_or_get(
                alert.id, "retrain", "tiny", "production", 1, "running", "dataset",
                event={"step": "start", "status": "running", "detail": f"thread {i}"},
            )  # fmt: skip
            results.append((loop.id, created))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({loop_id for loop_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    loops = store.loops.list()
    assert len(loops) == 1 and len(loops[0].timeline) == 1
    assert store.loops.get_by_alert(alert.id) == loops[0]
    # create (without the flag) returns the existing row.
    assert create(store, alert.id).id == loops[0].id


def test_claim_is_compare_and_set_on_holder_and_heartbeat(store: MetadataStore) -> None:
    loop = create(store, open_alert(store).id)
    first = store.loops.claim(loop.id, "a", stale_after_s=60)
    assert first is not None and first.owner == "a" and first.attempts == 1
    assert store.loops.claim(loop.id, "b", stale_after_s=60) is None  # a's heartbeat is fresh
    again = store.loops.claim(loop.id, "a", stale_after_s=60)  # the holder itself
    assert again is not None and again.attempts == 1
    assert store.loops.heartbeat(loop.id, "a") and not store.loops.heartbeat(loop.id, "b")
    # A stale heartbeat (older than stale_after_s; 0 here) lets another take over.
    taken = store.loops.claim(loop.id, "b", stale_after_s=0)
    assert taken is not None and taken.owner == "b" and taken.attempts == 2
    assert not store.loops.heartbeat(loop.id, "a")
    assert store.loops.release(loop.id, "b") and store.loops.get(loop.id).owner is None
    assert store.loops.claim(loop.id, "c", stale_after_s=60) is not None


def test_concurrent_claims_have_one_winner(store: MetadataStore) -> None:
    loop = create(store, open_alert(store).id)
    barrier = threading.Barrier(16)
    won: list[str] = []

    def one(i: int) -> None:
        barrier.wait()
        if store.loops.claim(loop.id, f"owner-{i}", stale_after_s=60) is not None:
            won.append(f"owner-{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and store.loops.get(loop.id).owner == won[0]


def test_only_the_holder_advances_and_events_append_to_the_timeline(
    store: MetadataStore,
) -> None:
    loop = create(store, open_alert(store).id)
    with pytest.raises(LoopNotHeld, match="held by nobody"):
        store.loops.advance(loop.id, "a", step="build")
    store.loops.claim(loop.id, "a", stale_after_s=60)
    with pytest.raises(LoopNotHeld, match="held by a, not b"):
        store.loops.advance(loop.id, "b", step="build")
    one = store.loops.advance(loop.id, "a", event={"step": "dataset", "status": "succeeded",
                              "detail": "60 labels"}, step="build", state={"n": 60})  # fmt: skip
    two = store.loops.advance(loop.id, "a", event={"step": "build", "status": "running",
                              "detail": "run r1"}, run_id="r1")  # fmt: skip
    assert (two.step, two.run_id, two.state) == ("build", "r1", {"n": 60})
    assert [(e["step"], e["status"], e["detail"]) for e in two.timeline] == [
        ("dataset", "succeeded", "60 labels"), ("build", "running", "run r1")]  # fmt: skip
    assert all(e["at"] for e in two.timeline) and len(one.timeline) == 1
    with pytest.raises(ValueError, match="unknown loop fields"):
        store.loops.advance(loop.id, "a", heartbeat_at=None)
    with pytest.raises(ValueError, match="loop status 'done'"):
        store.loops.advance(loop.id, "a", status="done")
    assert store.loops.get(loop.id).to_dict()["timeline"] == two.timeline


def test_transition_acts_only_on_the_expected_status(store: MetadataStore) -> None:
    loop = create(store, open_alert(store).id)
    store.loops.claim(loop.id, "monitor", stale_after_s=60)
    assert store.loops.transition(loop.id, "waiting_approval", status="running") is None
    store.loops.advance(loop.id, "monitor", status="waiting_approval", step="approval")
    done = store.loops.transition(loop.id, "waiting_approval", status="rejected",
                                  decided_by="qa", reason="no")  # fmt: skip
    assert done is not None and (done.status, done.decided_by) == ("rejected", "qa")
    assert store.loops.transition(loop.id, "waiting_approval", status="running") is None


def test_list_filters_by_status(store: MetadataStore) -> None:
    a = create(store, open_alert(store, rule="r1").id)
    b = create(store, open_alert(store, rule="r2").id)
    store.loops.claim(b.id, "m", stale_after_s=60)
    store.loops.advance(b.id, "m", status="succeeded", step="done")
    assert [x.id for x in store.loops.list()] == [a.id, b.id]
    assert [x.id for x in store.loops.list("running")] == [a.id]
    assert [x.id for x in store.loops.list(["running", "succeeded"])] == [a.id, b.id]
    assert [x.id for x in store.loops.list(limit=1)] == [b.id]
    assert store.loops.list(model_name="other") == []


# -- one open retrain per model and environment; atomic writes with the alert -----------------
KEY = "tiny|production"


def test_sixteen_concurrent_retrains_of_one_model_open_one_loop(store: MetadataStore) -> None:
    alerts = [open_alert(store, rule=f"r{i}") for i in range(16)]
    barrier = threading.Barrier(16)
    created: list[int] = []
    busy: list[int] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            loop, new = store.loops.create_or_get(
                alerts[i].id, "retrain", "tiny", "production", 1, "running", "dataset",
                open_key=KEY,
            )  # fmt: skip
            assert new
            created.append(loop.id)
        except LoopBusy as err:
            busy.append(err.loop.id)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(created) == 1 and busy == [created[0]] * 15
    (winner,) = store.loops.list()
    assert winner.open_key == KEY
    # Ending it frees the key: the next retrain of the model opens.
    store.loops.claim(winner.id, "m", stale_after_s=60)
    done = store.loops.finish(winner.id, "m", "failed", "broke")
    assert done.open_key is None and done.owner is None
    nxt, new = store.loops.create_or_get(open_alert(store, rule="later").id, "retrain", "tiny",
                                         "production", 1, "running", "dataset",
                                         open_key=KEY)  # fmt: skip
    assert new and nxt.open_key == KEY


def test_finish_writes_the_loop_its_alert_event_and_reason_in_one_transaction(
    store: MetadataStore,
) -> None:
    alert = open_alert(store)
    loop = create(store, alert.id, open_key=KEY)
    store.loops.claim(loop.id, "m", stale_after_s=60)
    done = store.loops.finish(loop.id, "m", "rejected", "the gate said no", run_id="r1")
    assert (done.status, done.step, done.run_id) == ("rejected", "dataset", "r1")
    assert done.reason == "the gate said no"
    assert done.finished_at is not None and done.timeline[-1]["status"] == "rejected"
    (event,) = [e for e in store.alerts.events(alert.id) if e["kind"].startswith("loop.")]
    assert (event["kind"], event["message"]) == ("loop.rejected", "the gate said no")
    assert event["details"]["loop_id"] == loop.id
    assert store.alerts.get(alert.id).reason == "the gate said no"
    # A finished loop is written no more: not by its holder, nor finished twice.
    with pytest.raises(LoopEnded, match="has ended"):
        store.loops.advance(loop.id, "m", step="build")
    with pytest.raises(LoopEnded, match="has ended"):
        store.loops.finish(loop.id, "m", "failed", "again")
    # The alert's event cannot be written (details that are not JSON): the loop is unchanged.
    other = create(store, open_alert(store, rule="r2").id)
    bad = AlertNote("loop.rejected", "no", details={"x": object()})
    with pytest.raises(Exception):  # noqa: B017 - the driver's own serialisation error
        store.loops.transition(other.id, "running", notes=[bad], status="rejected",
                               alert_reason="no")  # fmt: skip
    kept = store.loops.get(other.id)
    assert (kept.status, kept.finished_at) == ("running", None)
    assert store.alerts.get(other.alert_id).reason is None


def test_transition_checks_the_step_too(store: MetadataStore) -> None:
    loop = create(store, open_alert(store).id, open_key=KEY)
    store.loops.claim(loop.id, "m", stale_after_s=60)
    store.loops.advance(loop.id, "m", step="canary")
    assert store.loops.transition(loop.id, "running", steps=["dataset", "build"],
                                  status="rejected") is None  # fmt: skip
    note = AlertNote("loop.rejected", "no")
    done = store.loops.transition(loop.id, "running", steps=["canary"], notes=[note],
                                  status="rejected", alert_reason="no")  # fmt: skip
    assert done is not None and (done.status, done.owner, done.open_key) == ("rejected", None, None)
    assert [e["kind"] for e in store.alerts.events(loop.alert_id)][-1] == "loop.rejected"
    assert store.alerts.get(loop.alert_id).reason == "no"
