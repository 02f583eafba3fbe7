"""The Bernoulli CUSUM: its increments, false-alarm rate and detection delay (seeded), its
threshold from a target run length, and ``measure`` over a version view.

The view here is a small stand-in for the stream's ``VersionView`` (only what
``cusum.measure`` reads); the registry it reads p0 from is a real store.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor import cusum
from loopline.monitor.config import AlertRule, MonitorConfig
from loopline.monitor.cusum import BernoulliCusum, average_run_length, threshold_for
from loopline.monitor.types import GLOBAL, Logged, Outcome

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RULE = AlertRule(name="accuracy-collapse", metric="cusum", op=">", threshold=9.2, min_samples=1)


@dataclass
class Ref:
    accuracy: float
    n: int | None = None


@dataclass
class View:
    """The part of a VersionView that ``cusum.measure`` reads."""

    store: MetadataStore
    reference: Any = None
    environment: str = "production"
    model_name: str = "vehicles"
    model_version: int = 1
    now: datetime = NOW
    new: dict[str, list[Outcome]] = field(default_factory=dict)

    def scopes(self, segment_by: list[str]) -> list[str]:
        return sorted(s for s in self.new if s != GLOBAL)

    def new_outcomes(self, scope: str) -> list[Outcome]:
        return self.new.get(scope, [])

    def labelled(
        self, scope: str, count: int | None = None, seconds: float | None = None
    ) -> list[Outcome]:
        return []

    def logged(
        self, scope: str, count: int | None = None, seconds: float | None = None
    ) -> list[Logged]:
        return []

    def new_logged(self, scope: str) -> list[Logged]:
        return []


def outcomes(pattern: str) -> list[Outcome]:
    """``"1101"``: right, right, wrong, right."""
    return [
        Outcome(f"p{i}", NOW, NOW, 1, None, "car", "car" if c == "1" else "bus", 0.9)
        for i, c in enumerate(pattern)
    ]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = MetadataStore(f"sqlite:///{tmp_path / 'loopline.db'}")
    yield s
    s.close()


def test_increments_are_the_log_likelihood_ratios() -> None:
    c = BernoulliCusum(0.9, 0.4, 9.2)
    assert c.wrong_step == pytest.approx(math.log(0.6 / 0.1)) == pytest.approx(1.792, abs=1e-3)
    assert c.right_step == pytest.approx(math.log(0.4 / 0.9)) == pytest.approx(-0.811, abs=1e-3)
    assert not c.update(True) and c.statistic == 0.0  # floored at 0
    for _ in range(5):
        c.update(False)
    assert c.statistic == pytest.approx(5 * 1.7918, abs=1e-3) and not c.alarm  # 8.96 < 9.2
    assert c.update(False) and c.alarm and c.n == 7
    for _ in range(20):
        c.update(False)
    assert c.statistic == 2 * 9.2  # capped, so it comes back under h soon after a recovery
    back = BernoulliCusum.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    with pytest.raises(ValueError, match="0 < p1 < p0 < 1"):
        BernoulliCusum(0.4, 0.4, 9.2)


def test_no_false_alarm_over_ten_thousand_stable_labels() -> None:
    rng = np.random.default_rng(8)
    c = BernoulliCusum(0.9, 0.4, 9.2)
    alarms = 0
    for correct in rng.random(10_000) < 0.90:
        if c.update(bool(correct)):
            alarms += 1
            c.statistic = 0.0  # count each crossing once
    assert alarms == 0  # the issue: no false alarm over 10,000 labels at 0.90 (ARL ~55,000)


def test_detects_a_collapse_to_035_within_twenty_labels() -> None:
    rng = np.random.default_rng(35)
    delays = []
    for _ in range(200):
        c = BernoulliCusum(0.9, 0.4, 9.2)
        for correct in rng.random(300) < 0.90:  # a stable stream first
            c.update(bool(correct))
        n = 0
        while True:
            n += 1
            if c.update(bool(rng.random() < 0.35)):
                break
        delays.append(n)
    assert statistics.median(delays) <= 20
    assert statistics.median(delays) <= 12  # ~11 on average (FIELD-NOTES)


def test_threshold_for_a_run_length() -> None:
    assert average_run_length(0.9, 0.4, 9.2, 0.9) == pytest.approx(55_000, rel=0.15)
    assert average_run_length(0.9, 0.4, 9.2, 0.35) == pytest.approx(11, abs=1.5)
    assert threshold_for(0.9, 0.4, 55_000) == pytest.approx(9.2, abs=0.3)
    assert threshold_for(0.9, 0.4, 1_000) < threshold_for(0.9, 0.4, 100_000)


def test_measure_feeds_new_labels_and_keeps_state(store: MetadataStore) -> None:
    config = MonitorConfig()
    state: dict[str, Any] = {}
    view = View(store, reference=Ref(0.9), new={GLOBAL: outcomes("1111")})
    (first,) = cusum.measure(RULE, view, state, config)
    assert (first.scope, first.value, first.samples) == (GLOBAL, 0.0, 4)
    assert first.evidence["p0"] == 0.9 and first.evidence["p0_source"] == "reference"

    view.new = {GLOBAL: outcomes("000000")}  # six wrong: 10.75 > 9.2
    state = json.loads(json.dumps(state))  # the service persists it as JSON
    (second,) = cusum.measure(RULE, view, state, config)
    assert second.value == pytest.approx(6 * 1.7918, abs=1e-3) and second.samples == 10
    assert second.evidence["new_wrong"] == 6

    # Labels that take it back under h within one pass: the value is the peak, the
    # resolve value where it ends.
    view.new = {GLOBAL: outcomes("0111")}
    (third,) = cusum.measure(RULE, view, state, config)
    assert third.value == pytest.approx(7 * 1.7918, abs=1e-3)
    assert third.evidence["resolve_value"] == pytest.approx(7 * 1.7918 - 3 * 0.8109, abs=1e-3)
    view.new = {}
    (fourth,) = cusum.measure(RULE, view, state, config)  # no new labels: where it is
    assert fourth.value == pytest.approx(third.evidence["resolve_value"])


def test_measure_p0_from_the_registry_then_default(store: MetadataStore) -> None:
    store.models.register("vehicles", bundle_uri="/b", bundle_sha256="a" * 64,
                          metrics={"accuracy": 0.8}, aliases=())  # fmt: skip
    config = MonitorConfig()
    (m,) = cusum.measure(RULE, View(store, new={GLOBAL: outcomes("0")}), {}, config)
    assert m.evidence["p0"] == 0.8 and m.evidence["p0_source"] == "registry"
    assert m.value == pytest.approx(math.log(0.6 / 0.2))
    (m,) = cusum.measure(RULE, View(store, model_version=7, new={GLOBAL: outcomes("0")}), {},
                         config)  # fmt: skip
    assert m.evidence["p0"] == 0.9 and m.evidence["p0_source"] == "default"


def test_measure_restarts_when_p0_changes(store: MetadataStore) -> None:
    state: dict[str, Any] = {}
    view = View(store, reference=Ref(0.9), new={GLOBAL: outcomes("000")})
    cusum.measure(RULE, view, state, MonitorConfig())
    view.reference, view.new = Ref(0.95), {GLOBAL: outcomes("1")}
    (m,) = cusum.measure(RULE, view, state, MonitorConfig())
    assert m.value == 0.0 and m.samples == 1


def test_measure_no_data_and_nothing_to_detect(store: MetadataStore) -> None:
    config = MonitorConfig()
    rule = RULE.model_copy(update={"min_samples": 5})
    (m,) = cusum.measure(rule, View(store, reference=Ref(0.9), new={GLOBAL: outcomes("00")}),
                         {}, config)  # fmt: skip
    assert m.value is None and m.samples == 2
    high = RULE.model_copy(update={"cusum_p1": 0.95})  # p0 is never above 0.95
    (m,) = cusum.measure(high, View(store, reference=Ref(0.999), new={GLOBAL: outcomes("0")}),
                         {}, config)  # fmt: skip
    assert m.value is None and "not below p0" in m.evidence["why"]


def test_p0_is_smoothed_and_clamped(store: MetadataStore) -> None:
    assert cusum.smoothed_p0(0.9, 10, 0.4) == pytest.approx(10 / 12)
    assert cusum.smoothed_p0(0.9, 1000, 0.4) == pytest.approx(901 / 1002)
    assert cusum.smoothed_p0(1.0, None, 0.4) == 0.95  # no n: clamped only
    assert cusum.smoothed_p0(1.0, 100, 0.4) == 0.95  # 101/102 is above the cap
    assert cusum.smoothed_p0(0.0, 200, 0.4) == pytest.approx(0.45)  # p1 + 0.05
    assert cusum.smoothed_p0(0.42, None, 0.4) == pytest.approx(0.45)


@pytest.mark.parametrize("accuracy", [1.0, 0.0])
def test_a_perfect_or_null_validation_accuracy_still_detects(
    store: MetadataStore, accuracy: float
) -> None:
    """A small demo model scores 1.0 on its validation split: wrong labels in a row must
    cross h, not leave the rule silent (value None). At 0.0, p0 is p1 + 0.05 (a wrong label
    adds log(0.6 / 0.55) ~ 0.087): it takes ~106 of them."""
    wrong = "0" * 120
    state: dict[str, Any] = {}
    view = View(store, reference=Ref(accuracy, n=200), new={GLOBAL: outcomes(wrong)})
    (m,) = cusum.measure(RULE, view, state, MonitorConfig())
    assert m.value is not None and m.value > RULE.threshold
    assert 0.45 <= m.evidence["p0"] <= 0.95 and m.evidence["p0_source"] == "reference"
    # The registered accuracy alone (an imported model's, with per-class supports or not).
    support = {"car": {"support": 100}, "bus": {"support": 100}}
    for version, metrics in ((1, {"accuracy": accuracy, "per_class": support}),
                             (2, {"accuracy": accuracy})):  # fmt: skip
        store.models.register("vehicles", bundle_uri="/b", bundle_sha256=f"{version}" * 64,
                              metrics=metrics, aliases=())  # fmt: skip
        view = View(store, model_version=version, new={GLOBAL: outcomes(wrong)})
        (m,) = cusum.measure(RULE, view, {}, MonitorConfig())
        assert m.evidence["p0_source"] == "registry"
        assert m.value is not None and m.value > RULE.threshold
    assert m.evidence["p0"] == (0.95 if accuracy == 1.0 else 0.45)


def test_measure_per_segment(store: MetadataStore) -> None:
    rule = RULE.model_copy(update={"scope": "segment"})
    view = View(store, reference=Ref(0.9),
                new={"camera_id=a": outcomes("000000"), "camera_id=b": outcomes("11")})  # fmt: skip
    state: dict[str, Any] = {}
    got = {m.scope: m for m in cusum.measure(rule, view, state, MonitorConfig())}
    assert set(got) == {"camera_id=a", "camera_id=b"}
    assert got["camera_id=a"].value > 9.2 and got["camera_id=b"].value == 0.0  # type: ignore[operator]
    assert set(state["scopes"]) == {"camera_id=a", "camera_id=b"}
