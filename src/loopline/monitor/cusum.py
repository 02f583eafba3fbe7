"""The sequential early warning: a Bernoulli CUSUM on the labelled stream.

Each label adds the log-likelihood ratio of "accuracy p1" against "accuracy p0" to the
statistic, floored at 0: ``log((1-p1)/(1-p0))`` for a wrong prediction (≈ +1.79 for
p0 = 0.90, p1 = 0.40) and ``log(p1/p0)`` for a right one (≈ -0.81). It crosses ``h``
(9.2 there: a false alarm every ~55,000 labels at 0.90, detection in ~11 labels at 0.35;
the default rule uses 12: one every ~850,000, detection in ~14)
within a couple of dozen labels of a collapse, long before a window of 50 can say so.

p0 is the version's own accuracy: its reference (validation) accuracy, else the accuracy
registered with it, else 0.9. A validation accuracy of exactly 1.0 (or 0.0) would make a
step infinite (or the CUSUM undefined), so p0 is Laplace-smoothed, ``(k + 1) / (n + 2)`` for
``k`` right of ``n`` validation images (the registry's per-class supports give ``n``), and
clamped to ``[p1 + 0.05, 0.95]`` (also when ``n`` is unknown). The cap keeps one wrong
label from weighing more than ``log(0.6 / 0.05)`` ≈ 2.5: with p0 near 1, two wrong labels
in a row would cross ``h`` on a model that is right 97% of the time. A collapse to 0.35
is still found in ~7 labels on average (each wrong label weighs more than at p0 = 0.90).

The statistic is not reset when it crosses ``h``: the rule (``cusum > h``) fires, and the
lifecycle resolves it once the statistic falls back under the resolve threshold. So that
this happens soon after accuracy recovers, the statistic is capped (by default at ``2 h``);
the cap is above ``h`` and changes neither the false-alarm rate nor the detection delay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loopline.errors import LooplineError
from loopline.monitor.types import Measurement
from loopline.monitor.windows import rule_scopes

if TYPE_CHECKING:
    from loopline.monitor.config import AlertRule, MonitorConfig
    from loopline.monitor.types import VersionView

DEFAULT_P0 = 0.9
P0_MAX = 0.95  # p0 never above: a wrong label adds at most log((1 - p1) / 0.05)
P0_MARGIN = 0.05  # p0 at least p1 + this: a drop of less says nothing


@dataclass
class BernoulliCusum:
    """A one-sided Bernoulli CUSUM for a drop of accuracy from ``p0`` to ``p1`` (< p0).

    ``update(correct)`` feeds one label and says whether the statistic is above ``h``.
    """

    p0: float
    p1: float
    h: float
    statistic: float = 0.0
    n: int = 0
    cap: float | None = None

    def __post_init__(self) -> None:
        if not (0.0 < self.p1 < self.p0 < 1.0):
            raise ValueError(
                f"a Bernoulli CUSUM needs 0 < p1 < p0 < 1, got p0={self.p0}, p1={self.p1}"
            )
        if self.h <= 0.0:
            raise ValueError(f"the CUSUM threshold h must be > 0, got {self.h}")
        if self.cap is None:
            self.cap = 2.0 * self.h

    @property
    def wrong_step(self) -> float:
        """What a wrong prediction adds: ``log((1 - p1) / (1 - p0))`` (> 0)."""
        return math.log((1.0 - self.p1) / (1.0 - self.p0))

    @property
    def right_step(self) -> float:
        """What a right prediction adds: ``log(p1 / p0)`` (< 0)."""
        return math.log(self.p1 / self.p0)

    @property
    def alarm(self) -> bool:
        return self.statistic > self.h

    def update(self, correct: bool) -> bool:
        """Feed one label; whether the statistic is now above ``h``."""
        step = self.right_step if correct else self.wrong_step
        self.statistic = max(0.0, self.statistic + step)
        if self.cap is not None and self.statistic > self.cap:
            self.statistic = self.cap
        self.n += 1
        return self.alarm

    def to_dict(self) -> dict[str, Any]:
        return {
            "p0": self.p0,
            "p1": self.p1,
            "h": self.h,
            "statistic": self.statistic,
            "n": self.n,
            "cap": self.cap,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BernoulliCusum:
        return cls(
            p0=float(d["p0"]),
            p1=float(d["p1"]),
            h=float(d["h"]),
            statistic=float(d.get("statistic", 0.0)),
            n=int(d.get("n", 0)),
            cap=None if d.get("cap") is None else float(d["cap"]),
        )


def average_run_length(p0: float, p1: float, h: float, p: float, *, grid: float = 0.01) -> float:
    """Expected labels until the statistic first exceeds ``h`` when the true accuracy is
    ``p`` (Brook-Evans Markov chain on a lattice of step ``grid``; ~1% accurate)."""
    cusum = BernoulliCusum(p0, p1, h)
    up = max(1, round(cusum.wrong_step / grid))
    down = max(1, round(-cusum.right_step / grid))
    top = int(math.floor(h / grid))  # states 0..top are below or at h; above is the alarm
    size = top + 1
    transitions = np.zeros((size, size))
    for i in range(size):
        j = i + up
        if j <= top:
            transitions[i, j] += 1.0 - p
        transitions[i, max(0, i - down)] += p
    runs = np.linalg.solve(np.eye(size) - transitions, np.ones(size))
    return float(runs[0])


def threshold_for(p0: float, p1: float, arl0: float) -> float:
    """The ``h`` whose in-control average run length (labels between false alarms at
    accuracy ``p0``) is about ``arl0``."""
    if arl0 <= 1.0:
        raise ValueError(f"arl0 must be > 1 label, got {arl0}")
    lo, hi = 0.01, 1.0
    while average_run_length(p0, p1, hi, p0) < arl0:
        lo, hi = hi, hi * 2.0
        if hi > 200.0:
            raise ValueError(f"no CUSUM threshold reaches an ARL of {arl0:g} labels")
    for _ in range(30):
        mid = (lo + hi) / 2.0
        if average_run_length(p0, p1, mid, p0) < arl0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 0.01:
            break
    return round(hi, 2)


def smoothed_p0(accuracy: float, n: int | None, p1: float) -> float:
    """p0 from a validation ``accuracy`` over ``n`` images: Laplace-smoothed
    ``(k + 1) / (n + 2)`` when ``n`` is known, clamped to ``[p1 + P0_MARGIN, P0_MAX]``."""
    p0 = min(max(float(accuracy), 0.0), 1.0)
    if n is not None and n > 0:
        p0 = (round(p0 * n) + 1.0) / (n + 2.0)
    return min(max(p0, p1 + P0_MARGIN), P0_MAX)


def _registry_n(metrics: dict[str, Any]) -> int | None:
    """The images the registered accuracy was measured on (sum of per-class supports)."""
    per_class = metrics.get("per_class")
    if not isinstance(per_class, dict) or not per_class:
        return None
    total = 0
    for cls in per_class.values():
        support = cls.get("support") if isinstance(cls, dict) else None
        if not isinstance(support, int) or isinstance(support, bool):
            return None
        total += support
    return total or None


def reference_accuracy(view: VersionView, p1: float) -> tuple[float, str]:
    """p0 for ``view``'s version (smoothed and clamped, see ``smoothed_p0``) and where it
    came from (reference, registry, default)."""
    ref = view.reference
    if ref is not None and getattr(ref, "accuracy", None) is not None:
        n = getattr(ref, "n", None)
        return smoothed_p0(float(ref.accuracy), n if isinstance(n, int) else None, p1), "reference"
    try:
        metrics = view.store.models.get(view.model_name, view.model_version).metrics or {}
    except LooplineError:
        metrics = {}
    accuracy = metrics.get("accuracy")
    if (
        isinstance(accuracy, int | float)
        and not isinstance(accuracy, bool)
        and 0.0 <= accuracy <= 1.0
    ):
        return smoothed_p0(float(accuracy), _registry_n(metrics), p1), "registry"
    return DEFAULT_P0, "default"


def measure(
    rule: AlertRule, view: VersionView, state: dict[str, Any], config: MonitorConfig
) -> list[Measurement]:
    """The CUSUM statistic per scope, fed with the labels that arrived since the last pass.

    ``state["scopes"][scope]`` keeps each scope's CUSUM (restarted when p0, p1 or h
    change). The value is the highest the statistic reached on this pass's labels (so a
    crossing is not lost when later labels of the same pass bring it down);
    ``evidence["resolve_value"]`` is where it ends, which the lifecycle resolves on (one
    pass later when this pass still crossed ``h``). None while fewer than ``min_samples``
    labels were seen, and when ``cusum_p1`` is not below p0 (there is no drop to watch for).
    """
    p1, h = rule.cusum_p1, rule.threshold
    p0, source = reference_accuracy(view, p1)
    scopes_state: dict[str, Any] = state.setdefault("scopes", {})
    window = f"cusum p0={p0:.3f} p1={p1:.3f} h={h:g}"
    out: list[Measurement] = []
    for scope in rule_scopes(rule, view, config):
        evidence: dict[str, Any] = {"p0": p0, "p0_source": source, "p1": p1, "h": h}
        if not (0.0 < p1 < p0 < 1.0) or h <= 0.0:
            evidence["why"] = f"cusum_p1 {p1:g} is not below p0 {p0:g}: nothing to detect"
            out.append(Measurement.of(rule, view, scope, None, 0, window, evidence))
            continue
        saved = scopes_state.get(scope)
        cusum = BernoulliCusum.from_dict(saved) if saved else None
        if cusum is None or (cusum.p0, cusum.p1, cusum.h) != (p0, p1, h):
            cusum = BernoulliCusum(p0, p1, h)
        new = view.new_outcomes(scope)
        peak = cusum.statistic if not new else 0.0
        wrong = 0
        for outcome in new:
            cusum.update(outcome.correct)
            peak = max(peak, cusum.statistic)
            wrong += not outcome.correct
        scopes_state[scope] = cusum.to_dict()
        evidence.update(
            statistic=cusum.statistic, peak=peak, new_labels=len(new), new_wrong=wrong,
            resolve_value=cusum.statistic, resolve_samples=cusum.n,
        )  # fmt: skip
        value = peak if cusum.n >= rule.min_samples else None
        out.append(Measurement.of(rule, view, scope, value, cusum.n, window, evidence))
    return out
