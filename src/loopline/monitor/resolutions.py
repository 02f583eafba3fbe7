"""Alerts the monitor resolves itself, not on their metric: those of versions that no
longer serve (*retired*) and those of scopes no longer measured (*expired*).

Either resolve says so on its ``resolved`` event: ``details["retired"]`` or
``details["expired"]`` is true, so the rule's cooldown (``store.alerts.last_resolved``)
can leave it out: a version replaced, or a camera gone for an hour, is no reason to hold
back the next alert of that rule.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from loopline.drivers.metadata.alerts import open_key

if TYPE_CHECKING:
    from loopline.drivers.metadata.alerts import AlertRecord
    from loopline.drivers.metadata.store import MetadataStore
    from loopline.monitor.lifecycle import AlertChange

RETIRED, EXPIRED = "retired", "expired"


def key_of(a: AlertRecord) -> str:
    """The alert's dedup key (``store.alerts`` clears ``open_key`` once resolved)."""
    return open_key(a.rule, a.environment, a.model_name, a.model_version, a.scope)


def _resolve(
    store: MetadataStore,
    alert: AlertRecord,
    why: str,
    details: dict[str, Any],
    *,
    actor: str,
    now: datetime,
) -> AlertChange | None:
    from loopline.monitor.lifecycle import AlertChange

    done = store.alerts.transition(
        alert.id,
        alert.state,
        "resolved",
        value=alert.value,
        samples=alert.samples,
        message=why,
        actor=actor,
        at=now,
        details=details,
    )
    return None if done is None else AlertChange(alert=done, kind="resolved", previous=alert.state)


def retire(
    store: MetadataStore,
    open_alerts: list[AlertRecord],
    serving: list[int],
    *,
    actor: str,
    now: datetime,
) -> list[AlertChange]:
    """Resolve the open alerts of versions not in ``serving`` ("no longer serves")."""
    out: list[AlertChange] = []
    for alert in open_alerts:
        if alert.model_version is None or alert.model_version in serving:
            continue
        why = f"{alert.model_name}:{alert.model_version} no longer serves in {alert.environment}."
        change = _resolve(store, alert, why, {RETIRED: True}, actor=actor, now=now)
        if change is not None:
            out.append(change)
    return out


def expire(
    store: MetadataStore,
    open_alerts: list[AlertRecord],
    measured: set[str],
    failed: set[tuple[str, int]],
    seen: dict[str, str],
    *,
    limit_s: float,
    actor: str,
    now: datetime,
) -> tuple[list[AlertChange], dict[str, str]]:
    """Resolve the open alerts whose scope had no measurement for longer than ``limit_s``
    (``monitor.stale_labels_s``): a device offline, a camera gone from the windows.

    ``measured`` holds the dedup keys measured with a value this pass, ``failed`` the
    (rule, version) pairs whose measuring raised (their alerts are left alone), ``seen``
    when each open alert was last measured (by id; one missed first counts from now).
    Returns the changes and the new ``seen``, to carry to the next pass.
    """
    changes: list[AlertChange] = []
    out: dict[str, str] = {}
    for alert in open_alerts:
        sid = str(alert.id)
        if key_of(alert) in measured:
            out[sid] = now.isoformat()
            continue
        last = datetime.fromisoformat(seen[sid]) if sid in seen else now
        idle = (now - last).total_seconds()
        if (alert.rule, alert.model_version) in failed or idle <= limit_s:
            out[sid] = last.isoformat()  # a rule that failed says nothing about its data
            continue
        why = (
            f"no data for {idle:.0f}s: {alert.rule} is no longer measured for "
            f"{alert.model_name}:{alert.model_version} in {alert.environment} ({alert.scope}); "
            f"monitor.stale_labels_s is {limit_s:g}s."
        )
        details = {EXPIRED: True, "last_measured": last.isoformat()}
        change = _resolve(store, alert, why, details, actor=actor, now=now)
        if change is not None:
            changes.append(change)
            if change.alert.reason is None:
                store.alerts.set_reason(alert.id, f"no data for {idle:.0f}s")
    return changes, out
