"""What a pass does after measuring one environment: it records its alert changes in the
report, sends the notices owed (``monitor.notices``), and starts the loop of every firing
alert of the stable version that has an action (once per alert; a canary's alert is marked
never to start one)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loopline.drivers.metadata.alerts import AlertRecord
    from loopline.drivers.metadata.deployments import DeploymentState
    from loopline.monitor.lifecycle import AlertChange
    from loopline.monitor.notices import NoticePlan
    from loopline.monitor.passes import _Pass

# The event that marks a (canary's) alert as one that starts no loop.
NOT_STARTED = "loop.not_started"


def change_row(change: AlertChange, inhibited: bool) -> dict[str, Any]:
    """One alert change as the pass report lists it."""
    a = change.alert
    return {
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
        "inhibited": inhibited,
    }


def act(
    ctx: _Pass,
    dep: DeploymentState,
    changes: list[AlertChange],
    open_alerts: list[AlertRecord],
    plan: NoticePlan | None,
) -> None:
    """Record ``changes``; send ``plan`` (None when this pass's state lost to another
    monitor's: the winner, or the next pass, sends what is owed); start the loops of the
    firing alerts among ``open_alerts`` (the open alerts after the changes)."""
    from loopline.monitor import lifecycle, notices

    firing = [a for a in open_alerts if a.state == "firing"]
    for change in changes:
        muted = lifecycle.inhibited(change, [*firing, *changes])
        ctx.report.changes.append(change_row(change, muted))
    if plan is not None:
        try:
            ctx.report.notifications += notices.send_planned(
                ctx.config, ctx.store, plan, actor=ctx.actor
            )
        except Exception as err:
            ctx.error(f"{dep.environment}/{dep.model_name} notices", err)
    # Every firing alert with an action gets its loop, once: also one whose loop a crash
    # kept from starting at the transition.
    for a in firing:
        if a.action == "none":
            continue
        try:
            start_loop(ctx, dep, a)
        except Exception as err:
            ctx.error(f"{dep.environment}/{dep.model_name} loop of alert {a.id}", err)


def start_loop(ctx: _Pass, dep: DeploymentState, alert: Any) -> None:
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
    ctx.report.loops.append(
        {
            "alert_id": alert.id,
            "event": "started",
            "loop_id": rec.id,
            "action": rec.action,
            "status": rec.status,
            "step": rec.step,
        }
    )
