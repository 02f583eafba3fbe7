"""The simulation behind ``benchmarks/loop_bench.py`` on a tiny stream, so the benchmark
cannot rot unnoticed: the real monitor on a real SQLite store fires the accuracy alert
after the drift onset and nothing before it, and the figures count from the onset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import loop_sim  # noqa: E402

TINY = loop_sim.Scenario(
    p_before=0.9, p_after=0.2, onset=(100, 130), max_after=150, pass_every=10,
    val_size=500, pool=60, input_size=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> loop_sim.Simulation:
    loop_sim.quiet()
    return loop_sim.Simulation.create(tmp_path_factory.mktemp("loop-sim"), TINY)


def test_the_stand_in_model_has_the_accuracy_asked_for() -> None:
    import numpy as np

    for target, bias in ((0.9, 0.0), (0.3, 1.0)):
        model = loop_sim.calibrated(target, bias)
        logits, y = model.draw(np.random.default_rng(3), 20_000)
        assert abs(float((logits.argmax(axis=1) == y).mean()) - target) < 0.015


def test_the_accuracy_alert_fires_after_the_onset_and_not_before(
    sim: loop_sim.Simulation,
) -> None:
    assert 0.85 < sim.reference_accuracy < 0.95  # the reference came from the bundle
    results = [loop_sim.detection_run(sim, seed) for seed in (1, 2)]
    for r in results:
        assert r.errors == []
        assert r.before_onset == [], r.before_onset
        fired = r.first([loop_sim.ACCURACY_RULE])
        assert fired is not None, r.fired
        # 30 labels at least (min_samples), and all of them after the onset at accuracy 0.2
        assert 0 < fired.labelled_after <= fired.logged_after <= TINY.max_after
        assert fired.value is not None and fired.value < 0.40
    d = loop_sim.delays(results)
    assert d["accuracy_alert"].missed == 0
    assert 0 < d["accuracy_alert"].median <= TINY.max_after
    assert d["cusum_warning"].median < d["accuracy_alert"].median  # the early warning


def test_no_drift_no_alert(sim: loop_sim.Simulation) -> None:
    r = loop_sim.stable_run(sim, 5, 200, 25)
    assert r.errors == [] and r.passes == 8
    assert r.fired == []


def test_a_seed_that_never_fires_counts_as_infinitely_late() -> None:
    d = loop_sim.Delays([10, None, 30])
    assert d.missed == 1
    assert d.median == 30
    assert d.quantile(0.95) == float("inf")
    assert loop_sim.Delays([10, 20, 30]).quantile(0.5) == 20
