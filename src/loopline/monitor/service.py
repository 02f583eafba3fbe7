"""The monitoring service: passes on a schedule, loops advanced beside them.

``run`` runs ``run_pass`` (``monitor.passes``) every interval. Open loops (retrains, waits
for approval, canaries) are advanced by one worker thread, so passes go on, and alerts
keep moving, while a build runs. SIGTERM or SIGINT stops it cleanly: the pass under way
finishes, and a loop in the middle of a step is left to resume (its heartbeat goes
stale and the next monitor takes it over). A pass that crashes is logged and the next
one runs.

``alert_report`` is what ``loopline alerts show`` prints: an alert, its events, and the
chain its loop made (dataset version, run, model version, replica test, deployment).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loopline.drivers.metadata.models import utcnow
from loopline.errors import LooplineError, NotFound
from loopline.monitor.notices import notify_loop_events
from loopline.monitor.passes import (
    MEASURES,
    PassReport,
    default_owner,
    measure_for,
    run_pass,
    serving_versions,
)

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

__all__ = [
    "MEASURES",
    "PassReport",
    "advance_loops",
    "alert_report",
    "default_owner",
    "measure_for",
    "notify_loop_events",
    "run",
    "run_pass",
    "serving_versions",
]

log = logging.getLogger("loopline.monitor")
# How long a stopping monitor waits for the loop step under way before leaving it to resume.
STOP_WAIT_S = 10.0


def advance_loops(
    config: Config,
    store: MetadataStore,
    artifacts: ArtifactStore,
    *,
    owner: str,
    reporter: Any = None,
    stop: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Advance every open loop once (each until it must wait or is done).

    Returns one entry per loop whose status or step moved, or whose advance failed (the
    error is recorded, and the loop is tried again next time).
    """
    from loopline.monitor import loop

    out: list[dict[str, Any]] = []
    for rec in loop.open_loops(store):
        if stop is not None and stop.is_set():
            break
        before = (rec.status, rec.step)
        try:
            after = loop.advance(config, store, artifacts, rec.id, owner=owner, reporter=reporter)
        except Exception as err:  # a loop's failure is its own; the others go on
            if not isinstance(err, LooplineError):
                log.exception("loop %s (alert %s)", rec.id, rec.alert_id)
            out.append(
                {
                    "loop_id": rec.id,
                    "alert_id": rec.alert_id,
                    "event": "error",
                    "error": f"{type(err).__name__}: {err}",
                }
            )
            continue
        if (after.status, after.step) != before:
            out.append(
                {
                    "loop_id": after.id,
                    "alert_id": after.alert_id,
                    "event": "advanced",
                    "action": after.action,
                    "status": after.status,
                    "step": after.step,
                    "was": {"status": before[0], "step": before[1]},
                }
            )
    return out


class _LoopWorker(threading.Thread):
    """Advances open loops every interval, or at once when woken; reports into a queue."""

    def __init__(
        self,
        config: Config,
        store: MetadataStore,
        artifacts: ArtifactStore,
        *,
        owner: str,
        reporter: Any,
        interval_s: float,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="loopline-loops", daemon=True)
        self.config, self.store, self.artifacts = config, store, artifacts
        self.owner, self.reporter, self.interval_s, self.stop = owner, reporter, interval_s, stop
        self.wake = threading.Event()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for item in advance_loops(
                    self.config,
                    self.store,
                    self.artifacts,
                    owner=self.owner,
                    reporter=self.reporter,
                    stop=self.stop,
                ):
                    self.events.put(item)
            except Exception as err:  # the store away for a moment: try again next time
                log.exception("advancing loops")
                self.events.put({"event": "error", "error": f"{type(err).__name__}: {err}"})
            self.wake.wait(self.interval_s)
            self.wake.clear()

    def drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out


def run(
    config: Config,
    *,
    interval_s: float | None = None,
    once: bool = False,
    stop: threading.Event | None = None,
    reporter: Any = None,
    owner: str | None = None,
    on_pass: Callable[[PassReport], None] | None = None,
    store: MetadataStore | None = None,
    artifacts: ArtifactStore | None = None,
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
) -> PassReport | None:
    """Run passes every ``interval_s`` (default ``monitor.interval_s``) until ``stop``.

    With ``once``, one pass, then every open loop advanced in this thread, and the last
    report returned. ``on_pass`` gets each pass's report (the loops the worker moved since
    the previous pass in ``loops``); ``reporter`` is given to the builds loops run.
    SIGTERM and SIGINT set ``stop`` when this runs in the main thread. With
    ``metrics_port``, the rules' current values are served for Prometheus at
    ``http://metrics_addr:metrics_port/metrics`` (``monitor.exposition``).
    """
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    store = store or MetadataStore(config.metadata_url())
    artifacts = artifacts or ArtifactStore(config.artifacts_url())
    owner = owner or default_owner()
    interval = interval_s if interval_s is not None else config.monitor.interval_s
    if once:
        report = _guarded_pass(config, store, artifacts, owner)
        report.loops += advance_loops(config, store, artifacts, owner=owner, reporter=reporter)
        report.notifications += notify_loop_events(config, store, owner=owner)
        if on_pass is not None:
            on_pass(report)
        return report
    stop = stop or threading.Event()
    from loopline.monitor import exposition

    server = exposition.serve(metrics_port, metrics_addr) if metrics_port is not None else None
    restore = _on_signals(stop)
    worker = _LoopWorker(
        config, store, artifacts, owner=owner, reporter=reporter, interval_s=interval, stop=stop
    )
    worker.start()
    last: PassReport | None = None
    try:
        while not stop.is_set():
            started = time.monotonic()
            last = _guarded_pass(config, store, artifacts, owner)
            last.loops = worker.drain() + last.loops
            if any(item.get("event") == "started" for item in last.loops):
                worker.wake.set()
            if on_pass is not None:
                on_pass(last)
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
    finally:
        stop.set()
        worker.wake.set()
        worker.join(STOP_WAIT_S)
        restore()
        if server is not None:
            server.shutdown()
    return last


def _guarded_pass(
    config: Config, store: MetadataStore, artifacts: ArtifactStore, owner: str
) -> PassReport:
    """A pass; a crash is logged and reported, and the schedule goes on."""
    try:
        return run_pass(config, store, artifacts, owner=owner)
    except Exception as err:
        log.exception("monitor pass failed")
        return PassReport(at=utcnow(), owner=owner, errors=[f"{type(err).__name__}: {err}"])


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM and SIGINT set ``stop`` (a second one acts as usual); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: Any) -> None:
        log.info("monitor: stopping after this pass (signal %s)", signum)
        stop.set()
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def alert_report(store: MetadataStore, alert_id: int) -> dict[str, Any]:
    """The alert, its events, its loop, and the chain the loop made, with times.

    ``chain`` is ordered alert → dataset version → run → model version → replica test →
    deployment; a link the loop has not reached yet is left out.
    """
    alert = store.alerts.get(alert_id)
    if alert is None:
        raise NotFound(f"no alert {alert_id}; list them with `loopline alerts --all`")
    rec = store.loops.get_by_alert(alert_id)
    out: dict[str, Any] = {
        "alert": alert.to_dict(),
        "events": store.alerts.events(alert_id),
        "loop": rec.to_dict() if rec is not None else None,
    }
    out["chain"] = _chain(store, alert, rec)
    return out


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _chain(store: MetadataStore, alert: Any, rec: Any) -> list[dict[str, Any]]:
    chain: list[dict[str, Any]] = [
        {
            "kind": "alert",
            "id": alert.id,
            "at": _iso(alert.fired_at or alert.started_at),
            "text": f"{alert.rule}: {alert.metric} {alert.op} {alert.threshold:g} on "
            f"{alert.environment} {alert.model_name}:{alert.model_version} ({alert.scope})",
        }
    ]
    if rec is None:
        return chain
    if rec.dataset_version:
        link: dict[str, Any] = {"kind": "dataset_version", "id": rec.dataset_version}
        try:
            ds = store.datasets.get(rec.dataset_version)
            link |= {
                "at": _iso(ds.created_at),
                "text": f"{ds.n_records} records from {ds.source_uri}",
            }
        except NotFound:
            pass
        chain.append(link)
    if rec.run_id:
        link = {"kind": "run", "id": rec.run_id}
        try:
            run_ = store.runs.get(rec.run_id)
            link |= {
                "at": _iso(run_.started_at),
                "finished_at": _iso(run_.finished_at),
                "text": f"{run_.status} (trigger {run_.trigger})",
            }
        except NotFound:
            pass
        chain.append(link)
    if rec.model_version is not None:
        link = {"kind": "model_version", "id": f"{rec.model_name}:{rec.model_version}"}
        try:
            mv = store.models.get(rec.model_name, rec.model_version)
            acc = (mv.metrics or {}).get("accuracy")
            link |= {
                "at": _iso(mv.created_at),
                "text": f"accuracy {acc:.3f}" if isinstance(acc, float) else "",
            }
        except NotFound:
            pass
        chain.append(link)
    if rec.replica_test_id:
        link = {"kind": "replica_test", "id": rec.replica_test_id}
        test = _replica_test(store, rec.replica_test_id)
        if test is not None:
            link |= {
                "at": _iso(test.started_at),
                "finished_at": _iso(test.finished_at),
                "text": ("passed" if test.passed else "failed: " + "; ".join(test.reasons or []))
                + f" in {test.environment}",
            }
        chain.append(link)
    if rec.deployment_generation is not None:
        chain += _deployment_links(store, rec)
    return chain


def _replica_test(store: MetadataStore, test_id: str) -> Any:
    """The replica test with this id, or None (one SELECT by primary key)."""
    from sqlalchemy.orm import Session

    from loopline.drivers.metadata.models import ReplicaTest

    with Session(store.engine) as s:
        return s.get(ReplicaTest, test_id)


def _deployment_links(store: MetadataStore, rec: Any) -> list[dict[str, Any]]:
    """The release the loop made (generation ``deployment_generation``) and, when it was a
    canary, the change after it that made the candidate the stable version."""
    history = sorted(
        store.deployments.history(rec.environment, limit=1000), key=lambda h: h["generation"]
    )
    out: list[dict[str, Any]] = []
    for h in history:
        if h["generation"] < rec.deployment_generation:
            continue
        released = h["generation"] == rec.deployment_generation
        serves = rec.model_version is not None and h["stable_version"] == rec.model_version
        if not (released or serves):
            continue
        text = f"{h['action']}: stable {h['model_name']}:{h['stable_version']}"
        if h["candidate_version"] is not None:
            text += f", {h['strategy']} {h['model_name']}:{h['candidate_version']}"
            text += f" {h['candidate_share']:.0%}"
        out.append(
            {
                "kind": "deployment",
                "id": f"{rec.environment}@{h['generation']}",
                "at": h["at"],
                "text": text,
            }
        )
        if serves:
            break
    return out or [{"kind": "deployment", "id": f"{rec.environment}@{rec.deployment_generation}"}]
