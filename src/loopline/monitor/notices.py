"""Telling people: the notices of alerts and loops, each sent once, from what is stored.

A notice is owed for what the store records, not for what one pass happened to do: an
alert's ``firing`` event (while it fires) or ``resolved`` event (of an alert whose firing
was told) without a ``notified`` event of that kind gets its notice, so a transition made
by a pass that failed, or by a monitor that died, before telling anyone is told by the
next pass. ``plan_alert_notices`` works out what one (environment, model) owes; the pass
claims the notices in its carried state by compare-and-set (of two monitors, only the one
whose state is written sends) and then ``send_planned`` sends them.

Inhibition: the firing notice of a warning or per-segment alert is held back while a
critical global alert of its version fires (an ``inhibited`` event says so, once); it is
sent once that alert resolves, if the warning still fires. A resolve is told only to those
who were told the firing.

``notify_loop_events`` does the same for what loops report: awaiting approval, rejected,
redeployed, failed; once per loop and status.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loopline.clock import utc
from loopline.drivers.metadata.models import AlertEvent, utcnow
from loopline.monitor.resolutions import EXPIRED, RETIRED

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.metadata.alerts import AlertRecord
    from loopline.drivers.metadata.store import MetadataStore

# Loop statuses people are told about, by the kind of notice.
LOOP_NOTICES = {
    "waiting_approval": "awaiting-approval",
    "rejected": "retrain-rejected",
    "succeeded": "redeployed",
    "failed": "retrain-failed",
}
FINISHED = ("rejected", "succeeded", "failed")
# Alerts resolved, and loops finished, longer ago than this are not looked at again.
NOTICE_HORIZON_S = 86_400.0
LOOP_NOTICE_HORIZON_S = NOTICE_HORIZON_S
# The newest finished loops looked at per pass (each finished within the horizon).
LOOP_SCAN = 200
# Alerts of one (environment, model) looked at per pass: the open ones, and the newest
# resolved ones (those resolved within the horizon).
OPEN_SCAN = 10_000
RESOLVED_SCAN = 200
# Actions whose loop retrains (and so may end in a redeploy).
RETRAINING = ("retrain", "approve")
_CHUNK = 500  # ids per IN (...) query
_EVENT_KINDS = ("firing", "resolved", "notified", "inhibited")
INHIBITED_TEXT = "notification inhibited by a firing critical global alert of this version"
RELEASED_TEXT = "(its notice was held back while a critical alert of this version fired)"


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def _events(
    store: MetadataStore, alert_ids: Sequence[int], kinds: Sequence[str]
) -> dict[int, list[dict[str, Any]]]:
    """The events of ``kinds`` of these alerts, oldest first, in one query per 500 ids."""
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in alert_ids}
    with Session(store.engine) as s:
        for ids in _chunks(list(alert_ids)):
            q = (
                select(AlertEvent.alert_id, AlertEvent.kind, AlertEvent.message, AlertEvent.details)
                .where(AlertEvent.alert_id.in_(ids), AlertEvent.kind.in_(kinds))
                .order_by(AlertEvent.at, AlertEvent.id)
            )
            for alert_id, kind, message, details in s.execute(q):
                out[alert_id].append(
                    {"kind": kind, "message": message, "details": dict(details or {})}
                )
    return out


def _told(events: list[dict[str, Any]]) -> set[str]:
    return {str(e["details"].get("kind")) for e in events if e["kind"] == "notified"}


@dataclass(frozen=True)
class Owed:
    """One alert notice owed: ``kind`` is firing or resolved."""

    alert: AlertRecord
    kind: str
    message: str = ""

    @property
    def claim(self) -> str:
        return f"{self.alert.id}:{self.kind}"


@dataclass
class NoticePlan:
    """What one (environment, model) owes: notices to send, alerts to mark inhibited, and
    the claims to carry (notices sent whose ``notified`` event may not be visible yet)."""

    send: list[Owed] = field(default_factory=list)
    inhibit: list[AlertRecord] = field(default_factory=list)
    claims: dict[str, str] = field(default_factory=dict)


def recent_alerts(
    store: MetadataStore,
    environment: str,
    model_name: str,
    now: datetime,
    open_alerts: Iterable[AlertRecord] | None = None,
) -> list[AlertRecord]:
    """The open alerts of (environment, model) (``open_alerts`` when the caller has them)
    and those resolved within the horizon (of the ``RESOLVED_SCAN`` newest)."""
    since = now - timedelta(seconds=NOTICE_HORIZON_S)
    if open_alerts is None:
        open_alerts = store.alerts.list(
            state="open", environment=environment, model_name=model_name, limit=OPEN_SCAN
        )
    resolved = store.alerts.list(
        state="resolved", environment=environment, model_name=model_name, limit=RESOLVED_SCAN
    )
    return [
        *open_alerts,
        *(a for a in resolved if a.resolved_at is not None and utc(a.resolved_at) >= since),
    ]


def plan_alert_notices(
    store: MetadataStore,
    environment: str,
    model_name: str,
    *,
    now: datetime,
    claims: dict[str, str] | None = None,
    open_alerts: Iterable[AlertRecord] | None = None,
) -> NoticePlan:
    """The alert notices (environment, model) owes at ``now``; see the module docstring.

    ``claims`` are the previous pass's (``"alert_id:kind"`` -> when); a claimed notice is
    not owed again. The plan's ``claims`` are what to carry: the new ones, and the old
    ones whose ``notified`` event is not stored yet. ``open_alerts``: the open alerts of
    (environment, model) when the caller has them (else they are read).
    """
    from loopline.monitor.lifecycle import inhibited

    claims = claims or {}
    alerts = recent_alerts(store, environment, model_name, now, open_alerts)
    events = _events(store, [a.id for a in alerts], _EVENT_KINDS)
    firing = [a for a in alerts if a.state == "firing"]
    plan = NoticePlan()
    stamp = now.isoformat()
    for a in alerts:
        ev = events[a.id]
        told = _told(ev)
        for kind in ("firing", "resolved"):
            claim = f"{a.id}:{kind}"
            if claim in claims and kind not in told:
                plan.claims[claim] = claims[claim]
                told.add(kind)
        fired = [i for i, e in enumerate(ev) if e["kind"] == "firing"]
        if not fired:
            continue  # pending, or resolved while pending: nothing to tell
        if "firing" not in told:
            if a.state != "firing":
                continue  # resolved before anyone was told it fired: nothing to tell
            if inhibited(a, firing):
                if not any(e["kind"] == "inhibited" for e in ev[fired[-1] :]):
                    plan.inhibit.append(a)
                continue
            held = any(e["kind"] == "inhibited" for e in ev)
            plan.send.append(Owed(a, "firing", RELEASED_TEXT if held else ""))
        elif a.state == "resolved" and "resolved" not in told:
            resolved = [e for e in ev if e["kind"] == "resolved"]
            last: dict[str, Any] = resolved[-1] if resolved else {"details": {}, "message": ""}
            mine = last["details"].get(RETIRED) or last["details"].get(EXPIRED)
            plan.send.append(Owed(a, "resolved", str(last["message"] or "") if mine else ""))
    for owed in plan.send:
        plan.claims[owed.claim] = stamp
    return plan


def send_planned(
    config: Config, store: MetadataStore, plan: NoticePlan, *, actor: str
) -> list[dict[str, Any]]:
    """Send a plan's notices and mark its inhibited alerts; one result per notice."""
    for a in plan.inhibit:
        store.alerts.add_event(a.id, "inhibited", INHIBITED_TEXT, actor, {})
    return [notify(config, store, o.alert, o.kind, o.message, actor=actor) for o in plan.send]


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

    details: dict[str, Any] = {"strategy": config.monitor.retrain.strategy}
    if loop is not None:
        details |= {
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


def loops_to_tell(store: MetadataStore, now: datetime) -> list[Any]:
    """Loops that may owe a notice: waiting for approval, or finished within the horizon
    (the newest ``LOOP_SCAN`` finished ones)."""
    since = now - timedelta(seconds=LOOP_NOTICE_HORIZON_S)
    recs = store.loops.list(status="waiting_approval")
    recs += [
        r
        for r in store.loops.list(status=FINISHED, limit=LOOP_SCAN)
        if r.finished_at is not None and utc(r.finished_at) >= since
    ]
    return recs


def notify_loop_events(
    config: Config, store: MetadataStore, *, now: datetime | None = None, owner: str | None = None
) -> list[dict[str, Any]]:
    """Tell the channels what loops reported: awaiting approval, rejected, redeployed,
    failed; once per loop and status (the ``notified`` event's ``loop_status`` marks it)."""
    from loopline.monitor.passes import default_owner

    now = now or utcnow()
    actor = f"loopline (monitor {owner or default_owner()})"
    recs = [r for r in loops_to_tell(store, now) if loop_notice(r) is not None]
    if not recs:
        return []
    notified = _events(store, [r.alert_id for r in recs], ("notified",))
    out: list[dict[str, Any]] = []
    for rec in recs:
        if any(e["details"].get("loop_status") == rec.status for e in notified[rec.alert_id]):
            continue
        alert = store.alerts.get(rec.alert_id)
        if alert is not None:
            kind = str(loop_notice(rec))
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
