"""Label-free accuracy: the mean calibrated P(correct) of the logged predictions.

Each prediction's max-softmax confidence goes through the isotonic curve its build fitted
on the validation split for the predicted class (``monitor.reference``), so a drop shows
before labels arrive. Such estimates overrate a model on inputs unlike anything it saw
(night, fog: a CNN stays confident), so once labels come ``estimate_gap`` reports how far
the estimate is from the realised accuracy, and the drift tests carry the early warning.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loopline.monitor.config import AlertRule, MonitorConfig
from loopline.monitor.types import Measurement, VersionView, describe_window
from loopline.monitor.windows import rule_scopes

NO_REFERENCE = "the version's bundle has no monitoring reference (monitoring.json)"


def estimate_gap(
    view: VersionView, scope: str, window: int | None, seconds: float | None = None
) -> dict[str, Any] | None:
    """Realised accuracy minus the label-free estimate, over the newest labelled predictions
    of the window (the same predictions on both sides); None without labels or reference.

    A negative gap means the estimate overrates the model (expected under covariate shift).
    """
    reference = view.reference
    if reference is None:
        return None
    outcomes = view.labelled(scope, count=window, seconds=seconds)
    if not outcomes:
        return None
    estimated = reference.calibration.p_correct(
        [o.predicted for o in outcomes], [o.confidence for o in outcomes]
    )
    realised = float(np.mean([o.correct for o in outcomes]))
    estimate = float(estimated.mean())
    return {
        "labelled": len(outcomes),
        "realised_accuracy": round(realised, 4),
        "estimated_accuracy": round(estimate, 4),
        "gap": round(realised - estimate, 4),
    }


def measure(
    rule: AlertRule, view: VersionView, state: dict[str, Any], config: MonitorConfig
) -> list[Measurement]:
    """``estimated_accuracy`` per scope over ``view.logged`` (no-data below min_samples or
    without a reference); the evidence carries the gap to realised accuracy when the
    window's predictions have labels."""
    reference = view.reference
    out = []
    for scope in rule_scopes(rule, view, config):
        rows = view.logged(scope, count=rule.window, seconds=rule.window_s)
        value: float | None = None
        evidence: dict[str, Any] = {}
        if reference is None:
            evidence["reason"] = NO_REFERENCE
        elif len(rows) < rule.min_samples:
            evidence["reason"] = f"{len(rows)} logged predictions, fewer than {rule.min_samples}"
        else:
            confidence = [r.confidence for r in rows]
            p = reference.calibration.p_correct([r.predicted for r in rows], confidence)
            value = float(p.mean())
            evidence = {
                "mean_confidence": round(float(np.mean(confidence)), 4),
                "reference_accuracy": reference.accuracy,
            }
            gap = estimate_gap(view, scope, rule.window, rule.window_s)
            if gap is not None:
                evidence["gap"] = gap
        out.append(
            Measurement.of(
                rule,
                view,
                scope,
                value,
                len(rows),
                describe_window(rule.window, rule.window_s),
                evidence,
            )
        )
    return out
