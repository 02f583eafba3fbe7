"""The label-free accuracy estimate: calibrated on a validation split, it lands near the
realised accuracy on in-distribution predictions where the raw confidence does not; it
overrates a model under shift, and the gap says so once labels come."""

from __future__ import annotations

import pytest

from loopline.monitor import estimate
from loopline.monitor.config import AlertRule, MonitorConfig
from loopline.monitor.reference import Reference
from tests.monitor.synthetic_stream import Stream, make_reference

CONFIG = MonitorConfig()


@pytest.fixture(scope="module")
def reference() -> Reference:
    return make_reference()[1]


def rule(window: int = 2000, **kw: object) -> AlertRule:
    return AlertRule(
        name="est", metric="estimated_accuracy", threshold=0.6, window=window, min_samples=50, **kw
    )


def test_the_estimate_is_close_to_realised_accuracy_in_distribution(
    reference: Reference,
) -> None:
    stream = Stream(1, max_count=3000)
    _, outcomes = stream.add(2000, labelled=True)
    (m,) = estimate.measure(rule(), stream.view(reference), {}, CONFIG)
    realised = sum(o.correct for o in outcomes) / len(outcomes)
    assert m.value is not None and m.samples == 2000
    assert m.value == pytest.approx(realised, abs=0.02)
    # The raw confidence overrates this model: calibration is what brings it close.
    assert m.evidence["mean_confidence"] - realised > 0.05
    gap = m.evidence["gap"]
    assert gap["labelled"] == 2000
    assert gap["realised_accuracy"] == pytest.approx(realised, abs=1e-4)
    assert gap["gap"] == pytest.approx(realised - m.value, abs=1e-3)


def test_the_estimate_falls_with_a_weaker_model_and_the_gap_shows_the_overrating(
    reference: Reference,
) -> None:
    stream = Stream(2, max_count=3000)
    _, outcomes = stream.add(1000, strength=0.8, labelled=True)
    (m,) = estimate.measure(rule(window=1000), stream.view(reference), {}, CONFIG)
    realised = sum(o.correct for o in outcomes) / len(outcomes)
    assert m.value is not None and m.value < reference.accuracy - 0.1  # a drop, label-free
    assert m.evidence["gap"]["gap"] < 0  # confident on unfamiliar inputs: overrated
    assert m.evidence["gap"]["gap"] == pytest.approx(realised - m.value, abs=1e-3)


def test_no_gap_before_labels_and_no_data_below_min_samples(reference: Reference) -> None:
    stream = Stream(3)
    stream.add(40)
    (few,) = estimate.measure(rule(window=100), stream.view(reference), {}, CONFIG)
    assert few.value is None and few.samples == 40
    stream.add(60)
    (m,) = estimate.measure(rule(window=100), stream.view(reference), {}, CONFIG)
    assert m.value is not None and "gap" not in m.evidence
    assert estimate.estimate_gap(stream.view(reference), "global", 100) is None


def test_no_reference_is_no_data(reference: Reference) -> None:
    stream = Stream(3)
    stream.add(100, labelled=True)
    (m,) = estimate.measure(rule(window=100), stream.view(None), {}, CONFIG)
    assert m.value is None and "monitoring.json" in m.evidence["reason"]


def test_one_estimate_per_segment(reference: Reference) -> None:
    stream = Stream(4)
    stream.add(100, camera="cam-1")
    stream.add(100, camera="cam-2", strength=0.5)
    ms = estimate.measure(rule(window=100, scope="segment"), stream.view(reference), {}, CONFIG)
    by_scope = {m.scope: m.value for m in ms}
    cam1, cam2 = by_scope["camera_id=cam-1"], by_scope["camera_id=cam-2"]
    assert cam1 is not None and cam2 is not None and cam2 < cam1 - 0.1
    assert all(m.window == "last 100" for m in ms)
