"""One monitoring pass: read what arrived, measure every rule, move alerts, tell people.

For each watched environment with a deployment, a pass reads the predictions and labels
logged since the carried cursor, adds them to the windows of the versions serving there
(stable, and a canary's candidate), measures every rule on each version's view, applies
each measurement to the rule's alert (``lifecycle.evaluate``), resolves the alerts of
versions that no longer serve and of scopes no longer measured (``stale_labels_s``),
notifies what the stored alert events owe (``monitor.notices``), and starts the loop of
each stable version's alert that fires with an action.

A failure in one rule, one measurement or one step is reported and logged, and the rest
goes on; what the pass carries to the next (cursor, windows, per-rule state such as the
CUSUM statistic, the notices it claims) is always written back, by compare-and-set: when
another monitor wrote first, this pass's state is dropped, it sends nothing (the winner,
or the next pass, tells what is owed), and its alert changes (each one won by
compare-and-set on the alert itself) still stand.
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

from loopline.drivers.metadata.alerts import open_key
from loopline.drivers.metadata.models import utcnow
from loopline.errors import LooplineError
from loopline.monitor.resolutions import key_of
from loopline.monitor.types import Measurement

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.alerts import AlertRecord
    from loopline.drivers.metadata.deployments import DeploymentState
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.monitor.config import AlertRule, MonitorConfig
    from loopline.monitor.lifecycle import AlertChange
    from loopline.monitor.notices import NoticePlan
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
# Reads of the stream per pass at most (each up to its limit); the rest waits a pass.
MAX_READS = 10
# A version whose reference failed to load is tried again after this (seconds).
REFERENCE_RETRY_S = 60.0
_REFERENCE_RETRY: dict[tuple[str, str, int], float] = {}  # -> monotonic time of the retry
_UNREFERENCED: set[tuple[str, str, int]] = set()  # versions whose failure was logged


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


def _err(err: BaseException) -> str:
    """``Type: first line`` of an error, at most 300 characters (a driver's error can
    carry a whole statement)."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}"[:300]


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
    measured: list[tuple[str, Measurement]] = field(default_factory=list)

    @property
    def actor(self) -> str:
        return f"loopline (monitor {self.owner})"

    def error(self, where: str, err: BaseException) -> None:
        """Report and log a failure that the rest of the pass survives."""
        self.report.errors.append(f"{where}: {_err(err)}")
        trace = None if isinstance(err, LooplineError) else err  # a bug: with its traceback
        log.error("monitor pass, %s: %s", where, _err(err), exc_info=trace)


class _Open:
    """The open alerts of one (environment, model) by dedup key, read once per pass and
    kept up to date with the pass's changes (``lifecycle.evaluate`` keeps them itself)."""

    def __init__(self, by_key: dict[str, AlertRecord]) -> None:
        self.by_key = by_key

    def apply(self, changes: list[AlertChange]) -> list[AlertChange]:
        for change in changes:
            if change.kind == "resolved":
                self.by_key.pop(key_of(change.alert), None)
            else:
                self.by_key[key_of(change.alert)] = change.alert
        return changes

    def alerts(self) -> list[AlertRecord]:
        return list(self.by_key.values())


@dataclass
class _Work:
    """What measuring one environment produced."""

    changes: list[AlertChange] = field(default_factory=list)
    measured: set[str] = field(default_factory=set)  # keys with a value this pass
    failed: set[tuple[str, int]] = field(default_factory=set)  # (rule, version) that raised


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
    from loopline.monitor import exposition, notices

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
        except Exception as err:  # one environment's failure must not stop the others
            ctx.error(environment, err)
    # The gauges Prometheus scrapes (``loopline monitor --metrics-port``); a pass with an
    # error replaces only the series it measured.
    exposition.update(ctx.measured, complete=not ctx.report.errors)
    try:
        ctx.report.notifications += notices.notify_loop_events(config, store, now=now, owner=owner)
    except Exception as err:
        ctx.error("loop notices", err)
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
    from loopline.monitor import actions, notices, resolutions, windows

    monitor = ctx.config.monitor
    env, model = dep.environment, str(dep.model_name)
    key = f"{env}/{model}"
    serving = serving_versions(dep)
    generation, state = ctx.store.monitor_state.get(key)
    max_count, max_age_s = windows.sizes_for(monitor)
    win = windows.Windows.from_state(
        state.get("windows") or {}, max_count, max_age_s, windows.detail_for(monitor)
    )
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
    seen: dict[str, str] = dict(state.get("seen") or {})
    claims: dict[str, str] = dict(state.get("notices") or {})
    work = _Work()
    plan: NoticePlan | None = None
    open_: _Open | None = None
    # Whatever fails from here on, the cursor and windows are written back: a failure
    # must not make every later pass read the same rows and fail the same way.
    measured_all = False
    try:
        open_ = _Open(ctx.store.alerts.open_for(env, model))
        _measure(ctx, dep, win, rule_states, open_, work)
        measured_all = True
    except Exception as err:
        ctx.error(key, err)
    if open_ is not None:
        try:
            work.changes += open_.apply(
                resolutions.retire(ctx.store, open_.alerts(), serving, actor=ctx.actor, now=ctx.now)
            )
            if measured_all:  # else an unmeasured scope may only be one the failure hid
                expired, seen = resolutions.expire(
                    ctx.store, open_.alerts(), work.measured, work.failed, seen,
                    limit_s=monitor.stale_labels_s, actor=ctx.actor, now=ctx.now,
                )  # fmt: skip
                work.changes += open_.apply(expired)
        except Exception as err:
            ctx.error(f"{key} resolving", err)
    try:
        plan = notices.plan_alert_notices(
            ctx.store,
            env,
            model,
            now=ctx.now,
            claims=claims,
            open_alerts=open_.alerts() if open_ is not None else None,
        )
    except Exception as err:
        ctx.error(f"{key} notices", err)
    won = ctx.store.monitor_state.put(
        key,
        {
            "cursor": new.cursor,
            "windows": win.to_state(),
            "rules": rule_states,
            "versions": serving,
            "deployment_generation": dep.generation,
            "seen": seen,
            "notices": plan.claims if plan is not None else claims,
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
    actions.act(
        ctx, dep, work.changes, open_.alerts() if open_ is not None else [], plan if won else None
    )


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


def _measure(
    ctx: _Pass,
    dep: DeploymentState,
    win: Any,
    rule_states: dict[str, dict[str, Any]],
    open_: _Open,
    work: _Work,
) -> None:
    """Measure every rule on every serving version and apply each measurement."""
    monitor = ctx.config.monitor
    env, model = dep.environment, str(dep.model_name)
    for version in serving_versions(dep):
        view = win.view(env, model, version, ctx.now, ctx.store, _reference(ctx, model, version))
        for rule in monitor.rules:
            if rule.kind == "telemetry" and version != dep.stable_version:
                continue  # devices and replicas report per environment, not per version
            rule_state = rule_states[str(version)].setdefault(rule.name, {})
            try:
                measured = measure_for(rule)(rule, view, rule_state, monitor)
            except Exception as err:  # one rule's failure must not hide the others
                work.failed.add((rule.name, version))
                ctx.error(f"{env}/{model}:{version} rule {rule.name}", err)
                continue
            for m in measured:
                ctx.measured.append((rule.name, m))
                ctx.report.measurements.append({"rule": rule.name, **m.to_dict()})
                if m.value is not None and not (m.evidence or {}).get("stale"):
                    work.measured.add(
                        open_key(rule.name, m.environment, m.model_name, m.model_version, m.scope)
                    )
                try:
                    changes = _evaluate(ctx, rule, m, open_)
                except Exception as err:  # nor one measurement's the rest
                    ctx.error(f"{env}/{model}:{version} rule {rule.name} ({m.scope})", err)
                    continue
                work.changes += changes


def _evaluate(ctx: _Pass, rule: AlertRule, m: Measurement, open_: _Open) -> list[AlertChange]:
    """``lifecycle.evaluate`` on the pass's open alerts (which it keeps up to date)."""
    from loopline.monitor import lifecycle

    return lifecycle.evaluate(ctx.store, rule, m, ctx.now, open_alerts=open_.by_key)


def _reference(ctx: _Pass, model: str, version: int) -> Reference | None:
    """The version's reference; None (its label-free rules no-data) when it has none or it
    fails to load: the failure is logged once and not tried again for a while."""
    from loopline.monitor import reference

    key = (ctx.store.url, model, version)
    if time.monotonic() < _REFERENCE_RETRY.get(key, float("-inf")):
        return None
    try:
        ref = reference.load_reference(ctx.store, ctx.artifacts, model, version)
    except Exception as err:  # a broken bundle must not stop the pass
        _REFERENCE_RETRY[key] = time.monotonic() + REFERENCE_RETRY_S
        if key not in _UNREFERENCED:
            _UNREFERENCED.add(key)
            log.warning(
                "no reference for %s:%s (label-free rules are no-data): %s",
                model,
                version,
                _err(err),
            )
        return None
    _REFERENCE_RETRY.pop(key, None)
    return ref
