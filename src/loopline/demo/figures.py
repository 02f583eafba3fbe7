"""The demo's figures, from what the traffic sent and the timeline recorded.

Pure functions over ``Sample`` lists and ``Event`` lists, so the report, ``--json`` and the
tests compute them the same way: rolling accuracy, accuracy before the drift, its lowest,
after the recovery, and how long (in seconds and in labelled predictions after the drift
onset) each alert took.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loopline.demo.timeline import Event
from loopline.demo.traffic import Sample


def labelled_in_order(samples: Sequence[Sample]) -> list[Sample]:
    """The labelled frames, by the time they were sent (where the monitor puts a label)."""
    return sorted((s for s in samples if s.labelled_t is not None), key=lambda s: s.t)


def accuracy(samples: Sequence[Sample]) -> float | None:
    return sum(s.correct for s in samples) / len(samples) if samples else None


def rolling(samples: Sequence[Sample], window: int, least: int = 10) -> list[tuple[float, float]]:
    """``(t, accuracy of the last window labelled frames sent up to t)`` for each labelled
    frame, once ``least`` are in the window."""
    out: list[tuple[float, float]] = []
    labelled = labelled_in_order(samples)
    right = 0
    for i, s in enumerate(labelled):
        right += s.correct
        if i >= window:
            right -= labelled[i - window].correct
        n = min(i + 1, window)
        if n >= least:
            out.append((s.t, right / n))
    return out


def serving_all_since(samples: Sequence[Sample], version: int) -> float | None:
    """When ``version`` began answering every frame: the first of its answers after the
    last answer of another version (None if it never answered, or another still does)."""
    ordered = sorted(samples, key=lambda s: s.t)
    last_other = max((i for i, s in enumerate(ordered) if s.version != version), default=-1)
    rest = ordered[last_other + 1 :]
    return rest[0].t if rest else None


def after_onset(samples: Sequence[Sample], onset: float, until: float) -> tuple[int, int]:
    """(frames sent, frames labelled) from ``onset`` up to ``until``."""
    sent = sum(1 for s in samples if onset <= s.t <= until)
    labelled = sum(
        1 for s in samples if s.t >= onset and s.labelled_t is not None and s.labelled_t <= until
    )
    return sent, labelled


def delay(samples: Sequence[Sample], onset: float, event: Event | None) -> dict[str, Any] | None:
    """How long after the onset ``event`` came: seconds, labelled and all predictions."""
    if event is None:
        return None
    sent, labelled = after_onset(samples, onset, event.t)
    return {
        "seconds": round(event.t - onset, 2),
        "labelled": labelled,
        "predictions": sent,
        "t": round(event.t, 2),
        "rule": event.data.get("rule"),
        "metric": event.data.get("metric"),
        "alert_id": event.data.get("alert_id"),
        "version": event.data.get("version"),
    }


def per_version(samples: Sequence[Sample]) -> dict[int, dict[str, Any]]:
    """Answers, labelled answers and accuracy per version, overall and per condition."""
    out: dict[int, dict[str, Any]] = {}
    for version in sorted({s.version for s in samples}):
        mine = [s for s in samples if s.version == version]
        labelled = [s for s in mine if s.labelled_t is not None]
        by: dict[str, Any] = {}
        for cond in sorted({s.condition for s in labelled}):
            these = [s for s in labelled if s.condition == cond]
            by[cond] = {"labelled": len(these), "accuracy": _round(accuracy(these))}
        out[version] = {
            "answers": len(mine),
            "labelled": len(labelled),
            "accuracy": _round(accuracy(labelled)),
            "by_condition": by,
            "first_t": round(min(s.t for s in mine), 2),
            "last_t": round(max(s.t for s in mine), 2),
        }
    return out


def figures(
    samples: Sequence[Sample],
    events: Sequence[Event],
    *,
    onset: float | None,
    window: int,
    new_version: int | None,
) -> dict[str, Any]:
    """Everything the JSON timeline and the report state about accuracy and timing."""
    labelled = labelled_in_order(samples)
    series = rolling(samples, window)
    before = [s for s in labelled if onset is None or s.t < onset]
    full = rolling(samples, window, least=window)
    post = [(t, a) for t, a in full if onset is not None and t >= onset]
    since = serving_all_since(samples, new_version) if new_version is not None else None
    after = [s for s in labelled if since is not None and s.t >= since]
    alert = _first(events, "alert")
    warnings = _first_warnings(events)
    out: dict[str, Any] = {
        "accuracy": {
            "window": window,
            "before_drift": _round(accuracy(before)),
            "before_drift_labelled": len(before),
            "lowest": _round(min((a for _, a in post), default=None)),
            "after_recovery": _round(accuracy(after)),
            "after_recovery_labelled": len(after),
        },
        "alert_at": delay(samples, onset, alert) if onset is not None else None,
        "warnings": [d for e in warnings if onset is not None and (d := delay(samples, onset, e))],
        "v2_serving_all_t": round(since, 2) if since is not None else None,
        "alert_to_new_version_serving_all_s": (
            round(since - alert.t, 2) if since is not None and alert is not None else None
        ),
        "series": [[round(t, 2), round(a, 4)] for t, a in series],
    }
    acc = out["accuracy"]
    acc["recovered"] = (
        acc["before_drift"] is not None
        and acc["after_recovery"] is not None
        and acc["after_recovery"] >= acc["before_drift"] - 0.10
    )
    drift = next((w for w in out["warnings"] if str(w.get("metric", "")).startswith("drift")), None)
    out["drift_warning_at"] = drift
    return out


def _first(events: Sequence[Event], kind: str) -> Event | None:
    return next((e for e in sorted(events, key=lambda e: e.t) if e.kind == kind), None)


def _first_warnings(events: Sequence[Event]) -> list[Event]:
    """The first firing of each warning rule, in time order."""
    seen: dict[str, Event] = {}
    for e in sorted(events, key=lambda e: e.t):
        if e.kind == "warning" and str(e.data.get("rule")) not in seen:
            seen[str(e.data.get("rule"))] = e
    return list(seen.values())


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
