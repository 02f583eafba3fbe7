"""What the demo hears from the monitor and reads from the store, as timeline events.

``MonitorFeed.on_pass`` is handed to ``monitor.service.run``: each pass's alert changes,
notices and measurements become events (and the latest values, for the live display).
``StoreWatcher.poll`` reads what the loop and the servers wrote (the loop's timeline, the
production deployment's history), the way ``loopline alerts show`` and ``loopline
deployments`` would.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loopline.demo.timeline import Timeline

if TYPE_CHECKING:
    from loopline.drivers.metadata.loops import LoopRecord
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.monitor.passes import PassReport

RETRAINING = ("retrain", "approve")


@dataclass
class MonitorFeed:
    """Turns monitor pass reports into timeline events; keeps the latest measurements."""

    timeline: Timeline
    store: MetadataStore
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)  # rule -> measurement
    accuracy: list[tuple[float, int, float, int]] = field(default_factory=list)
    passes: int = 0
    seconds: list[float] = field(default_factory=list)  # each pass's duration
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_pass(self, report: PassReport) -> None:
        now = self.timeline.clock()
        with self._lock:
            self.passes += 1
            self.seconds.append(float(report.seconds))
            for m in report.measurements:
                if m.get("scope") != "global":
                    continue
                self.latest[f"{m['rule']}@{m.get('version')}"] = m
                if m.get("metric") == "accuracy" and m.get("value") is not None:
                    self.accuracy.append(
                        (now, int(m["version"]), float(m["value"]), int(m.get("samples") or 0))
                    )
        for change in report.changes:
            self._change(change, now)
        for notice in report.notifications:
            channels = ", ".join(
                f"{c.get('channel')}{'' if c.get('ok') else ' (failed)'}"
                for c in notice.get("channels", [])
            )
            self.timeline.mark(
                "notified",
                f"told ({channels}): {notice.get('message', '')}",
                quiet=notice.get("kind") == "resolved",
                alert_id=notice.get("alert_id"),
                notice=notice.get("kind"),
            )
        for error in report.errors:
            if error not in self.errors:
                self.errors.append(error)
                self.timeline.mark("error", f"monitor: {error}")

    def _change(self, change: dict[str, Any], now: float) -> None:
        kind, alert_id = change["kind"], change["alert_id"]
        value, samples = change.get("value"), change.get("samples")
        shown = f"{value:.3f}" if isinstance(value, int | float) else "n/a"
        text = (
            f"{change['rule']} {kind}: {change['metric']} {change['op']} "
            f"{change['threshold']:g} ({shown} over {samples}) on v{change['version']}"
        )
        t: float | None = now
        if kind == "firing":
            alert = self.store.alerts.get(alert_id)
            fired = alert.fired_at if alert is not None else None
            t = self.timeline.clock.at(fired) if fired is not None else now
            what = "alert" if change.get("action") in RETRAINING else "warning"
        else:
            what = {"pending": "pending", "resolved": "resolved"}.get(kind, kind)
        assert t is not None
        self.timeline.mark(
            what,
            text,
            t=t,
            quiet=what in ("pending", "resolved"),
            alert_id=alert_id,
            rule=change["rule"],
            metric=change["metric"],
            version=change["version"],
            scope=change.get("scope"),
            severity=change.get("severity"),
            value=value,
            samples=samples,
        )

    def line(self, versions: list[int]) -> str:
        """The latest measurements of ``versions``, in one line for the live display."""
        with self._lock:
            latest = list(self.latest.values())
            passes = self.passes
        parts = []
        for version in versions:
            mine = [m for m in latest if m.get("version") == version and m["value"] is not None]
            named = {m["metric"]: float(m["value"]) for m in mine}
            words = [
                f"{label} {named[metric]:.2f}"
                for metric, label in (
                    ("accuracy", "accuracy"),
                    ("cusum", "cusum"),
                    ("estimated_accuracy", "estimated"),
                )
                if metric in named
            ]
            drifting = sorted(
                k.split(".", 1)[1] for k, v in named.items() if k.startswith("drift.") and v > 0
            )
            if drifting:
                words.append("drifting: " + ", ".join(drifting))
            parts.append(f"v{version} " + (", ".join(words) or "collecting"))
        return f"monitor ({passes} passes): " + ("; ".join(parts) or "collecting")


class StoreWatcher:
    """Polls the loops and the production deployment; marks what changed."""

    def __init__(self, store: MetadataStore, timeline: Timeline, environment: str) -> None:
        self.store, self.timeline, self.environment = store, timeline, environment
        self._generation = 0
        self._seen: dict[int, int] = {}  # loop id -> timeline entries marked
        self.loops: list[LoopRecord] = []
        self.served: list[int] = []  # versions that answered traffic, in order

    def poll(self) -> None:
        self._deployments()
        self._loops()

    def deployment(self) -> Any:
        return self.store.deployments.get(self.environment)

    def _deployments(self) -> None:
        rows = [
            h
            for h in self.store.deployments.history(self.environment, limit=50)
            if h["generation"] > self._generation
        ]
        for h in sorted(rows, key=lambda h: h["generation"]):
            self._generation = max(self._generation, h["generation"])
            action, stable, cand = h["action"], h["stable_version"], h["candidate_version"]
            for v in (stable, cand):
                if v is not None and v not in self.served:
                    self.served.append(int(v))
            if cand is not None and h["strategy"] == "canary":
                kind = "canary"
                share = f"{h['candidate_share']:.0%}"
                text = f"canary: v{cand} takes {share} of requests next to v{stable}"
            elif action == "auto-promote":
                kind = "promoted"
                text = f"canary promoted by the servers: v{stable} is production's stable version"
            elif action == "auto-rollback":
                kind = "rolled_back"
                text = f"canary rolled back: v{stable} stays"
            else:
                kind = "deployment"
                text = f"production: {action} v{stable}"
            if h.get("reason"):
                text += f" ({h['reason']})"
            self.timeline.mark(
                kind,
                text,
                t=self.timeline.clock.at(h["at"]),
                generation=h["generation"],
                action=action,
                stable=stable,
                candidate=cand,
                actor=h.get("actor"),
            )

    def _loops(self) -> None:
        self.loops = self.store.loops.list()
        for rec in self.loops:
            seen = self._seen.get(rec.id, 0)
            for entry in rec.timeline[seen:]:
                step, status = entry.get("step"), entry.get("status")
                detail = entry.get("detail") or ""
                self.timeline.mark(
                    "loop",
                    f"loop {rec.id} {step}: {status}" + (f": {detail}" if detail else ""),
                    t=self.timeline.clock.at(entry.get("at")),
                    quiet=rec.action not in RETRAINING,
                    loop_id=rec.id,
                    alert_id=rec.alert_id,
                    step=step,
                    status=status,
                )
            self._seen[rec.id] = len(rec.timeline)

    def retrain_loop(self) -> LoopRecord | None:
        """The first loop that retrains (the demo's)."""
        return next((r for r in self.loops if r.action in RETRAINING), None)
