"""Drift tests against a real reference, over predictions fed through the real Windows:
no false alarm on a stable stream, a real shift found within two windows, a trivial shift
on a large sample left alone by the effect floor, correction across segments."""

from __future__ import annotations

import json
from typing import Any

import pytest
from scipy.stats import false_discovery_control

from loopline.monitor import drift
from loopline.monitor.config import AlertRule, DriftConfig, MonitorConfig
from loopline.monitor.reference import Reference
from loopline.monitor.types import GLOBAL, Measurement
from tests.monitor.synthetic_stream import Stream, make_reference

CONFIG = MonitorConfig()


@pytest.fixture(scope="module")
def reference() -> Reference:
    return make_reference()[1]


def rule(metric: str, window: int = 200, **kw: Any) -> AlertRule:
    return AlertRule(
        name="drift", metric=metric, op=">", threshold=0.0, window=window, min_samples=50, **kw
    )


def one(
    stream: Stream,
    r: AlertRule,
    reference: Reference | None,
    state: dict[str, Any],
    config: MonitorConfig = CONFIG,
) -> Measurement:
    (m,) = drift.measure(r, stream.view(reference), state, config)
    return m


@pytest.mark.parametrize("metric", drift.METRICS)
def test_a_stable_stream_never_alarms(metric: str, reference: Reference) -> None:
    """60 windows (12,000 predictions) from the reference distribution: every window
    tested, none drifting, not even for one window."""
    stream, r = Stream(11), rule(metric)
    state: dict[str, Any] = {}
    values, tested = [], 0
    for _ in range(60):
        stream.add(200)
        m = one(stream, r, reference, state)
        values.append(m.value)
        tested += m.evidence["evaluated"]
        assert not any(c["drifting"] for c in m.evidence["columns"].values()), m.evidence
    assert tested == 60
    assert values == [0.0] * 60
    json.dumps(state)  # the service persists it between passes


def test_a_brightness_shift_is_found_in_the_second_window(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    state: dict[str, Any] = {}
    for _ in range(3):
        stream.add(200)
        assert one(stream, r, reference, state).value == 0.0
    stream.add(200, brightness_shift=-40.0)  # night: two standard deviations darker
    first = one(stream, r, reference, state)
    column = first.evidence["columns"]["brightness"]
    assert first.value == 0.0  # significant and large, but once only
    assert column["drifting"] and column["persistent"] == 1
    assert column["p_adjusted"] < 0.01 and column["effect"] > 0.5
    stream.add(200, brightness_shift=-40.0)
    second = one(stream, r, reference, state)
    assert second.value is not None and second.value > 0.5
    assert second.value == pytest.approx(second.evidence["columns"]["brightness"]["effect"], 1e-3)
    assert second.evidence["drifting"] == ["brightness"]  # the other statistics did not move
    assert second.samples == 200


def test_a_class_share_shift_is_found_in_the_second_window(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.predictions")
    state: dict[str, Any] = {}
    shifted = [0.5, 0.125, 0.125, 0.125, 0.125]
    stream.add(200, shares=shifted)
    first = one(stream, r, reference, state)
    assert first.value == 0.0 and first.evidence["columns"]["predicted"]["persistent"] == 1
    stream.add(200, shares=shifted)
    second = one(stream, r, reference, state)
    column = second.evidence["columns"]["predicted"]
    assert second.value == pytest.approx(column["effect"], abs=1e-4)
    assert column["effect"] >= CONFIG.drift.psi_min and column["p"] < 1e-6
    assert 0.0 < column["cramers_v"] < 1.0


def test_a_less_confident_model_moves_the_softmax(reference: Reference) -> None:
    """Inputs unlike the training data: the model's scores weaken (fog)."""
    stream, r = Stream(3), rule("drift.softmax")
    state: dict[str, Any] = {}
    stream.add(200, strength=1.0)
    assert one(stream, r, reference, state).value == 0.0
    stream.add(200, strength=1.0)
    m = one(stream, r, reference, state)
    assert m.value is not None and m.value > 0.2
    assert len(m.evidence["drifting"]) >= 3 and m.evidence["effect"] == "ks_d"


def test_a_trivial_shift_on_a_large_sample_is_left_alone_by_the_floor(
    reference: Reference,
) -> None:
    """0.15 standard deviations brighter over 20,000 predictions: very significant, a
    tiny effect. Only the floor stands between it and an alarm."""
    r = rule("drift.inputs", window=20_000)
    for floor, flagged in ((0.1, False), (0.0, True)):
        stream = Stream(5, max_count=20_000)
        state: dict[str, Any] = {}
        config = MonitorConfig(drift=DriftConfig(ks_min_effect=floor))
        for _ in range(2):
            stream.add(20_000, brightness_shift=3.0)
            m = one(stream, r, reference, state, config)
        column = m.evidence["columns"]["brightness"]
        assert column["p_adjusted"] < 1e-6 and column["effect"] < 0.1
        assert (m.value is not None and m.value > 0.0) is flagged


def test_a_window_is_tested_once_and_windows_do_not_overlap(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    state: dict[str, Any] = {}
    stream.add(200, brightness_shift=-40.0)
    assert one(stream, r, reference, state).evidence["evaluated"] is True
    # No new predictions, then fewer than a window: the same window is not counted again.
    for extra in (0, 150):
        stream.add(extra, brightness_shift=-40.0)
        again = one(stream, r, reference, state)
        assert again.evidence["evaluated"] is False and again.value == 0.0
        assert again.evidence["columns"]["brightness"]["persistent"] == 1
    stream.add(50, brightness_shift=-40.0)  # now 200 new ones: a disjoint window
    m = one(stream, r, reference, state)
    assert m.evidence["evaluated"] is True and m.value is not None and m.value > 0.5
    assert state["scopes"][GLOBAL]["last"][1] == "p00000400"


def test_the_state_survives_a_round_trip_through_json(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    state: dict[str, Any] = {}
    stream.add(200, brightness_shift=-40.0)
    one(stream, r, reference, state)
    restored = json.loads(json.dumps(state))  # as the service stores it
    stream.add(200, brightness_shift=-40.0)
    m = one(stream, r, reference, restored)
    assert m.value is not None and m.value > 0.5


def test_no_data_without_a_reference_or_below_min_samples(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    state: dict[str, Any] = {}
    stream.add(40)
    below = one(stream, r, reference, state)
    assert below.value is None and below.samples == 40
    stream.add(160)
    none = one(stream, r, None, state)
    assert none.value is None and "monitoring" in none.evidence["reason"]
    assert state["scopes"] == {}  # nothing was tested


def test_a_window_not_yet_full_waits(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    state: dict[str, Any] = {}
    stream.add(120)  # above min_samples, below the window
    m = one(stream, r, reference, state)
    assert m.value is None and "waiting" in m.evidence["reason"]


def test_segments_are_corrected_together(reference: Reference) -> None:
    """Per camera: the dark camera drifts, the other does not, and every p-value is
    adjusted within one family (all scopes, all columns)."""
    stream = Stream(3)
    state: dict[str, Any] = {}
    r = rule("drift.inputs", window=100, scope="segment")
    for _ in range(2):
        stream.add(100, camera="cam-1")
        stream.add(100, camera="cam-2", brightness_shift=-40.0)
        ms = drift.measure(r, stream.view(reference), state, CONFIG)
    by_scope = {m.scope: m for m in ms}
    assert set(by_scope) >= {"camera_id=cam-1", "camera_id=cam-2"}
    assert by_scope["camera_id=cam-1"].value == 0.0
    cam2 = by_scope["camera_id=cam-2"]
    assert (
        cam2.value is not None and cam2.value > 0.5 and cam2.evidence["drifting"] == ["brightness"]
    )
    family = [
        (scope, column, c["p"], c["p_adjusted"])
        for scope, m in by_scope.items()
        for column, c in m.evidence["columns"].items()
    ]
    assert len(family) == 5 * len(by_scope)
    adjusted = false_discovery_control([p for *_, p, _ in family], method="bh")
    for (_, _, _, got), want in zip(family, adjusted, strict=True):
        assert got == pytest.approx(want, rel=1e-3)


def test_an_unknown_drift_metric_is_refused(reference: Reference) -> None:
    from loopline.errors import ConfigError

    r = rule("estimated_accuracy")
    with pytest.raises(ConfigError, match="unknown drift metric"):
        drift.measure(r, Stream(1).view(reference), {}, CONFIG)
