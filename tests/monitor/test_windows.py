"""Rolling windows: bounded by count and age per (version, scope), ordered by prediction
time, label updates replacing, JSON state."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from loopline.monitor.config import AlertRule, MonitorConfig
from loopline.monitor.stream import NewRows
from loopline.monitor.types import GLOBAL, Logged, Outcome
from loopline.monitor.windows import (
    DEFAULT_MAX_AGE_S,
    MIN_COUNT,
    Windows,
    detail_for,
    rule_scopes,
    sizes_for,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def t(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def outcome(
    i: int, at: float, actual: str = "car", version: int = 1, labelled: float | None = None,
    **segments: str,
) -> Outcome:  # fmt: skip
    return Outcome(f"p{i}", t(at), t(labelled if labelled is not None else at + 100), version,
                   "stable", "car", actual, 0.8, dict(segments))  # fmt: skip


def logged(i: int, at: float, version: int = 1, **segments: str) -> Logged:
    return Logged(f"p{i}", t(at), version, "stable", "car", 0.812345678, [0.7123456, 0.2876544],
                  {"brightness": 101.123456, "note": "x"}, dict(segments))  # fmt: skip


def add(w: Windows, outcomes: list[Outcome] = (), logs: list[Logged] = ()) -> None:  # type: ignore[assignment]
    w.add(NewRows(list(outcomes), list(logs), {}))


def view(w: Windows, now: float, version: int = 1):  # type: ignore[no-untyped-def]
    return w.view("production", "m", version, t(now), None, None)  # type: ignore[arg-type]


def ids(samples: list) -> list[str]:  # type: ignore[type-arg]
    return [s.prediction_id for s in samples]


def test_count_and_time_bounds() -> None:
    w = Windows(max_count=5, max_age_s=3600)
    add(w, [outcome(i, i) for i in range(8)], [logged(i, i) for i in range(8)])
    v = view(w, 10)
    assert ids(v.labelled(GLOBAL)) == ["p3", "p4", "p5", "p6", "p7"]  # oldest first
    assert ids(v.labelled(GLOBAL, count=2)) == ["p6", "p7"]
    assert ids(v.labelled(GLOBAL, seconds=5.5)) == ["p5", "p6", "p7"]  # at >= now - 5.5
    assert ids(v.labelled(GLOBAL, count=2, seconds=1)) == []
    assert ids(v.logged(GLOBAL, count=3)) == ["p5", "p6", "p7"]
    assert v.labelled("camera_id=nope") == []
    # Age: a view later on drops what is older than max_age_s.
    w2 = Windows(max_count=100, max_age_s=5)
    add(w2, [outcome(i, i) for i in range(8)])
    assert ids(view(w2, 10).labelled(GLOBAL)) == ["p5", "p6", "p7"]


def test_out_of_order_labels_land_at_their_prediction_time() -> None:
    w = Windows(max_count=3, max_age_s=3600)
    add(w, [outcome(5, 5), outcome(7, 7)])
    add(w, [outcome(6, 6)])  # its label came last; its prediction was in between
    assert ids(view(w, 10).labelled(GLOBAL)) == ["p5", "p6", "p7"]
    add(w, [outcome(2, 2)])  # older than everything a full window holds: not in it
    assert ids(view(w, 10).labelled(GLOBAL)) == ["p5", "p6", "p7"]
    add(w, [outcome(8, 8)])
    assert ids(view(w, 10).labelled(GLOBAL)) == ["p6", "p7", "p8"]


def test_an_updated_label_replaces_the_previous_outcome() -> None:
    w = Windows(max_count=10, max_age_s=3600)
    add(w, [outcome(1, 1, "car"), outcome(2, 2, "car", camera_id="c1")])
    add(w, [outcome(2, 2, "bus", labelled=300, camera_id="c1")])
    v = view(w, 10)
    got = v.labelled(GLOBAL)
    assert ids(got) == ["p1", "p2"] and got[1].actual == "bus" and not got[1].correct
    assert [o.actual for o in v.labelled("camera_id=c1")] == ["bus"]
    assert [o.actual for o in v.new_outcomes(GLOBAL)] == ["bus"]  # the last add only
    assert v.new_outcomes("camera_id=c2") == []


def test_scopes_and_per_scope_bounds() -> None:
    w = Windows(max_count=2, max_age_s=3600)
    add(w, [outcome(1, 1, camera_id="cam-2", site="n"), outcome(2, 2, camera_id="cam-1"),
            outcome(3, 3, camera_id="cam-1"), outcome(4, 4, camera_id="cam-1")],
        [logged(9, 9, camera_id="cam-3")])  # fmt: skip
    v = view(w, 10)
    assert v.scopes(["camera_id"]) == [GLOBAL, "camera_id=cam-1", "camera_id=cam-2",
                                       "camera_id=cam-3"]  # fmt: skip
    assert v.scopes(["camera_id", "site"])[-1] == "site=n"
    assert v.scopes([]) == [GLOBAL]
    # cam-2's one sample fell out of the global window, not out of its own.
    assert ids(v.labelled(GLOBAL)) == ["p3", "p4"]
    assert ids(v.labelled("camera_id=cam-2")) == ["p1"]
    assert ids(v.labelled("camera_id=cam-1")) == ["p3", "p4"]
    assert ids(v.new_logged("camera_id=cam-3")) == ["p9"] and v.new_logged("site=n") == []


def test_a_segment_rule_measures_its_segments_and_not_global() -> None:
    w = Windows(max_count=10, max_age_s=3600)
    add(w, [outcome(1, 1, camera_id="cam-2", site="n"), outcome(2, 2, camera_id="cam-1")])
    v = view(w, 10)
    cfg = MonitorConfig()  # segments: [camera_id]
    rule = {"metric": "accuracy", "threshold": 0.4}
    per_camera = AlertRule(name="s", scope="segment", **rule)
    per_site = AlertRule(name="t", scope="segment", segment_by=["site"], **rule)
    assert rule_scopes(per_camera, v, cfg) == ["camera_id=cam-1", "camera_id=cam-2"]
    assert rule_scopes(per_site, v, cfg) == ["site=n"]
    # No value of the segment column seen: nothing to measure (the global rule covers it).
    assert rule_scopes(per_camera, v, MonitorConfig(segments=["lane"])) == []
    assert rule_scopes(AlertRule(name="g", **rule), v, cfg) == [GLOBAL]


def test_versions_have_windows_of_their_own() -> None:
    w = Windows(max_count=10, max_age_s=3600)
    add(w, [outcome(1, 1, version=1), outcome(2, 2, version=2)])
    assert ids(view(w, 5, version=2).labelled(GLOBAL)) == ["p2"]
    assert w.versions() == [1, 2]
    w.keep_versions([2])
    assert w.versions() == [2] and view(w, 5, version=1).labelled(GLOBAL) == []


def test_state_round_trip_is_compact_json() -> None:
    w = Windows(max_count=3, max_age_s=3600)
    add(w, [outcome(i, i, camera_id=f"c{i % 2}") for i in range(6)],
        [logged(i, i, camera_id=f"c{i % 2}") for i in range(6)])  # fmt: skip
    state = json.loads(json.dumps(w.to_state()))
    packed = state["versions"]["1"]
    # Each sample once per version, though p3-p5 sit in the global and a camera window
    # (9 window entries); p0-p2 only in their cameras'.
    assert [row[0] for row in packed["labelled"]] == [f"p{i}" for i in range(6)]
    back = Windows.from_state(state, 3, 3600)
    for scope in (GLOBAL, "camera_id=c0", "camera_id=c1"):
        assert view(back, 9).labelled(scope) == view(w, 9).labelled(scope)
        assert ids(view(back, 9).logged(scope)) == ids(view(w, 9).logged(scope))
    lg = view(back, 9).logged(GLOBAL)[0]
    assert lg.probabilities == pytest.approx([0.71235, 0.28765]) and lg.confidence == 0.812346
    assert lg.input_stats == {"brightness": 101.12346}  # numbers only
    assert view(back, 9).new_outcomes(GLOBAL) == []
    assert Windows.from_state({"v": 0}, 3, 60).versions() == []


def test_sizes_for_the_rules() -> None:
    assert sizes_for(MonitorConfig()) == (MIN_COUNT, DEFAULT_MAX_AGE_S)
    rule = {"metric": "accuracy", "threshold": 0.4}
    cfg = MonitorConfig(rules=[AlertRule(name="a", window=900, resolve_window=1200, **rule)])
    assert sizes_for(cfg) == (1200, DEFAULT_MAX_AGE_S)
    timed = MonitorConfig(rules=[
        AlertRule(name="a", window_s=600, **rule),
        AlertRule(name="b", window=50, window_s=1800, **rule),
        AlertRule(name="c", metric="cusum", threshold=9.0),
    ])  # fmt: skip
    assert sizes_for(timed) == (MIN_COUNT, 1800.0)


def test_only_the_newest_drift_windows_keep_probabilities_in_the_state() -> None:
    w = Windows(max_count=6, max_age_s=3600, detail_count=2)
    add(w, [], [logged(i, i, camera_id=f"c{i % 2}") for i in range(8)])
    state = json.loads(json.dumps(w.to_state()))
    back = Windows.from_state(state, 6, 3600, detail_count=2)
    # Newest two per scope: p6, p7 (global), p5, p7 (c1), p4, p6 (c0).
    kept = [lg.prediction_id for lg in view(back, 9).logged(GLOBAL) if lg.probabilities]
    assert kept == ["p4", "p5", "p6", "p7"]
    assert all(lg.input_stats is None for lg in view(back, 9).logged(GLOBAL, count=6)[:2])
    # Predicted label and confidence stay for every sample (estimates, prediction drift).
    assert [lg.confidence for lg in view(back, 9).logged(GLOBAL)] == [0.812346] * 6
    assert [lg.predicted for lg in view(back, 9).logged("camera_id=c0")] == ["car"] * 4
    assert view(back, 9).logged("camera_id=c0")[0].segments == {"camera_id": "c0"}
    none = Windows(max_count=6, max_age_s=3600, detail_count=0)
    add(none, [], [logged(1, 1)])
    assert all(len(row) == 5 for row in none.to_state()["versions"]["1"]["logged"])


def test_detail_for_is_twice_the_largest_window_of_a_rule_reading_details() -> None:
    assert detail_for(MonitorConfig()) == 50  # default drift windows of 25
    rule = {"metric": "accuracy", "threshold": 0.4}
    assert detail_for(MonitorConfig(rules=[AlertRule(name="a", window=900, **rule)])) == 0
    rules = [
        AlertRule(name="p", metric="drift.predictions", threshold=0.0, window=1000),
        AlertRule(name="s", metric="drift.softmax", threshold=0.0, window_s=600),
        AlertRule(name="i", metric="drift.inputs", threshold=0.0, window=60),
    ]
    assert detail_for(MonitorConfig(rules=rules)) == 400  # a time window reads 200 at most
