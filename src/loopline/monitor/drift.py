"""Drift tests against the reference stored with the version.

- ``drift.predictions``: chi-square of the predicted-class counts against the validation
  split's class shares; the effect is the PSI (Cramér's V is reported too).
- ``drift.inputs``: two-sample KS per image statistic (``monitor.drift.input_stats``)
  against the train+validation sample; the effect is KS D.
- ``drift.softmax``: two-sample KS per softmax column ("Failing Loudly", Rabanser et al.
  2019); the effect is KS D.

Every evaluation (every pass) takes the newest ``persistence × window`` logged predictions
of a scope and splits them into ``persistence`` adjacent disjoint windows of ``window``,
oldest first (a rule with ``window_s`` instead: ``persistence`` adjacent slices of
``window_s`` seconds ending now, each holding at least ``min_samples``). Nothing is carried
between passes. Until the scope has that many predictions the value is None (no-data).

Large samples make trivial shifts significant, so a column drifts only when, in EVERY one
of those windows, its p-value is under ``alpha`` after Benjamini-Hochberg correction and
its effect is at least the floor. The correction is per window, across the columns and
scopes of that window: requiring every window is an intersection-union test, which needs
no correction across windows, and with the defaults (alpha 0.001, two windows of 25) a
stable stream flags a given column in both windows with probability about
``(alpha / columns)² × columns`` per evaluation, under 1e-6. The value is, over the
drifting columns, the largest of each column's smallest per-window effect; 0.0 when none
drifts, so a rule ``drift.* > 0`` fires.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from loopline.errors import ConfigError
from loopline.monitor.config import AlertRule, DriftConfig, MonitorConfig
from loopline.monitor.estimate import NO_REFERENCE
from loopline.monitor.reference import Reference
from loopline.monitor.types import Logged, Measurement, VersionView, describe_window
from loopline.monitor.windows import rule_scopes

METRICS = ("drift.predictions", "drift.inputs", "drift.softmax")
DEFAULT_WINDOW = 200  # a rule with neither window nor window_s
CORRECTION = "benjamini-hochberg per window, across columns and scopes"
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


def split_windows(
    rule: AlertRule, view: VersionView, scope: str, persistence: int
) -> tuple[list[list[Logged]], int]:
    """The ``persistence`` adjacent windows a scope is tested on now, oldest first, and
    how many logged predictions were seen; no windows until every one is full."""
    count = rule.window or DEFAULT_WINDOW
    if rule.window_s is None:
        rows = view.logged(scope, count=persistence * count)
        if len(rows) < persistence * count:
            return [], len(rows)
        return [rows[i * count : (i + 1) * count] for i in range(persistence)], len(rows)
    # Slices (start + k·window_s, start + (k+1)·window_s], the newest ending now.
    start = view.now - timedelta(seconds=persistence * rule.window_s)
    edges = [start + timedelta(seconds=k * rule.window_s) for k in range(1, persistence)]
    rows = [r for r in view.logged(scope, seconds=persistence * rule.window_s) if r.at > start]
    slices: list[list[Logged]] = [[] for _ in range(persistence)]
    for row in rows:
        slices[bisect.bisect_left(edges, row.at)].append(row)
    slices = [s[-count:] for s in slices]
    if any(len(s) < rule.min_samples for s in slices):
        return [], len(rows)
    return slices, len(rows)


def _adjust(family: list[tuple[str, str, float]]) -> dict[tuple[str, str], float]:
    """Benjamini-Hochberg adjusted p-values of every (scope, column) in the family."""
    if not family:
        return {}
    from scipy.stats import false_discovery_control

    adjusted = false_discovery_control([p for _, _, p in family], method="bh")
    return {(s, c): float(a) for (s, c, _), a in zip(family, adjusted, strict=True)}


Tested = tuple[list[list[Logged]], list[dict[str, ColumnTest]]]


def measure(
    rule: AlertRule, view: VersionView, state: dict[str, Any], config: MonitorConfig
) -> list[Measurement]:
    """The drift measurements of ``rule`` per scope (see the module docstring)."""
    if rule.metric not in METRICS:
        raise ConfigError(f"unknown drift metric {rule.metric!r}; use one of {', '.join(METRICS)}")
    state.pop("scopes", None)  # the persistence counters of earlier releases: not needed
    scopes = rule_scopes(rule, view, config)
    reference = view.reference
    persistence = config.drift.persistence
    seen: dict[str, int] = {}
    tested: dict[str, Tested] = {}
    if reference is not None:
        for scope in scopes:
            windows, seen[scope] = split_windows(rule, view, scope, persistence)
            if windows:
                tests = [column_tests(rule.metric, w, reference, config, rule.min_samples)
                         for w in windows]  # fmt: skip
                tested[scope] = (windows, [{t.column: t for t in ts} for ts in tests])
    adjusted = [
        _adjust([(s, c, t.p) for s, (_, per) in tested.items() for c, t in per[i].items()])
        for i in range(persistence)
    ]
    out = []
    for scope in scopes:
        if reference is None:
            value, samples, evidence = None, 0, {"reason": NO_REFERENCE}
        elif scope in tested:
            value, samples, evidence = _evaluate(rule, config.drift, scope, tested[scope], adjusted)
        else:
            n = seen.get(scope, 0)
            value, samples, evidence = None, n, _waiting(rule, persistence, n)
        out.append(
            Measurement.of(
                rule,
                view,
                scope,
                value,
                samples,
                describe_window(rule.window, rule.window_s),
                evidence,
            )
        )
    return out


def _waiting(rule: AlertRule, persistence: int, seen: int) -> dict[str, Any]:
    if seen < rule.min_samples:
        return {"reason": f"{seen} logged predictions, fewer than {rule.min_samples}"}
    if rule.window_s is None:
        need = f"{persistence} windows of {rule.window or DEFAULT_WINDOW} predictions"
    else:
        need = (
            f"{persistence} slices of {rule.window_s:g} s with {rule.min_samples} predictions each"
        )
    return {"reason": f"waiting for {need} ({seen} logged)"}


def _rounded(t: ColumnTest | None, p_adj: float | None) -> dict[str, Any]:
    if t is None or p_adj is None:
        return {"statistic": None, "p": None, "p_adjusted": None, "effect": None, "samples": None}
    return {
        "statistic": round(t.statistic, 6),
        "p": float(f"{t.p:.4g}"),
        "p_adjusted": float(f"{p_adj:.4g}"),
        "effect": round(t.effect, 4),
        "samples": t.samples,
        **(t.extra or {}),
    }


def _evaluate(
    rule: AlertRule,
    drift: DriftConfig,
    scope: str,
    tested: Tested,
    adjusted: list[dict[tuple[str, str], float]],
) -> tuple[float | None, int, dict[str, Any]]:
    """One scope's value and evidence from its windows' tests."""
    windows, per_window = tested
    floor = drift.psi_min if rule.metric == "drift.predictions" else drift.ks_min_effect
    names = sorted({c for tests in per_window for c in tests})
    columns: dict[str, Any] = {}
    value = 0.0
    complete = 0
    for name in names:
        tests = [tests.get(name) for tests in per_window]
        p_adj = [None if t is None else adjusted[i][(scope, name)] for i, t in enumerate(tests)]
        flagged = [
            t is not None and p is not None and p < drift.alpha and t.effect >= floor
            for t, p in zip(tests, p_adj, strict=True)
        ]
        drifting = all(flagged)
        complete += all(t is not None for t in tests)
        if drifting:
            value = max(value, min(t.effect for t in tests if t is not None))
        cells = [_rounded(t, p) for t, p in zip(tests, p_adj, strict=True)]
        keys = dict.fromkeys(k for c in cells for k in c)  # per window, oldest first
        columns[name] = {
            **{k: [c.get(k) for c in cells] for k in keys},
            "flagged": flagged,
            "drifting": drifting,
        }
    samples = sum(len(w) for w in windows)
    evidence: dict[str, Any] = {
        "effect": "psi" if rule.metric == "drift.predictions" else "ks_d",
        "floor": floor,
        "alpha": drift.alpha,
        "correction": CORRECTION,
        "persistence": drift.persistence,
        "windows": [
            {"from": w[0].at.isoformat(), "to": w[-1].at.isoformat(), "samples": len(w)}
            for w in windows
        ],
        "window_end": windows[-1][-1].at.isoformat(),
        "drifting": sorted(c for c, e in columns.items() if e["drifting"]),
        "columns": columns,
    }
    if not complete:  # no column could be tested in every window: nothing to judge
        evidence["reason"] = "no column tested in every window (reference or rows lack it)"
        return None, samples, evidence
    return value, samples, evidence
