"""``store.loops`` on SQLite and PostgreSQL: one loop per alert under concurrent creation,
compare-and-set claims, only the holder writes, the timeline, listing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from loopline.drivers.metadata.loops import LoopNotHeld
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
