"""The monitor's incremental read, on every metadata backend: new rows once, late rows
within ``late_s`` once, label updates again, shadow and addressed answers never."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loopline.drivers.metadata.models import Feedback
from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor import stream
from loopline.monitor.stream import read_new

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SEGMENTS = ["camera_id", "site"]


def pid(name: str) -> str:
    return name.ljust(32, "-")


def log(store: MetadataStore, *items: tuple[str, float], **kw: Any) -> None:
    """Log predictions named ``name`` made ``offset`` seconds after T0."""
    rows = []
    for name, offset in items:
        row = {
            "id": pid(name),
            "at": T0 + timedelta(seconds=offset),
            "model_name": "m",
            "model_version": 1,
            "source": "v1",
            "label": "car",
            "confidence": 0.9,
            "probabilities": [0.9, 0.1],
            "request_metadata": {"camera_id": "cam-1", "site": "north"},
            "input_stats": {"brightness": 100.0},
            "environment": "production",
            "variant": "stable",
            "camera_id": "cam-1",
        }
        row.update(kw)
        rows.append(row)
    store.predictions.log(rows)


def label_at(store: MetadataStore, name: str, label: str, at: datetime) -> None:
    """A label written with an old ``updated_at``: a transaction that committed late."""
    with store.session() as s:
        s.add(Feedback(prediction_id=pid(name), label=label, at=at, updated_at=at))


def names(rows: list[Any]) -> list[str]:
    return [r.prediction_id.rstrip("-") for r in rows]


def seen_count(state: dict[str, Any]) -> int:
    """How many keys a stream's cursor holds digests of (8 bytes each)."""
    return len(base64.b64decode(state["seen"])) // 8


@pytest.fixture
def store(db_url: str) -> Any:
    s = MetadataStore(db_url)
    yield s
    s.close()


def test_new_rows_once_and_late_rows_within_late_s_once(store: MetadataStore) -> None:
    log(store, ("a", 0), ("b", 1), ("c", 2))
    first = read_new(store, "production", "m", None, SEGMENTS, late_s=120)
    assert names(first.logged) == ["a", "b", "c"] and first.outcomes == []
    assert first.logged[0].segments == {"camera_id": "cam-1", "site": "north"}
    assert first.logged[0].probabilities == pytest.approx([0.9, 0.1])
    assert first.logged[0].at == T0 and first.logged[0].at.tzinfo is not None

    # d is new; e was made before the mark but committed only now (within late_s);
    # f is later than late_s before the mark: lost, by design.
    log(store, ("d", 10), ("e", 1.5), ("f", 2 - 121))
    second = read_new(store, "production", "m", first.cursor, SEGMENTS, late_s=120)
    assert names(second.logged) == ["e", "d"]  # in prediction-time order
    third = read_new(store, "production", "m", second.cursor, SEGMENTS, late_s=120)
    assert third.logged == [] and third.outcomes == []

    # Labels: new ones, one committed late with an old time, then one updated.
    store.predictions.record_feedback([(pid("a"), "car"), (pid("b"), "bus")])
    fourth = read_new(store, "production", "m", third.cursor, SEGMENTS, late_s=120)
    assert sorted(names(fourth.outcomes)) == ["a", "b"]
    b = next(o for o in fourth.outcomes if o.prediction_id == pid("b"))
    assert (b.predicted, b.actual, b.correct) == ("car", "bus", False)
    hw = max(o.labelled_at for o in fourth.outcomes)
    label_at(store, "c", "car", hw - timedelta(seconds=30))
    store.predictions.record_feedback([(pid("b"), "car")])  # the label corrected
    fifth = read_new(store, "production", "m", fourth.cursor, SEGMENTS, late_s=120)
    assert names(fifth.outcomes) == ["c", "b"]  # by label time: c's is older
    assert fifth.outcomes[1].actual == "car" and fifth.outcomes[1].labelled_at > b.labelled_at
    sixth = read_new(store, "production", "m", fifth.cursor, SEGMENTS, late_s=120)
    assert sixth.outcomes == [] and sixth.logged == []


def test_shadow_addressed_other_environments_and_models_are_left_out(
    store: MetadataStore,
) -> None:
    log(store, ("s", 0), variant="shadow")
    log(store, ("x", 1), variant="addressed")
    log(store, ("o", 2), environment="staging")
    log(store, ("n", 3), model_name="other")
    log(store, ("u", 4), variant=None, camera_id=None, request_metadata=None)
    log(store, ("k", 5), variant="canary", camera_id="cam-2", request_metadata={"site": 7})
    store.predictions.record_feedback([(pid(n), "car") for n in "sxonuk"])
    new = read_new(store, "production", "m", None, SEGMENTS, late_s=60)
    assert names(new.logged) == ["u", "k"]
    assert sorted(names(new.outcomes)) == ["k", "u"]
    segs = {o.prediction_id.rstrip("-"): o.segments for o in new.outcomes}
    assert segs == {"u": {}, "k": {"camera_id": "cam-2", "site": "7"}}


def test_the_cursor_is_json_and_a_round_trip_reads_the_same(store: MetadataStore) -> None:
    log(store, ("a", 0), ("b", 1))
    store.predictions.record_feedback([(pid("a"), "car")])
    first = read_new(store, "production", "m", None, ["camera_id"], late_s=120)
    text = json.dumps(first.cursor)
    assert json.loads(text) == first.cursor
    log(store, ("c", 2), ("d", 0.5))
    store.predictions.record_feedback([(pid("b"), "van")])
    live = read_new(store, "production", "m", first.cursor, ["camera_id"], late_s=120)
    again = read_new(store, "production", "m", json.loads(text), ["camera_id"], late_s=120)
    assert names(live.logged) == names(again.logged) == ["d", "c"]
    assert names(live.outcomes) == names(again.outcomes) == ["b"]
    assert live.cursor == again.cursor
    # A cursor of another format starts afresh instead of failing.
    assert names(read_new(store, "production", "m", {"v": 99}, [], 120).logged) == list("adbc")


def test_a_limit_pages_through_equal_times_exactly_once(store: MetadataStore) -> None:
    log(store, *((f"r{i}", 0) for i in range(5)), ("z", 1))
    cursor: dict[str, Any] | None = None
    got: list[str] = []
    for _ in range(8):
        new = read_new(store, "production", "m", cursor, [], late_s=30, limit=2, backfill=2)
        if cursor is None:  # the first pass reads the newest two only
            assert len(new.logged) == 2 and names(new.logged)[1] == "z"  # z and one r
        else:
            got += names(new.logged)
        cursor = new.cursor
    assert got == []  # the rest is older than the first pass: never read as late
    log(store, *((f"q{i}", 5) for i in range(5)))
    for _ in range(5):
        new = read_new(store, "production", "m", cursor, [], late_s=30, limit=2)
        got += names(new.logged)
        cursor = new.cursor
    assert sorted(got) == [f"q{i}" for i in range(5)]


def test_a_bounded_seen_set_never_reads_a_row_twice(
    store: MetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "MAX_SEEN", 3)
    log(store, *((f"a{i}", i) for i in range(6)))
    first = read_new(store, "production", "m", None, [], late_s=100)
    assert seen_count(first.cursor["logged"]) == 3
    log(store, ("late", 4.5), ("old", 1.5), ("new", 9))
    second = read_new(store, "production", "m", first.cursor, [], late_s=100)
    # "late" is within the span the seen set covers; "old" is below it (the bound).
    assert names(second.logged) == ["late", "new"]
    third = read_new(store, "production", "m", second.cursor, [], late_s=100)
    assert third.logged == []


def test_a_batch_bigger_than_the_seen_set_and_the_limit_is_read_whole_once(
    store: MetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One feedback POST stamps all its labels with one updated_at (and one batch of
    # predictions may share one time): a group of equal times larger than both the read
    # limit and the seen set must still be read whole, once.
    monkeypatch.setattr(stream, "MAX_SEEN", 3)
    log(store, ("z", 0))
    store.predictions.record_feedback([(pid("z"), "car")])
    cursor = read_new(store, "production", "m", None, [], late_s=60).cursor
    log(store, *((f"b{i}", 5) for i in range(10)))
    store.predictions.record_feedback([(pid(f"b{i}"), "car") for i in range(10)])
    labels: list[str] = []
    logged: list[str] = []
    times = set()
    for _ in range(5):
        new = read_new(store, "production", "m", cursor, [], late_s=60, limit=4)
        labels += names(new.outcomes)
        times |= {o.labelled_at for o in new.outcomes}
        logged += names(new.logged)
        cursor = new.cursor
        assert seen_count(cursor["labels"]) <= 3 and seen_count(cursor["logged"]) <= 3
    want = sorted(f"b{i}" for i in range(10))
    assert sorted(labels) == sorted(logged) == want  # all ten, none twice
    # The seen set holds the newest three keys (b7-b9): the re-check reaches down to b6's
    # key, inside the group. A label committed late at the group's time above it is read
    # once; one below it is past the bound.
    (batch_at,) = times  # one POST, one time
    log(store, ("b6x", 5), ("b0x", 5))
    label_at(store, "b6x", "car", batch_at)
    label_at(store, "b0x", "car", batch_at)
    late = read_new(store, "production", "m", cursor, [], late_s=60, limit=4)
    assert names(late.outcomes) == ["b6x"]
    again = read_new(store, "production", "m", late.cursor, [], late_s=60, limit=4)
    assert again.outcomes == []


def test_an_empty_first_pass_reads_everything_that_comes_after(store: MetadataStore) -> None:
    cursor = read_new(store, "production", "m", None, [], late_s=60).cursor
    log(store, *((f"r{i}", i) for i in range(7)))
    got: list[str] = []
    for _ in range(4):
        new = read_new(store, "production", "m", cursor, [], late_s=60, limit=3, backfill=3)
        got += names(new.logged)
        cursor = new.cursor
    assert got == [f"r{i}" for i in range(7)]  # not just the newest backfill


def test_a_late_row_inside_the_group_at_the_mark_is_read_once(store: MetadataStore) -> None:
    log(store, ("m1", 5), ("m3", 5))
    first = read_new(store, "production", "m", None, [], late_s=60)
    assert first.cursor["logged"]["mark"][1] == pid("m3")
    # Same time as the mark, an id below it: behind the mark, so only the re-check finds it;
    # one above it is after the mark.
    log(store, ("m2", 5), ("m4", 5))
    second = read_new(store, "production", "m", first.cursor, [], late_s=60)
    assert names(second.logged) == ["m2", "m4"]
    third = read_new(store, "production", "m", second.cursor, [], late_s=60)
    assert third.logged == []


def test_the_cursor_holds_digests_not_ids(store: MetadataStore) -> None:
    log(store, *((f"{i:032d}", i / 10) for i in range(300)))  # 32-character ids
    new = read_new(store, "production", "m", None, [], late_s=120)
    assert seen_count(new.cursor["logged"]) == 300
    assert len(json.dumps(new.cursor["logged"])) < 300 * 11 + 200  # 8 bytes of base64 each
