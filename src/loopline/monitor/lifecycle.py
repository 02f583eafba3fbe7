"""The alert lifecycle: how one measurement moves its alert (Prometheus ``for:`` and
Grafana's Normal/Pending/Alerting/NoData, with hysteresis and a cooldown).

``evaluate`` applies one measurement of one rule:

- no-data (``value`` None, or ``evidence["stale"]``: labels stopped coming) changes nothing:
  it never opens and never resolves;
- nothing open and the condition holds: open *pending*, or *firing* at once when
  ``for_s == 0`` (the events say pending then firing; the change says firing), unless an
  alert of the same key (rule, environment, model, version, scope) fired and then resolved
  less than ``cooldown_s`` ago; an alert resolved because its version stopped serving
  (``retired``) or ``expired`` starts no cooldown, so a new version's alerts are never muted
  by the old one's;
- *pending*: the condition held ``for_s`` since it opened → *firing*; the condition no
  longer holds → *resolved* (it never fired);
- *firing*: resolved only when the resolve condition holds (hysteresis): the resolve value
  (``evidence["resolve_value"]`` over ``resolve_window`` when the metric gives one, with
  ``evidence["resolve_samples"] >= min_samples``, else the value) compared with
  ``resolve_threshold`` the other way round (``accuracy >= 0.50`` for ``accuracy < 0.40``),
  and the condition itself no longer holds;
- otherwise the open alert's value and samples are updated (no event), and only when
  they changed; its details (window and evidence) are rewritten on a state change and at
  most every ``EVIDENCE_EVERY_S`` seconds otherwise, so a steady pass writes little.

A pass hands ``open_alerts`` (``store.alerts.open_for(environment, model)``, by
``open_key``) to every evaluation: the open alert is then looked up there instead of one
SELECT per measurement, and ``evaluate`` keeps the dict up to date with what it changed.

Deduplication is the store's: one open alert per (rule, environment, model, version,
scope) by a unique key, and every transition a compare-and-set, so two evaluations of the
same condition, in threads or processes, never open two alerts or fire one twice. A stale
``open_alerts`` entry (another monitor moved the alert meanwhile) only makes a
compare-and-set fail; the entry is then read again for the next evaluation.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loopline.drivers.metadata.alerts import AlertRecord, open_key
from loopline.monitor.types import GLOBAL, Measurement

if TYPE_CHECKING:
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.monitor.config import AlertRule

KINDS = ("pending", "firing", "resolved")
OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
# The resolve condition: the opposite comparison, against the resolve threshold.
OPPOSITE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<"}
# An open alert's details (the evidence) are rewritten at most this often between state
# changes; its value and samples whenever they change.
EVIDENCE_EVERY_S = 60.0


@dataclass(frozen=True)
class AlertChange:
    """One transition ``evaluate`` made: ``kind`` is pending, firing or resolved;
    ``previous`` the state before (None for an alert it opened)."""

    alert: AlertRecord
    kind: str
    previous: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"alert": self.alert.to_dict(), "kind": self.kind, "previous": self.previous}


def holds(op: str, value: float, threshold: float) -> bool:
    """``value op threshold``."""
    return OPS[op](value, threshold)


def resolve_holds(rule: AlertRule, measurement: Measurement) -> bool:
    """Whether a firing alert of ``rule`` may resolve on ``measurement`` (hysteresis)."""
    value = measurement.value
    if value is None or holds(rule.op, value, rule.threshold):
        return False
    evidence = measurement.evidence or {}
    if "resolve_value" in evidence:
        value = evidence.get("resolve_value")
        samples = evidence.get("resolve_samples", measurement.samples)
        if value is None or int(samples or 0) < rule.min_samples:
            return False  # no-data over the resolve window: keep firing
    threshold = rule.threshold if rule.resolve_threshold is None else rule.resolve_threshold
    return holds(OPPOSITE[rule.op], float(value), threshold)


def _message(rule: AlertRule, m: Measurement, kind: str) -> str:
    where = f"{m.model_name}:{m.model_version} in {m.environment}"
    if m.scope != GLOBAL:
        where += f" ({m.scope})"
    value = "no data" if m.value is None else f"{m.value:.4g}"
    return (
        f"{rule.name} {kind}: {rule.metric} = {value} over {m.samples} samples "
        f"({rule.metric} {rule.op} {rule.threshold:g}) on {where}"
    )


def _seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def _evidence_due(current: AlertRecord, now: datetime) -> bool:
    at = current.details.get("evidence_at")
    try:
        written = datetime.fromisoformat(at) if isinstance(at, str) else None
    except ValueError:
        written = None
    if written is None or written.tzinfo is None:
        return True
    return _seconds(now, written) >= EVIDENCE_EVERY_S


def evaluate(
    store: MetadataStore,
    rule: AlertRule,
    measurement: Measurement,
    now: datetime,
    *,
    open_alerts: dict[str, AlertRecord] | None = None,
) -> list[AlertChange]:
    """Apply one measurement of ``rule`` at ``now`` (aware); the changes it made.

    ``open_alerts``: the open alerts of the measurement's environment and model by
    ``open_key`` (``store.alerts.open_for``), read once per pass; kept up to date here.
    Without it the open alert is read from the store.
    """
    m = measurement
    if m.value is None or (m.evidence or {}).get("stale"):
        return []
    alerts = store.alerts
    key = open_key(rule.name, m.environment, m.model_name, m.model_version, m.scope)
    if open_alerts is None:
        current = alerts.find_open(rule.name, m.environment, m.model_name, m.model_version, m.scope)
    else:
        current = open_alerts.get(key)
    condition = holds(rule.op, m.value, rule.threshold)
    details = {"window": m.window, "evidence": m.evidence, "evidence_at": now.isoformat()}

    def refresh() -> None:  # a compare-and-set lost: the dict's entry was stale
        if open_alerts is not None:
            fresh = alerts.find_open(
                rule.name, m.environment, m.model_name, m.model_version, m.scope
            )
            if fresh is None:
                open_alerts.pop(key, None)
            else:
                open_alerts[key] = fresh

    if current is None:
        if not condition:
            return []
        last = alerts.last_resolved(rule.name, m.environment, m.model_name, m.model_version,
                                    m.scope)  # fmt: skip
        if (
            rule.cooldown_s > 0
            and last is not None
            and last.resolved_at is not None
            and _seconds(now, last.resolved_at) < rule.cooldown_s
        ):
            return []
        state = "firing" if rule.for_s <= 0 else "pending"
        opened = alerts.open_alert(
            rule.name, rule.metric, m.environment, m.model_name, m.model_version, m.scope,
            rule.severity, rule.op, rule.threshold, m.value, m.samples, rule.action, state,
            details, message=_message(rule, m, state), at=now,
        )  # fmt: skip
        if opened is None:
            refresh()
            return []
        if open_alerts is not None:
            open_alerts[key] = opened
        return [AlertChange(opened, state, None)]

    new_state: str | None = None
    if current.state == "pending":
        if not condition:
            new_state = "resolved"
        elif _seconds(now, current.started_at) >= rule.for_s:
            new_state = "firing"
    elif current.state == "firing" and resolve_holds(rule, m):
        new_state = "resolved"

    if new_state is None:
        if current.value == m.value and current.samples == m.samples:
            return []  # nothing new to write
        evidence = details if _evidence_due(current, now) else None
        if alerts.update_value(current.id, current.state, value=m.value, samples=m.samples,
                               at=now, details=evidence):  # fmt: skip
            if open_alerts is not None:
                open_alerts[key] = replace(
                    current, value=m.value, samples=m.samples, updated_at=now,
                    details=current.details if evidence is None else evidence,
                )  # fmt: skip
        else:
            refresh()
        return []
    changed = alerts.transition(
        current.id, current.state, new_state, value=m.value, samples=m.samples,
        message=_message(rule, m, new_state), at=now, details={"evidence": m.evidence},
        alert_details=details,
    )  # fmt: skip
    if changed is None:
        refresh()
        return []
    if open_alerts is not None:
        if changed.is_open:
            open_alerts[key] = changed
        else:
            open_alerts.pop(key, None)
    return [AlertChange(changed, new_state, current.state)]


def _alert(item: AlertRecord | AlertChange) -> AlertRecord:
    return item.alert if isinstance(item, AlertChange) else item


def inhibits(inhibitor: AlertRecord, alert: AlertRecord) -> bool:
    """Whether ``inhibitor`` (a firing critical global alert) silences ``alert``: a
    warning or info alert, or any per-segment alert, of the same version."""
    return (
        inhibitor.id != alert.id
        and inhibitor.state == "firing"
        and inhibitor.severity == "critical"
        and inhibitor.scope == GLOBAL
        and (inhibitor.environment, inhibitor.model_name, inhibitor.model_version)
        == (alert.environment, alert.model_name, alert.model_version)
        and (alert.severity != "critical" or alert.scope != GLOBAL)
    )


def inhibited(
    change: AlertChange | AlertRecord, open_alerts: Iterable[AlertRecord | AlertChange]
) -> bool:
    """Whether the notification of ``change`` is inhibited by one of ``open_alerts``.

    A firing critical global alert of a version inhibits the notifications of the warnings
    and per-segment alerts of that version (Alertmanager's inhibition); they are still
    recorded. Pass the open alerts after this pass's changes (changes are accepted too, so
    an alert that fired in the same pass inhibits).
    """
    target = _alert(change)
    return any(inhibits(_alert(item), target) for item in open_alerts)
