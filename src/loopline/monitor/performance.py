"""Labelled performance: accuracy and macro precision/recall/F1 over a window of the
prediction log joined with its feedback.

``measure`` scores a rule's window of a version's ``VersionView`` (the monitor's pass);
``current_metrics`` reads the newest labelled predictions straight from the store (for
``loopline metrics`` and scripts). Both score with ``loopline.metrics.classification_report``,
the function Build's evaluate and gate use, so production and test numbers agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from loopline.clock import utc as as_utc
from loopline.errors import ConfigError
from loopline.metrics import classification_report
from loopline.monitor.config import LABELLED_METRICS
from loopline.monitor.types import GLOBAL, Measurement, describe_window, scope_name
from loopline.monitor.windows import rule_scopes

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.monitor.config import AlertRule, MonitorConfig
    from loopline.monitor.types import Outcome, VersionView

TOP_CONFUSIONS = 5


def measure(
    rule: AlertRule, view: VersionView, state: dict[str, Any], config: MonitorConfig
) -> list[Measurement]:
    """One measurement of ``rule.metric`` per scope over ``rule.window``/``window_s``.

    The value is None (no-data) below ``rule.min_samples`` labelled predictions, and
    when the newest label of the window is older than ``config.stale_labels_s`` (stale
    labels must not hold an alert open or resolve it). With a ``resolve_window`` other
    than ``window``, ``evidence`` carries ``resolve_value``/``resolve_samples`` over it.
    ``state`` is not used: the windows are the whole state.
    """
    if rule.metric not in LABELLED_METRICS:
        raise ConfigError(
            f"rule {rule.name!r}: {rule.metric} is not a labelled metric; "
            f"performance measures {', '.join(LABELLED_METRICS)}"
        )
    ref_labels = list(getattr(view.reference, "labels", None) or [])
    out: list[Measurement] = []
    for scope in rule_scopes(rule, view, config):
        samples = view.labelled(scope, count=rule.window, seconds=rule.window_s)
        value, evidence = score(rule.metric, samples, ref_labels, rule.min_samples)
        stale = _stale(samples, view.now, config.stale_labels_s)
        evidence["stale"] = stale
        if stale:
            evidence["stale_value"], value = value, None
        if rule.resolve_window is not None and rule.resolve_window != rule.window:
            wide = view.labelled(scope, count=rule.resolve_window, seconds=rule.window_s)
            resolve, _ = score(rule.metric, wide, ref_labels, rule.min_samples)
            evidence["resolve_value"] = None if stale else resolve
            evidence["resolve_samples"] = len(wide)
        out.append(
            Measurement.of(
                rule,
                view,
                scope,
                value,
                len(samples),
                describe_window(rule.window, rule.window_s, "labelled"),
                evidence,
            )
        )
    return out


def score(
    metric: str, samples: Sequence[Outcome], labels: list[str], min_samples: int = 1
) -> tuple[float | None, dict[str, Any]]:
    """``metric`` over ``samples`` (None below ``min_samples``) and its evidence: ``n``,
    ``correct``, the four headline metrics, the most frequent confusions, the window's
    first and last prediction times and its newest label time."""
    n = len(samples)
    evidence: dict[str, Any] = {"n": n, "correct": sum(o.correct for o in samples)}
    if n == 0:
        return None, evidence
    report = _report([o.actual for o in samples], [o.predicted for o in samples], labels)
    for key in LABELLED_METRICS:
        evidence[key] = report[key]
    evidence["top_confusions"] = report["top_confusions"]
    evidence["first_at"] = min(o.at for o in samples).isoformat()
    evidence["last_at"] = max(o.at for o in samples).isoformat()
    evidence["last_label_at"] = max(o.labelled_at for o in samples).isoformat()
    return (float(report[metric]) if n >= min_samples else None), evidence


def current_metrics(
    store: MetadataStore,
    model_name: str,
    *,
    environment: str = "production",
    window: int = 200,
    by: str | None = None,
    version: int | None = None,
) -> dict[str, Any]:
    """The labelled metrics of each version of ``model_name`` in ``environment`` now.

    Per version: the newest ``window`` labelled predictions (by prediction time; shadow
    and addressed answers left out) and, with ``by`` (``camera_id`` or a request-metadata
    key), the newest ``window`` of each of its values. Rows are JSON-ready.
    """
    if window < 1:
        raise ConfigError(f"window {window} is too small; give a count of 1 or more")
    preds = store.predictions
    versions = [version] if version is not None else preds.labelled_versions(
        environment, model_name
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    for v in versions:
        latest = preds.latest_labelled(environment, model_name, v, window)
        if latest:
            rows.append(_summary(v, GLOBAL, latest))
        if by is not None and latest:
            groups: dict[str, list[Any]] = {}
            for r in preds.latest_labelled(environment, model_name, v, window, by=by):
                if r.segment is not None and r.segment != "":
                    groups.setdefault(str(r.segment), []).append(r)
            rows += [_summary(v, scope_name(by, s), groups[s]) for s in sorted(groups)]
    return {
        "model": model_name,
        "environment": environment,
        "window": window,
        "by": by,
        "rows": rows,
    }


def _summary(version: int, scope: str, rows: list[Any]) -> dict[str, Any]:
    report = _report([r.actual for r in rows], [r.predicted for r in rows], [])
    return {
        "version": version,
        "scope": scope,
        "n": len(rows),
        "correct": sum(r.actual == r.predicted for r in rows),
        **{k: report[k] for k in LABELLED_METRICS},
        "top_confusions": report["top_confusions"],
        "first_at": _iso(min(r.at for r in rows)),
        "last_at": _iso(max(r.at for r in rows)),
        "last_label_at": _iso(max(r.labelled_at for r in rows)),
    }


def _report(actual: list[str], predicted: list[str], labels: list[str]) -> dict[str, Any]:
    """``classification_report`` over ``labels`` (the reference's, when known) followed
    by any other label seen, sorted."""
    known = set(labels)
    extra = sorted({*actual, *predicted} - known)
    names = [*labels, *extra]
    index = {name: i for i, name in enumerate(names)}
    y_true = np.fromiter((index[a] for a in actual), dtype=np.int64, count=len(actual))
    y_pred = np.fromiter((index[p] for p in predicted), dtype=np.int64, count=len(predicted))
    report = classification_report(y_true, y_pred, names)
    pairs = Counter((a, p) for a, p in zip(actual, predicted, strict=True) if a != p)
    report["top_confusions"] = [
        {"actual": a, "predicted": p, "count": c}
        for (a, p), c in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CONFUSIONS]
    ]
    return report


def _stale(samples: Sequence[Outcome], now: datetime, stale_s: float) -> bool:
    if not samples:
        return False
    return now - max(o.labelled_at for o in samples) > timedelta(seconds=stale_s)


def _iso(t: datetime) -> str:
    return as_utc(t).isoformat()
