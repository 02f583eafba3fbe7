"""The demo's outcome as one JSON document (``--json``, ``timeline.json``) and the report.

``summarize`` gathers the figures (``demo.figures``), the versions compared (their test
split metrics from the registry, their production accuracy from the traffic), the lineage
(``monitor.service.alert_report``: alert → dataset version → run → model version → replica
test → deployment) and the timings; ``write`` puts ``timeline.json`` and ``report.html``
in the demo folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopline.demo.figures import figures, per_version
from loopline.demo.project import MODEL

if TYPE_CHECKING:
    from loopline.demo.story import DemoRun
    from loopline.drivers.metadata.store import MetadataStore

REPORT = "report.html"
TIMELINE = "timeline.json"
THRESHOLD = 0.40


def summarize(run: DemoRun) -> dict[str, Any]:
    """The JSON timeline: ``alert_at``, ``versions_deployed``, ``accuracy`` and the rest."""
    from loopline.drivers.metadata.store import MetadataStore

    samples = run.traffic.log.copy() if run.traffic is not None else []
    events = run.timeline.events()
    onset = run.traffic.onset_t if run.traffic is not None else None
    figs = figures(
        samples, events, onset=onset, window=run.scenario.window, new_version=run.new_version
    )
    timings = dict(run.timings)
    if figs["alert_to_new_version_serving_all_s"] is not None:
        timings["alert_to_v2_serving_all_s"] = figs["alert_to_new_version_serving_all_s"]
    store = MetadataStore(run.project.config().metadata_url())
    try:
        lineage = _lineage(store, figs["alert_at"])
        timings.update(_loop_timings(lineage, run))
        versions = _versions(store, run.versions, per_version(samples))
    finally:
        store.close()
    stats = run.traffic.log.stats() if run.traffic is not None else None
    return {
        "ok": run.ok and bool(figs["accuracy"]["recovered"]),
        "reason": run.reason,
        "dir": str(run.project.root),
        "report": str(run.project.root / REPORT),
        "endpoint": run.project.endpoint,
        "drift_onset_s": round(onset, 2) if onset is not None else None,
        "threshold": THRESHOLD,
        "alert_at": figs["alert_at"],
        "drift_warning_at": figs["drift_warning_at"],
        "warnings": figs["warnings"],
        "versions_deployed": run.versions,
        "accuracy": figs["accuracy"],
        "timings": timings,
        "requests": {
            "sent": stats.requests if stats else 0,
            "labelled": stats.labelled if stats else 0,
            "errors": stats.errors if stats else 0,
            "skipped": stats.skipped if stats else 0,
        },
        "versions": versions,
        "monitor": _monitor(run),
        "lineage": lineage,
        "scenario": run.scenario.to_dict(),
        "timeline": [e.to_dict() for e in events],
        "series": figs["series"],
        "monitor_accuracy": [
            [round(t, 2), v, round(a, 4), n]
            for t, v, a, n in (run.feed.accuracy if run.feed else [])
        ],
    }


def write(doc: dict[str, Any], root: Path) -> tuple[Path, Path]:
    """Write ``timeline.json`` and ``report.html`` into ``root``; their paths."""
    from loopline.demo.report import render_report

    timeline, report = root / TIMELINE, root / REPORT
    timeline.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    report.write_text(render_report(doc))
    return timeline, report


def _lineage(store: MetadataStore, alert_at: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``loopline alerts show ID --json`` prints for the accuracy alert."""
    from loopline.errors import LooplineError
    from loopline.monitor.service import alert_report

    if alert_at is None or alert_at.get("alert_id") is None:
        return None
    try:
        report = alert_report(store, int(alert_at["alert_id"]))
    except LooplineError:
        return None
    loop = report.get("loop") or {}
    return {
        "alert": report.get("alert"),
        "chain": report.get("chain", []),
        "loop": {
            k: loop.get(k) for k in ("id", "status", "step", "reason", "model_version", "timeline")
        }
        if loop
        else None,
        "events": report.get("events", []),
    }


def _loop_timings(lineage: dict[str, Any] | None, run: DemoRun) -> dict[str, float]:
    """Seconds each loop step took, from the loop's own timeline."""
    loop = (lineage or {}).get("loop") or {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    for entry in loop.get("timeline") or []:
        t = run.timeline.clock.at(entry.get("at"))
        step = str(entry.get("step"))
        if t is None:
            continue
        first.setdefault(step, t)
        if entry.get("status") == "succeeded":
            done[step] = t
    out: dict[str, float] = {}
    order = ["start", "dataset", "build", "gate", "replica", "release", "canary"]
    for a, b in zip(order, order[1:], strict=False):
        if a in first and b in done:
            out[f"loop_{b}_s"] = round(done[b] - max(done.get(a, first[a]), first[a]), 2)
    return out


def _versions(
    store: MetadataStore, deployed: list[int], production: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each deployed version: its test-split metrics, lineage, and production accuracy."""
    from loopline.errors import NotFound

    out = []
    for version in deployed:
        try:
            mv = store.models.get(MODEL, version)
        except NotFound:
            continue
        metrics = mv.metrics or {}
        by_condition = {
            cond: round(float(m.get("accuracy", 0.0)), 4)
            for cond, m in ((metrics.get("segments") or {}).get("condition") or {}).items()
            if cond not in ("nan", "None", "")
        }
        run = store.runs.get(mv.run_id) if mv.run_id else None
        out.append(
            {
                "version": version,
                "created_at": mv.created_at.isoformat() if mv.created_at else None,
                "run_id": mv.run_id,
                "trigger": run.trigger if run is not None else None,
                "dataset_version": mv.dataset_version,
                "test": {
                    "accuracy": _num(metrics.get("accuracy")),
                    "macro_f1": _num(metrics.get("macro_f1")),
                    "by_condition": by_condition,
                },
                "production": production.get(version),
            }
        )
    return out


def _monitor(run: DemoRun) -> dict[str, Any]:
    """How many passes the monitor made, and how long they took."""
    seconds = sorted(run.feed.seconds) if run.feed is not None else []
    return {
        "interval_s": run.scenario.monitor_interval_s,
        "passes": len(seconds),
        "pass_s_median": round(seconds[len(seconds) // 2], 4) if seconds else None,
        "pass_s_max": round(seconds[-1], 4) if seconds else None,
    }


def _num(value: Any) -> float | None:
    return round(float(value), 4) if isinstance(value, int | float) else None
