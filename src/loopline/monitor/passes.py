"""One monitoring pass: read what arrived, measure every rule, move alerts, tell people.

For each watched environment with a deployment, a pass reads the predictions and labels
logged since the carried cursor, adds them to the windows of the versions serving there
(stable, and a canary's candidate), measures every rule on each version's view, applies
each measurement to the rule's alert (``lifecycle.evaluate``), notifies the channels of the
alerts that fired or resolved (unless inhibited), and starts the loop of each stable
version's alert that fired with an action. What it carries to the next pass (cursor,
windows, per-rule state such as the CUSUM statistic) is written back by compare-and-set:
when another monitor wrote first, this pass's state is dropped, and its alert changes
(each one won by compare-and-set on the alert itself) still stand.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loopline.drivers.metadata.models import utcnow
from loopline.errors import LooplineError
from loopline.monitor.types import Measurement

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.deployments import DeploymentState
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.monitor.config import AlertRule, MonitorConfig
    from loopline.monitor.lifecycle import AlertChange
    from loopline.monitor.reference import Reference
    from loopline.monitor.types import VersionView

log = logging.getLogger("loopline.monitor")

MeasureFn = Callable[
    ["AlertRule", "VersionView", dict[str, Any], "MonitorConfig"], list[Measurement]
]

# Which module measures a rule: by ``rule.kind``, except that label-free rules dispatch on
# the metric (the estimate, or one of the drift tests).
MEASURES: dict[str, str] = {
    "labelled": "loopline.monitor.performance",
    "sequential": "loopline.monitor.cusum",
    "estimated_accuracy": "loopline.monitor.estimate",
    "drift": "loopline.monitor.drift",
    "telemetry": "loopline.monitor.telemetry",
}
# Loop statuses people are told about, by the kind of notice.
LOOP_NOTICES = {
    "waiting_approval": "awaiting-approval",
    "rejected": "retrain-rejected",
    "succeeded": "redeployed",
    "failed": "retrain-failed",
}
# Loops that finished longer ago than this are not looked at again for a notice.
LOOP_NOTICE_HORIZON_S = 86_400.0
_UNREFERENCED: set[tuple[str, str, int]] = set()  # versions whose reference failed to load
# Reads of the stream per pass at most (each up to its limit); the rest waits a pass.
MAX_READS = 10
# Actions whose loop retrains (and so may end in a redeploy).
RETRAINING = ("retrain", "approve")
# The event that marks a (canary's) alert as one that starts no loop.
NOT_STARTED = "loop.not_started"


def default_owner() -> str:
    """``host:pid``: who holds a loop, and who wrote an alert event."""
    return f"{socket.gethostname()}:{os.getpid()}"


def measure_for(rule: AlertRule) -> MeasureFn:
    """The ``measure`` function of the module that measures ``rule``."""
    kind = rule.kind
    if kind == "unlabelled":
        kind = "estimated_accuracy" if rule.metric == "estimated_accuracy" else "drift"
    fn: MeasureFn = importlib.import_module(MEASURES[kind]).measure
    return fn


@dataclass
class PassReport:
    """What one pass saw and did, JSON-ready through ``to_dict``."""

    at: datetime
    owner: str
    seconds: float = 0.0
    environments: list[dict[str, Any]] = field(default_factory=list)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    loops: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["at"] = self.at.isoformat()
        out["seconds"] = round(self.seconds, 4)
        return out


@dataclass
class _Pass:
    """What every environment of one pass shares."""

    config: Config
    store: MetadataStore
    artifacts: ArtifactStore
    now: datetime
    owner: str
    report: PassReport
    notes: dict[int, str] = field(default_factory=dict)  # alert id -> what to add to a notice
    measured: list[tuple[str, Measurement]] = field(default_factory=list)

    @property
    def actor(self) -> str:
        return f"loopline (monitor {self.owner})"


def run_pass(
    config: Config,
    store: MetadataStore,
    artifacts: ArtifactStore,
    *,
    now: datetime | None = None,
    owner: str | None = None,
) -> PassReport:
    """One monitoring pass over every environment in ``config.monitor.environments``.

    An environment without a deployment is skipped; an error in one environment is
    recorded in the report (and logged) and the others still run.
    """
    started = time.perf_counter()
    owner = owner or default_owner()
    now = now or utcnow()
    ctx = _Pass(config, store, artifacts, now, owner, PassReport(now, owner))
    for environment in config.monitor.environments:
        dep = store.deployments.get(environment)
        if dep is None or dep.model_name is None or dep.stable_version is None:
            ctx.report.environments.append({"environment": environment, "deployed": False})
            continue
        try:
            _environment(ctx, dep)
        except LooplineError as err:
            ctx.report.errors.append(f"{environment}: {err}")
            log.error("monitor pass, %s: %s", environment, err)
        except Exception as err:  # one environment's bug must not stop the others
            ctx.report.errors.append(f"{environment}: {type(err).__name__}: {err}")
            log.exception("monitor pass, %s", environment)
    from loopline.monitor import exposition

    # The gauges Prometheus scrapes (``loopline monitor --metrics-port``); a pass with an
    # error replaces only the series it measured.
    exposition.update(ctx.measured, complete=not ctx.report.errors)
    try:
        ctx.report.notifications += notify_loop_events(config, store, now=ctx.now, owner=owner)
    except Exception as err:
        ctx.report.errors.append(f"loop notices: {type(err).__name__}: {err}")
        log.exception("monitor pass, loop notices")
    ctx.report.seconds = time.perf_counter() - started
    return ctx.report


def serving_versions(dep: DeploymentState) -> list[int]:
    """The versions answering clients: stable, and the candidate of a canary (a shadow's
    answers never reach a client, and the stream leaves them out)."""
    out = [dep.stable_version] if dep.stable_version is not None else []
    if dep.strategy == "canary" and dep.candidate_version is not None:
        out.append(dep.candidate_version)
    return list(dict.fromkeys(out))


def _segments(monitor: MonitorConfig) -> list[str]:
    cols = list(monitor.segments)
    for rule in monitor.rules:
        cols += rule.segment_by or []
    return list(dict.fromkeys(cols))


def _environment(ctx: _Pass, dep: DeploymentState) -> None:
    from loopline.monitor import lifecycle, windows

    monitor = ctx.config.monitor
    env, model = dep.environment, str(dep.model_name)
    key = f"{env}/{model}"
    serving = serving_versions(dep)
    generation, state = ctx.store.monitor_state.get(key)
    max_count, max_age_s = windows.sizes_for(monitor)
    win = windows.Windows.from_state(state.get("windows") or {}, max_count, max_age_s)
    win.keep_versions(serving)  # a version that serves again starts afresh
    new = _read_new(ctx, env, model, state.get("cursor"))
    new = dataclasses.replace(
        new,
        outcomes=[o for o in new.outcomes if o.model_version in serving],
        logged=[r for r in new.logged if r.model_version in serving],
    )
    win.add(new)
    old_rules: dict[str, dict[str, Any]] = state.get("rules") or {}
    rule_states: dict[str, dict[str, Any]] = {str(v): old_rules.get(str(v), {}) for v in serving}
    changes: list[AlertChange] = []
    for version in serving:
        view = win.view(env, model, version, ctx.now, ctx.store, _reference(ctx, model, version))
        for rule in monitor.rules:
            if rule.kind == "telemetry" and version != dep.stable_version:
                continue  # devices and replicas report per environment, not per version
            rule_state = rule_states[str(version)].setdefault(rule.name, {})
            try:
                measured = measure_for(rule)(rule, view, rule_state, monitor)
            except Exception as err:  # one rule's failure must not hide the others
                ctx.report.errors.append(f"{key}:{version} rule {rule.name}: {err}")
                log.exception("monitor rule %s on %s:%s", rule.name, model, version)
                continue
            for m in measured:
                ctx.measured.append((rule.name, m))
                ctx.report.measurements.append({"rule": rule.name, **m.to_dict()})
                changes += lifecycle.evaluate(ctx.store, rule, m, ctx.now)
    changes += _retire(ctx, env, model, serving)
    won = ctx.store.monitor_state.put(
        key,
        {
            "cursor": new.cursor,
            "windows": win.to_state(),
            "rules": rule_states,
            "versions": serving,
            "deployment_generation": dep.generation,
            "at": ctx.now.isoformat(),
        },
        generation,
    )
    ctx.report.environments.append(
        {
            "environment": env,
            "model": model,
            "deployed": True,
            "versions": serving,
            "stable": dep.stable_version,
            "new_outcomes": len(new.outcomes),
            "new_logged": len(new.logged),
            "state": "saved" if won else "conflict",
        }
    )
    if not won:
        log.info("monitor state %s was written by another monitor meanwhile; dropped ours", key)
    _act(ctx, dep, changes)


def _read_new(ctx: _Pass, env: str, model: str, cursor: dict[str, Any] | None) -> Any:
    """Everything since ``cursor``, in as many reads as the stream's limit takes."""
    from loopline.monitor import stream

    monitor = ctx.config.monitor
    segments = _segments(monitor)
    new = stream.read_new(ctx.store, env, model, cursor, segments, monitor.late_s)
    for _ in range(MAX_READS - 1):
        if not new.more:
            break
        more = stream.read_new(ctx.store, env, model, new.cursor, segments, monitor.late_s)
        more.outcomes[:0], more.logged[:0] = new.outcomes, new.logged
        new = more
    return new


def _reference(ctx: _Pass, model: str, version: int) -> Reference | None:
    from loopline.monitor import reference

    try:
        return reference.load_reference(ctx.store, ctx.artifacts, model, version)
    except LooplineError as err:  # said once per process and version, not every pass
        if (ctx.store.url, model, version) not in _UNREFERENCED:
            _UNREFERENCED.add((ctx.store.url, model, version))
            log.warning(
                "no reference for %s:%s (label-free rules are no-data): %s", model, version, err
            )
        return None


def _retire(ctx: _Pass, env: str, model: str, serving: list[int]) -> list[AlertChange]:
    """Resolve the open alerts of versions that no longer serve in ``env``."""
    from loopline.monitor.lifecycle import AlertChange

    out: list[AlertChange] = []
    for alert in ctx.store.alerts.list(state="open", environment=env, model_name=model, limit=1000):
        if alert.model_version is None or alert.model_version in serving:
            continue
        why = f"{model}:{alert.model_version} no longer serves in {env}."
        done = ctx.store.alerts.transition(
            alert.id,
            alert.state,
            "resolved",
            value=alert.value,
            samples=alert.samples,
            message=why,
            actor=ctx.actor,
            at=ctx.now,
        )
        if done is not None:
            ctx.notes[done.id] = why
            out.append(AlertChange(alert=done, kind="resolved", previous=alert.state))
    return out


def _act(ctx: _Pass, dep: DeploymentState, changes: list[AlertChange]) -> None:
    """Record the changes; notify the channels; start the loops of firing alerts."""
    from loopline.monitor import lifecycle

    env, model = dep.environment, str(dep.model_name)
    firing = ctx.store.alerts.list(state="firing", environment=env, model_name=model, limit=1000)
    for change in changes:
        a = change.alert
        muted = lifecycle.inhibited(change, [*firing, *changes])
        ctx.report.changes.append(
            {
                "alert_id": a.id,
                "kind": change.kind,
                "previous": change.previous,
                "rule": a.rule,
                "metric": a.metric,
                "environment": a.environment,
                "model": a.model_name,
                "version": a.model_version,
                "scope": a.scope,
                "severity": a.severity,
                "op": a.op,
                "threshold": a.threshold,
                "value": a.value,
                "samples": a.samples,
                "action": a.action,
                "inhibited": muted,
            }
        )
        loud = change.kind == "firing" or (
            change.kind == "resolved" and change.previous == "firing"
        )
        if not loud:
            continue
        if muted:
            ctx.store.alerts.add_event(
                a.id,
                "inhibited",
                "notification inhibited by a firing critical global alert of this version",
                ctx.actor,
                {},
            )
            continue
        ctx.report.notifications.append(
            notify(ctx.config, ctx.store, a, change.kind, ctx.notes.get(a.id, ""), actor=ctx.actor)
        )
    # Every firing alert of the stable version with an action gets its loop, once: also one
    # whose loop a crash kept from starting at the transition.
    for a in [*firing, *(c.alert for c in changes if c.kind == "firing")]:
        if a.action != "none":
            _start_loop(ctx, dep, a)


def _start_loop(ctx: _Pass, dep: DeploymentState, alert: Any) -> None:
    """The loop of a firing alert, once (``loop.start`` is idempotent and applies the
    retrain cooldown); a canary's alert is marked never to start one."""
    from loopline.monitor import loop

    if any(item.get("alert_id") == alert.id for item in ctx.report.loops):
        return
    if ctx.store.loops.get_by_alert(alert.id) is not None:
        return
    if alert.model_version != dep.stable_version:
        if any(e["kind"] == NOT_STARTED for e in ctx.store.alerts.events(alert.id)):
            return
        reason = (
            f"{alert.model_name}:{alert.model_version} is a canary: its alerts start no loop "
            "(the canary's verdict promotes or rolls it back)"
        )
        ctx.store.alerts.add_event(alert.id, NOT_STARTED, reason, ctx.actor, {})
        ctx.report.loops.append({"alert_id": alert.id, "event": "skipped", "reason": reason})
        return
    rec = loop.start(ctx.store, alert, ctx.config)
    ctx.report.loops.append({"alert_id": alert.id, "event": "started", **_loop_summary(rec)})


def _aware(ts: datetime) -> datetime:
    from datetime import UTC

    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _loop_summary(rec: Any) -> dict[str, Any]:
    return {
        "loop_id": rec.id,
        "alert_id": rec.alert_id,
        "action": rec.action,
        "status": rec.status,
        "step": rec.step,
    }


def notify(
    config: Config,
    store: MetadataStore,
    alert: Any,
    kind: str,
    message: str,
    *,
    actor: str,
    loop: Any = None,
) -> dict[str, Any]:
    """Send one notice to every channel and record it as a ``notified`` alert event."""
    from loopline.monitor import channels

    details: dict[str, Any] = {}
    if loop is not None:
        details = {
            "loop_id": loop.id,
            "loop_status": loop.status,
            "step": loop.step,
            "candidate_version": loop.model_version,
        }
    notice = channels.AlertNotice(
        alert=alert.to_dict(),
        kind=kind,
        message=message,
        owner=config.monitor.owner,
        details=details,
    )
    results = channels.notify(config.monitor.channels, notice)
    line = channels.render_line(notice)
    store.alerts.add_event(
        alert.id, "notified", line, actor, {"kind": kind, "channels": results, **details}
    )
    return {"alert_id": alert.id, "kind": kind, "message": line, "channels": results}


def notify_loop_events(
    config: Config, store: MetadataStore, *, now: datetime | None = None, owner: str | None = None
) -> list[dict[str, Any]]:
    """Tell the channels what loops reported: awaiting approval, rejected, redeployed,
    failed; once per loop and status (the ``notified`` event's ``loop_status`` marks it)."""
    now = now or utcnow()
    actor = f"loopline (monitor {owner or default_owner()})"
    out: list[dict[str, Any]] = []
    for rec in store.loops.list():
        kind = loop_notice(rec)
        if kind is None:
            continue
        if rec.finished_at is not None and (now - _aware(rec.finished_at)).total_seconds() > (
            LOOP_NOTICE_HORIZON_S
        ):
            continue
        if any(
            e["kind"] == "notified" and e["details"].get("loop_status") == rec.status
            for e in store.alerts.events(rec.alert_id)
        ):
            continue
        alert = store.alerts.get(rec.alert_id)
        if alert is not None:
            out.append(
                notify(config, store, alert, kind, loop_message(alert, rec), actor=actor, loop=rec)
            )
    return out


def loop_notice(rec: Any) -> str | None:
    """The notice a loop's status calls for, or None (a notify loop, a skipped retrain and
    a closed imported model's loop have nothing more to say)."""
    if rec.status == "succeeded" and (
        rec.action not in RETRAINING or rec.state.get("skipped") or rec.state.get("imported")
    ):
        return None
    return LOOP_NOTICES.get(rec.status)


def loop_message(alert: Any, rec: Any) -> str:
    """The sentence people get when a loop waits for them, or ends."""
    name, ver = alert.model_name, rec.model_version
    cand = f"{name}:{ver}" if ver is not None else "the candidate"
    if rec.status == "waiting_approval":
        if rec.reason:  # the loop says what it waits for
            return str(rec.reason)
        return (
            f"{cand} passed the gate against {name}:{rec.incumbent_version}; approve with "
            f"`loopline approve {alert.id}` or reject with `loopline reject {alert.id} "
            "--reason TEXT`."
        )
    if rec.status == "rejected":
        why = rec.reason or "no reason given"
        return f"{cand} was rejected ({why}); {rec.environment} stays on the incumbent."
    if rec.status == "succeeded":
        return f"{cand} now serves {rec.environment}; the loop of alert {alert.id} is closed."
    return f"The loop failed at step {rec.step}: {rec.reason or 'see its timeline'}."
