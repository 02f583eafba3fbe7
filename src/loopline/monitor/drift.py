"""Drift tests against the reference stored with the version.

- ``drift.predictions``: chi-square of the predicted-class counts against the validation
  split's class shares; the effect is the PSI (Cramér's V is reported too).
- ``drift.inputs``: two-sample KS per image statistic (``monitor.drift.input_stats``)
  against the train+validation sample; the effect is KS D.
- ``drift.softmax``: two-sample KS per softmax column ("Failing Loudly", Rabanser et al.
  2019); the effect is KS D.

Large samples make trivial shifts significant, so a column drifts only when its p-value
is under ``alpha`` after Benjamini-Hochberg correction across columns (and segments), its
effect is at least the floor, and both held in ``persistence`` consecutive disjoint
windows. A window is tested once all its rows are newer than the last tested window's,
i.e. once ``rule.window`` new predictions arrived (or ``window_s`` passed); between tests
a scope reports its last result. The value is the largest effect among drifting columns,
0.0 when none drifts, so a rule ``drift.* > 0`` fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from loopline.errors import ConfigError
from loopline.monitor.config import AlertRule, DriftConfig, MonitorConfig
from loopline.monitor.estimate import NO_REFERENCE, window_label
from loopline.monitor.reference import Reference
from loopline.monitor.types import Logged, Measurement, VersionView
from loopline.monitor.windows import rule_scopes

METRICS = ("drift.predictions", "drift.inputs", "drift.softmax")
DEFAULT_WINDOW = 200  # a rule with neither window nor window_s
_RGB = {"mean_r": 0, "mean_g": 1, "mean_b": 2}  # the server logs these as mean_rgb


@dataclass
class ColumnTest:
    """One column's test on one window."""

    column: str
    statistic: float
    p: float
    effect: float
    samples: int
    extra: dict[str, float] | None = None


def _finite(p: float) -> float:
    return float(p) if np.isfinite(p) else 1.0


def _ks(column: str, values: np.ndarray, reference: np.ndarray) -> ColumnTest:
    from scipy.stats import ks_2samp

    result = ks_2samp(values, reference)
    d = float(result.statistic)
    return ColumnTest(column, d, _finite(result.pvalue), d, len(values))


def class_test(predicted: list[str], reference: Reference) -> ColumnTest | None:
    """Chi-square of predicted-class counts against the reference shares, with PSI.

    Both distributions are smoothed by half a count per class, so a class the reference
    never predicted (or the window lacks) gives a finite statistic.
    """
    from scipy.stats import chisquare

    k = len(reference.labels)
    index = {label: i for i, label in enumerate(reference.labels)}
    known = [index[p] for p in predicted if p in index]
    n = len(known)
    if k < 2 or n == 0:
        return None
    counts = np.bincount(np.asarray(known, dtype=np.int64), minlength=k).astype(np.float64)
    m = max(reference.n, 1)
    ref = (np.asarray(reference.class_shares, dtype=np.float64) * m + 0.5) / (m + 0.5 * k)
    ref /= ref.sum()
    result = chisquare(counts, ref * n)
    obs = (counts + 0.5) / (n + 0.5 * k)
    psi = float(np.sum((obs - ref) * np.log(obs / ref)))
    stat = float(result.statistic)
    cramers_v = float(np.sqrt(stat / (n * (k - 1))))
    return ColumnTest(
        "predicted", stat, _finite(result.pvalue), psi, n, {"cramers_v": round(cramers_v, 4)}
    )


def _stat(stats: dict[str, Any] | None, name: str) -> float | None:
    if not stats:
        return None
    value = stats.get(name)
    if value is None and name in _RGB:
        rgb = stats.get("mean_rgb")
        value = rgb[_RGB[name]] if isinstance(rgb, list) and len(rgb) == 3 else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def input_tests(
    rows: list[Logged], reference: Reference, drift: DriftConfig, min_samples: int
) -> list[ColumnTest]:
    """KS per configured image statistic that both the window and the reference hold."""
    tests = []
    for name in drift.input_stats:
        ref = reference.input_stats.get(name)
        if not ref:
            continue
        values = [v for v in (_stat(r.input_stats, name) for r in rows) if v is not None]
        if len(values) < min_samples:
            continue
        window = np.round(np.asarray(values, dtype=np.float64), reference.stats_decimals)
        tests.append(_ks(name, window, np.asarray(ref, dtype=np.float64)))
    return tests


def softmax_tests(rows: list[Logged], reference: Reference, min_samples: int) -> list[ColumnTest]:
    """KS per softmax column, on the logged probabilities rounded as the reference is."""
    k = len(reference.labels)
    probs = [r.probabilities for r in rows if r.probabilities and len(r.probabilities) == k]
    if len(probs) < min_samples or len(reference.softmax) == 0:
        return []
    window = np.round(np.asarray(probs, dtype=np.float64), reference.softmax_decimals)
    ref = reference.softmax_array
    return [_ks(label, window[:, j], ref[:, j]) for j, label in enumerate(reference.labels)]


def column_tests(
    metric: str, rows: list[Logged], reference: Reference, config: MonitorConfig, min_samples: int
) -> list[ColumnTest]:
    if metric == "drift.predictions":
        test = class_test([r.predicted for r in rows], reference)
        return [test] if test is not None else []
    if metric == "drift.inputs":
        return input_tests(rows, reference, config.drift, min_samples)
    if metric == "drift.softmax":
        return softmax_tests(rows, reference, min_samples)
    raise ConfigError(f"unknown drift metric {metric!r}; use one of {', '.join(METRICS)}")


def _key(row: Logged) -> tuple[datetime, str]:
    return row.at, row.prediction_id


def _stored_key(scope_state: dict[str, Any]) -> tuple[datetime, str] | None:
    last = scope_state.get("last")
    return (datetime.fromisoformat(last[0]), last[1]) if last else None


def _ready(rows: list[Logged], rule: AlertRule, count: int, last: Any) -> bool:
    """A full window whose every row is newer than the last tested window's."""
    if len(rows) < rule.min_samples:
        return False
    if rule.window_s is None and len(rows) < count:
        return False
    return last is None or min(_key(r) for r in rows) > last


def _adjust(family: list[tuple[str, str, float]]) -> dict[tuple[str, str], float]:
    """Benjamini-Hochberg adjusted p-values of every (scope, column) in the family."""
    if not family:
        return {}
    from scipy.stats import false_discovery_control

    adjusted = false_discovery_control([p for _, _, p in family], method="bh")
    return {(s, c): float(a) for (s, c, _), a in zip(family, adjusted, strict=True)}


def measure(
    rule: AlertRule, view: VersionView, state: dict[str, Any], config: MonitorConfig
) -> list[Measurement]:
    """The drift measurements of ``rule`` per scope (see the module docstring)."""
    if rule.metric not in METRICS:
        raise ConfigError(f"unknown drift metric {rule.metric!r}; use one of {', '.join(METRICS)}")
    scopes = rule_scopes(rule, view, config)
    reference = view.reference
    count = rule.window or DEFAULT_WINDOW
    stored: dict[str, dict[str, Any]] = state.setdefault("scopes", {})
    fresh: dict[str, tuple[list[Logged], list[ColumnTest]]] = {}
    sizes: dict[str, int] = {}
    if reference is not None:
        for scope in scopes:
            rows = view.logged(scope, count=count, seconds=rule.window_s)
            sizes[scope] = len(rows)
            if _ready(rows, rule, count, _stored_key(stored.get(scope, {}))):
                tests = column_tests(rule.metric, rows, reference, config, rule.min_samples)
                if tests:
                    fresh[scope] = (rows, tests)
    # One family for the correction: this pass's tests, and the latest of every other
    # scope measured now (its window was tested on an earlier pass).
    family = [(s, t.column, t.p) for s, (_, tests) in fresh.items() for t in tests]
    for scope in scopes:
        if scope not in fresh:
            family += [(scope, c, p) for c, p in stored.get(scope, {}).get("p", {}).items()]
    adjusted = _adjust(family)
    out = []
    for scope in scopes:
        if scope in fresh:
            rows, tests = fresh[scope]
            stored[scope] = _evaluate(rule, config.drift, scope, rows, tests, adjusted, stored)
        value, samples, evidence = _result(rule, reference, stored.get(scope), sizes, scope)
        out.append(
            Measurement(
                metric=rule.metric,
                environment=view.environment,
                model_name=view.model_name,
                model_version=view.model_version,
                scope=scope,
                value=value,
                samples=samples,
                window=window_label(rule),
                evidence=evidence,
            )
        )
        if scope in fresh:
            stored[scope]["evidence"]["evaluated"] = False  # what a later pass re-reports
    return out


def _evaluate(
    rule: AlertRule,
    drift: DriftConfig,
    scope: str,
    rows: list[Logged],
    tests: list[ColumnTest],
    adjusted: dict[tuple[str, str], float],
    stored: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Apply one tested window to a scope's persistence counters; its new state."""
    previous = stored.get(scope, {}).get("streak", {})
    floor = drift.psi_min if rule.metric == "drift.predictions" else drift.ks_min_effect
    streak: dict[str, int] = {}
    columns: dict[str, Any] = {}
    value = 0.0
    for t in tests:
        p_adj = adjusted[(scope, t.column)]
        drifting = p_adj < drift.alpha and t.effect >= floor
        streak[t.column] = previous.get(t.column, 0) + 1 if drifting else 0
        persistent = streak[t.column] >= drift.persistence
        if persistent:
            value = max(value, t.effect)
        columns[t.column] = {
            "statistic": round(t.statistic, 6),
            "p": float(f"{t.p:.4g}"),
            "p_adjusted": float(f"{p_adj:.4g}"),
            "effect": round(t.effect, 4),
            "samples": t.samples,
            "drifting": drifting,
            "persistent": streak[t.column],
            **(t.extra or {}),
        }
    newest = max(rows, key=_key)
    return {
        "last": [newest.at.isoformat(), newest.prediction_id],
        "streak": streak,
        "p": {t.column: t.p for t in tests},
        "value": value,
        "samples": len(rows),
        "evidence": {
            "evaluated": True,
            "window_end": newest.at.isoformat(),
            "effect": "psi" if rule.metric == "drift.predictions" else "ks_d",
            "floor": floor,
            "alpha": drift.alpha,
            "persistence": drift.persistence,
            "drifting": sorted(
                c for c, e in columns.items() if e["persistent"] >= drift.persistence
            ),
            "columns": columns,
        },
    }


def _result(
    rule: AlertRule,
    reference: Reference | None,
    scope_state: dict[str, Any] | None,
    sizes: dict[str, int],
    scope: str,
) -> tuple[float | None, int, dict[str, Any]]:
    if reference is None:
        return None, 0, {"reason": NO_REFERENCE}
    seen = sizes.get(scope, 0)
    if seen < rule.min_samples:  # too few predictions now: no-data, whatever was tested
        return None, seen, {"reason": f"{seen} logged predictions, fewer than {rule.min_samples}"}
    if scope_state is None or "value" not in scope_state:
        return None, seen, {"reason": "waiting for a first full window to test"}
    return float(scope_state["value"]), int(scope_state["samples"]), dict(scope_state["evidence"])
