"""Drift tests against a real reference, over predictions fed through the real Windows.

Every evaluation tests the newest ``persistence`` adjacent windows: no false flag on long
stable streams evaluated every few predictions, a real shift flagged within 50
predictions of its onset whatever the pass size, a trivial shift on a large sample left
alone by the effect floor, correction per window across segments, nothing carried
between passes."""

from __future__ import annotations

import json
import statistics
from typing import Any

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from loopline.monitor import drift
from loopline.monitor.config import AlertRule, DriftConfig, MonitorConfig
from loopline.monitor.reference import Reference
from loopline.monitor.types import GLOBAL, Measurement
from tests.monitor.synthetic_stream import Stream, make_reference

CONFIG = MonitorConfig()
ONE_CLASS = [0.9, 0.025, 0.025, 0.025, 0.025]  # a model in the dark calls most things one class
# One shift per metric: night (two standard deviations darker), the class shares, and the
# softmax columns moved by the same one-class bias.
SHIFTS: dict[str, dict[str, Any]] = {
    "drift.inputs": {"brightness_shift": -40.0},
    "drift.predictions": {"shares": ONE_CLASS},
    "drift.softmax": {"shares": ONE_CLASS},
}


@pytest.fixture(scope="module")
def reference() -> Reference:
    return make_reference()[1]


def rule(metric: str, window: int = 200, min_samples: int = 50, **kw: Any) -> AlertRule:
    return AlertRule(
        name="drift", metric=metric, op=">", threshold=0.0, window=window,
        min_samples=min_samples, **kw,
    )  # fmt: skip


def default_shape(metric: str) -> AlertRule:
    """The default drift rules' windows: 25 predictions, at least 25."""
    return rule(metric, window=25, min_samples=25)


def one(
    stream: Stream,
    r: AlertRule,
    reference: Reference | None,
    state: dict[str, Any] | None = None,
    config: MonitorConfig = CONFIG,
) -> Measurement:
    (m,) = drift.measure(r, stream.view(reference), {} if state is None else state, config)
    return m


def test_stable_streams_evaluated_every_5_never_flag(reference: Reference) -> None:
    """10,000 predictions from the reference distributions, every metric evaluated after
    every 5 (2,000 overlapping evaluations each): not one drifting column."""
    stream = Stream(11, max_count=100)
    rules = {metric: default_shape(metric) for metric in drift.METRICS}
    flags = {metric: 0 for metric in drift.METRICS}
    windows_flagged = 0  # single windows may be significant; both at once must not be
    for _ in range(2000):
        stream.add(5)
        for metric, r in rules.items():
            m = one(stream, r, reference)
            if stream.count < 50:
                assert m.value is None
                continue
            assert m.value is not None
            flags[metric] += m.value > 0.0 or bool(m.evidence["drifting"])
            windows_flagged += sum(any(c["flagged"]) for c in m.evidence["columns"].values())
    assert flags == {metric: 0 for metric in drift.METRICS}
    assert windows_flagged <= 20


def _delay(
    stream: Stream,
    r: AlertRule,
    reference: Reference,
    shift: dict[str, Any],
    steps: list[int],
    state: dict[str, Any],
) -> int | None:
    """Predictions after the onset when the first evaluation flags (None: never); the
    rule's state carried from pass to pass as the service does."""
    after = 0
    for n in steps:
        stream.add(n, **shift)
        after += n
        m = one(stream, r, reference, state)
        if m.value is not None and m.value > 0.0:
            return after
    return None


@pytest.mark.parametrize("metric", drift.METRICS)
def test_a_shift_is_flagged_within_50_predictions_when_evaluated_every_5(
    metric: str, reference: Reference
) -> None:
    r = default_shape(metric)
    delays = []
    for seed in range(20):
        stream, state = Stream(100 + seed), dict[str, Any]()
        onset = int(np.random.default_rng(seed).integers(20, 60)) * 5
        for _ in range(onset // 5):
            stream.add(5)
            assert not one(stream, r, reference, state).value  # nothing before the onset
        delays.append(_delay(stream, r, reference, SHIFTS[metric], [5] * 30, state))
    assert None not in delays, delays
    assert statistics.median(d for d in delays if d is not None) <= 50, delays
    if metric == "drift.inputs":  # the strongest shift: every seed by onset + 50
        assert max(d for d in delays if d is not None) <= 50, delays


@pytest.mark.parametrize("metric", drift.METRICS)
def test_a_shift_is_flagged_once_45_predictions_followed_it_at_40_a_pass(
    metric: str, reference: Reference
) -> None:
    """A pass brings 40 predictions (40 frames/s, a pass a second): the shift is flagged
    at the latest by the first evaluation with at least 45 predictions after the onset,
    not a whole pass later."""
    r = default_shape(metric)
    delays, due = [], []
    for seed in range(20):
        stream, state = Stream(200 + seed), dict[str, Any]()
        for _ in range(5):
            stream.add(40)
            one(stream, r, reference, state)
        first = seed + 1  # the onset falls anywhere between two evaluations
        steps = [first] + [40] * 6
        ends = np.cumsum(steps)
        due.append(int(ends[ends >= 45][0]))
        delays.append(_delay(stream, r, reference, SHIFTS[metric], steps, state))
    on_time = [d is not None and d <= e for d, e in zip(delays, due, strict=True)]
    if metric == "drift.inputs":
        assert all(on_time), (delays, due)
    else:  # smaller effects at 25 predictions a window: most seeds, never a pass late
        assert sum(on_time) >= 16, (delays, due)
        assert all(d is not None and d <= e + 40 for d, e in zip(delays, due, strict=True))
        assert statistics.median(d for d in delays if d is not None) <= 60


def test_the_windows_are_the_newest_adjacent_ones_and_every_one_must_drift(
    reference: Reference,
) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    stream.add(400)
    m = one(stream, r, reference)
    assert m.value == 0.0 and m.samples == 400
    assert [w["samples"] for w in m.evidence["windows"]] == [200, 200]
    assert m.evidence["windows"][0]["from"] < m.evidence["windows"][1]["from"]
    stream.add(200, brightness_shift=-40.0)  # only the newest window is dark
    m = one(stream, r, reference)
    column = m.evidence["columns"]["brightness"]
    assert column["flagged"] == [False, True] and not column["drifting"]
    assert m.value == 0.0
    assert len(column["p"]) == len(column["p_adjusted"]) == len(column["effect"]) == 2
    stream.add(50, brightness_shift=-40.0)  # 50 more: both windows moved by 50
    m = one(stream, r, reference)
    assert (
        m.evidence["windows"][0]["from"]
        == stream.view(reference).logged(GLOBAL)[-400].at.isoformat()
    )
    column = m.evidence["columns"]["brightness"]
    # A quarter of the older window is dark: flagged too, with the smaller effect.
    assert column["flagged"] == [True, True] and column["effect"][0] < column["effect"][1]
    assert m.value == pytest.approx(column["effect"][0], abs=1e-4)
    stream.add(150, brightness_shift=-40.0)  # now both windows are dark
    m = one(stream, r, reference)
    column = m.evidence["columns"]["brightness"]
    assert column["flagged"] == [True, True] and column["drifting"]
    assert m.evidence["drifting"] == ["brightness"]  # the other statistics did not move
    assert m.value == pytest.approx(min(column["effect"]), abs=1e-4) and (m.value or 0) > 0.5
    assert min(column["p_adjusted"]) < 1e-6
    json.dumps(m.evidence)


def test_persistence_sets_how_many_windows(reference: Reference) -> None:
    config = MonitorConfig(drift=DriftConfig(persistence=3))
    stream, r = Stream(3), rule("drift.inputs", window=100)
    stream.add(250)
    waiting = one(stream, r, reference, config=config)
    assert waiting.value is None and "3 windows of 100" in waiting.evidence["reason"]
    stream.add(50)
    stream.add(200, brightness_shift=-40.0)
    m = one(stream, r, reference, config=config)
    assert m.evidence["columns"]["brightness"]["flagged"] == [False, True, True]
    assert m.value == 0.0
    stream.add(100, brightness_shift=-40.0)
    assert (one(stream, r, reference, config=config).value or 0.0) > 0.5


def test_a_class_share_shift_reports_psi_and_cramers_v(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.predictions")
    stream.add(400, shares=[0.5, 0.125, 0.125, 0.125, 0.125])
    m = one(stream, r, reference)
    column = m.evidence["columns"]["predicted"]
    assert column["drifting"] and m.evidence["effect"] == "psi"
    assert m.value == pytest.approx(min(column["effect"]), abs=1e-4)
    assert all(e >= CONFIG.drift.psi_min for e in column["effect"])
    assert all(p < 1e-6 for p in column["p"])
    assert all(0.0 < v < 1.0 for v in column["cramers_v"])


def test_a_trivial_shift_on_a_large_sample_is_left_alone_by_the_floor(
    reference: Reference,
) -> None:
    """0.15 standard deviations brighter over two windows of 10,000: very significant, a
    tiny effect. Only the floor stands between it and an alarm."""
    r = rule("drift.inputs", window=10_000)
    stream = Stream(5, max_count=20_000)
    stream.add(20_000, brightness_shift=3.0)
    for floor, flagged in ((0.1, False), (0.0, True)):
        config = MonitorConfig(drift=DriftConfig(ks_min_effect=floor))
        m = one(stream, r, reference, config=config)
        column = m.evidence["columns"]["brightness"]
        assert max(column["p_adjusted"]) < 1e-6 and max(column["effect"]) < 0.1
        assert (m.value is not None and m.value > 0.0) is flagged


def test_time_windows_are_adjacent_slices_of_window_s(reference: Reference) -> None:
    stream = Stream(3)  # one prediction a second
    r = AlertRule(name="drift", metric="drift.inputs", op=">", threshold=0.0, window_s=100,
                  min_samples=50)  # fmt: skip
    stream.add(120)
    m = one(stream, r, reference)
    assert m.value is None and "2 slices of 100 s" in m.evidence["reason"]
    stream.add(80)
    stream.add(100, brightness_shift=-40.0)
    m = one(stream, r, reference)
    assert [w["samples"] for w in m.evidence["windows"]] == [100, 100]
    assert m.evidence["columns"]["brightness"]["flagged"] == [False, True]
    stream.add(100, brightness_shift=-40.0)
    assert (one(stream, r, reference).value or 0.0) > 0.5


def test_nothing_is_carried_and_an_old_state_is_dropped(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    stream.add(400, brightness_shift=-40.0)
    old = {  # what the previous release kept: persistence counters per scope
        "scopes": {
            GLOBAL: {
                "last": ["2025-01-01T00:05:00+00:00", "p00000300"],
                "streak": {"brightness": 1},
                "p": {"brightness": 1e-9},
                "value": 0.0,
                "samples": 200,
                "evidence": {"evaluated": True},
            }
        }
    }
    with_old = one(stream, r, reference, old)
    assert old == {}
    fresh = one(stream, r, reference, {})
    assert with_old.value == fresh.value and with_old.value is not None and with_old.value > 0.5
    assert with_old.evidence == fresh.evidence


def test_no_data_without_a_reference_or_until_the_windows_are_full(
    reference: Reference,
) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    stream.add(40)
    below = one(stream, r, reference)
    assert (
        below.value is None and below.samples == 40 and "fewer than 50" in below.evidence["reason"]
    )
    stream.add(350)  # above min_samples, 10 short of two windows of 200
    waiting = one(stream, r, reference)
    assert waiting.value is None and waiting.samples == 390
    assert waiting.evidence["reason"] == "waiting for 2 windows of 200 predictions (390 logged)"
    stream.add(10)
    none = one(stream, r, None)
    assert none.value is None and "monitoring" in none.evidence["reason"]


def test_a_value_comes_once_every_window_is_full(reference: Reference) -> None:
    stream, r = Stream(3), rule("drift.inputs")
    stream.add(399)
    assert one(stream, r, reference).value is None
    stream.add(1)
    assert one(stream, r, reference).value == 0.0


def test_segments_are_corrected_together_per_window(reference: Reference) -> None:
    """Per camera: the dark camera drifts, the other does not, and each window's p-values
    are adjusted within one family (all scopes, all columns of that window)."""
    stream = Stream(3)
    r = rule("drift.inputs", window=100, scope="segment")
    for _ in range(2):
        stream.add(100, camera="cam-1")
        stream.add(100, camera="cam-2", brightness_shift=-40.0)
    ms = drift.measure(r, stream.view(reference), {}, CONFIG)
    by_scope = {m.scope: m for m in ms}
    assert set(by_scope) >= {"camera_id=cam-1", "camera_id=cam-2"}
    assert by_scope["camera_id=cam-1"].value == 0.0
    cam2 = by_scope["camera_id=cam-2"]
    assert cam2.value is not None and cam2.value > 0.5
    assert cam2.evidence["drifting"] == ["brightness"]
    assert cam2.evidence["correction"] == drift.CORRECTION
    for i in range(CONFIG.drift.persistence):
        family = [
            (c["p"][i], c["p_adjusted"][i])
            for m in by_scope.values()
            for c in m.evidence["columns"].values()
        ]
        assert len(family) == 5 * len(by_scope)
        adjusted = false_discovery_control([p for p, _ in family], method="bh")
        for (_, got), want in zip(family, adjusted, strict=True):
            assert got == pytest.approx(want, rel=1e-3)


def test_an_unknown_drift_metric_is_refused(reference: Reference) -> None:
    from loopline.errors import ConfigError

    r = rule("estimated_accuracy")
    with pytest.raises(ConfigError, match="unknown drift metric"):
        drift.measure(r, Stream(1).view(reference), {}, CONFIG)
