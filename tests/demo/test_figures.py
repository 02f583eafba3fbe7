"""The demo's figures from known frames: rolling accuracy, alert delays, recovery."""

from __future__ import annotations

import pytest

from loopline.demo.figures import after_onset, figures, per_version, rolling, serving_all_since
from tests.demo.helpers import frames, story


def test_rolling_accuracy_over_the_last_window_labelled_frames() -> None:
    samples = frames(0.0, 20, every=1.0, version=1, right_every=1)
    samples += frames(20.0, 20, every=1.0, version=1, right_every=0, first_id=20)
    series = rolling(samples, window=10, least=10)
    assert series[0] == (9.0, 1.0)
    assert dict(series)[24.0] == pytest.approx(0.5)  # 5 right (15..19), 5 wrong (20..24)
    assert series[-1] == (39.0, 0.0)
    # Unlabelled frames are not in it; nothing until `least` are labelled.
    samples[5].labelled_t = None
    assert len(rolling(samples, window=10, least=10)) == len(series) - 1


def test_labelled_after_onset_counts_labels_posted_by_then() -> None:
    samples, _, onset = story()
    # By 36 s: frames from 30 s to 36 s were sent (61), those sent by 34 s labelled (41).
    assert after_onset(samples, onset, 36.0) == (61, 41)


def test_the_new_version_serves_all_from_its_first_answer_after_the_last_old_one() -> None:
    samples, _, _ = story()
    assert serving_all_since(samples, 2) == pytest.approx(70.0)
    assert serving_all_since(samples, 1) is None  # v2 answers after v1's last
    mixed = samples + frames(200.0, 1, every=1.0, version=1, right_every=1, first_id=9999)
    assert serving_all_since(mixed, 2) is None


def test_figures_of_a_run_that_recovered() -> None:
    samples, events, onset = story()
    figs = figures(samples, events, onset=onset, window=50, new_version=2)
    acc = figs["accuracy"]
    assert acc["before_drift"] == 1.0 and acc["before_drift_labelled"] == 300
    assert acc["lowest"] == pytest.approx(0.24, abs=0.02)  # one in four right
    assert acc["after_recovery"] == 1.0 and acc["after_recovery_labelled"] == 300
    assert acc["recovered"] is True
    assert figs["alert_at"] == {
        "seconds": 6.0,
        "labelled": 41,
        "predictions": 61,
        "t": 36.0,
        "rule": "accuracy-low",
        "metric": "accuracy",
        "alert_id": 2,
        "version": 1,
    }
    assert figs["drift_warning_at"]["labelled"] == 6 and figs["drift_warning_at"]["seconds"] == 2.5
    assert figs["alert_to_new_version_serving_all_s"] == pytest.approx(34.0)


def test_a_run_that_did_not_recover_says_so() -> None:
    samples, events, onset = story()
    worse = [s for s in samples if s.version == 1]
    worse += frames(70.0, 300, every=0.1, version=2, right_every=2, condition="fog", first_id=700)
    figs = figures(worse, events, onset=onset, window=50, new_version=2)
    assert figs["accuracy"]["after_recovery"] == pytest.approx(0.5)
    assert figs["accuracy"]["recovered"] is False
    none = figures(samples[:300], [], onset=onset, window=50, new_version=None)
    assert none["alert_at"] is None and none["accuracy"]["after_recovery"] is None
    assert none["accuracy"]["recovered"] is False


def test_per_version_accuracy_by_condition() -> None:
    samples, _, _ = story()
    table = per_version(samples)
    assert table[1]["by_condition"]["day"] == {"labelled": 300, "accuracy": 1.0}
    assert table[1]["by_condition"]["fog"]["accuracy"] == pytest.approx(0.25)
    assert table[2]["answers"] == 300 and table[2]["accuracy"] == 1.0
