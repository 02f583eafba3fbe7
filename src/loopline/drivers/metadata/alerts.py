"""``store.alerts``: alerts, their transitions and the notes on them.

An alert is one occurrence of a rule for a (environment, model, version, scope): it opens
*pending* or *firing* and ends *resolved*. While it is open its ``open_key`` holds the dedup
key and a unique constraint keeps one open alert per key; resolving clears it. Opening is
``INSERT ... ON CONFLICT DO NOTHING``, so a concurrent duplicate gets None, never an
IntegrityError. A transition is a compare-and-set on (id, state): of concurrent callers
exactly one wins, and its event is written in the same transaction.

A resolution whose details say ``{"retired": true}`` (the version no longer serves) or
``{"expired": true}`` is not the condition going away: those keys are kept on the alert
too, and such an alert starts no cooldown (``last_resolved`` skips it).

Times (``at``) default to now; the lifecycle passes its own ``now`` so that tests and
replays are deterministic.
"""

from __future__ import annotations

import builtins
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from loopline.clock import utc
from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import Alert, AlertEvent, utcnow

STATES = ("pending", "firing", "resolved")
OPEN_STATES = ("pending", "firing")
# The transitions an alert may make; anything else is a programming error.
TRANSITIONS = {("pending", "firing"), ("pending", "resolved"), ("firing", "resolved")}
ACTOR = "loopline (monitor)"
# Details of a resolution that ends an alert without its condition clearing: kept on the
# alert, and such an alert starts no cooldown.
NO_COOLDOWN = ("retired", "expired")
# Resolved alerts of a key ``last_resolved`` looks through for one that counts.
_LAST_RESOLVED_SCAN = 50


def open_key(
    rule: str, environment: str, model_name: str, model_version: int | None, scope: str
) -> str:
    """The dedup key of an open alert: one per (rule, environment, model, version, scope)."""
    return f"{rule}|{environment}|{model_name}|{model_version}|{scope}"


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


@dataclass(frozen=True)
class AlertRecord:
    """An alert as read: plain values (aware UTC times), safe to pass between threads."""

    id: int
    rule: str
    metric: str
    environment: str
    model_name: str
    model_version: int | None
    scope: str
    severity: str
    state: str
    op: str
    threshold: float
    value: float | None
    samples: int
    action: str
    open_key: str | None
    started_at: datetime
    fired_at: datetime | None
    resolved_at: datetime | None
    updated_at: datetime
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def starts_cooldown(self) -> bool:
        """Whether this resolved alert mutes its key for a while: it fired, and resolved
        because its condition cleared (not retired with its version, nor expired)."""
        return (
            self.state == "resolved"
            and self.fired_at is not None
            and not any(self.details.get(k) for k in NO_COOLDOWN)
        )

    @property
    def condition(self) -> str:
        """``accuracy < 0.4``: what the alert says, for messages."""
        return f"{self.metric} {self.op} {self.threshold:g}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("started_at", "fired_at", "resolved_at", "updated_at"):
            out[key] = _iso(out[key])
        return out


def _record(row: Alert) -> AlertRecord:
    started, updated = utc(row.started_at), utc(row.updated_at)
    assert started is not None and updated is not None
    return AlertRecord(
        id=row.id, rule=row.rule, metric=row.metric, environment=row.environment,
        model_name=row.model_name, model_version=row.model_version, scope=row.scope,
        severity=row.severity, state=row.state, op=row.op, threshold=row.threshold,
        value=row.value, samples=row.samples, action=row.action, open_key=row.open_key,
        started_at=started, fired_at=utc(row.fired_at), resolved_at=utc(row.resolved_at),
        updated_at=updated, reason=row.reason, details=dict(row.details or {}),
    )  # fmt: skip


def _event_dict(e: AlertEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "alert_id": e.alert_id,
        "at": _iso(utc(e.at)),
        "kind": e.kind,
        "value": e.value,
        "actor": e.actor,
        "message": e.message,
        "details": dict(e.details or {}),
    }


class AlertRepository:
    """``store.alerts``: open, transition and read alerts; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- writing ---------------------------------------------------------------------------
    def open_alert(
        self,
        rule: str,
        metric: str,
        environment: str,
        model_name: str,
        model_version: int | None,
        scope: str,
        severity: str,
        op: str,
        threshold: float,
        value: float | None,
        samples: int,
        action: str,
        state: str = "pending",
        details: dict[str, Any] | None = None,
        *,
        message: str | None = None,
        actor: str = ACTOR,
        at: datetime | None = None,
    ) -> AlertRecord | None:
        """Open an alert in ``state`` (pending or firing) unless one is open for its key.

        Returns None when an alert is already open for (rule, environment, model, version,
        scope), also when another caller opened it a moment ago. Writes a ``pending`` event,
        and for ``state="firing"`` a ``firing`` event after it, in the same transaction.
        """
        if state not in OPEN_STATES:
            raise ValueError(f"an alert opens pending or firing, not {state!r}")
        now = utc(at) or utcnow()
        key = open_key(rule, environment, model_name, model_version, scope)
        stmt = (
            self._db.insert(Alert)
            .values(
                rule=rule,
                metric=metric,
                environment=environment,
                model_name=model_name,
                model_version=model_version,
                scope=scope,
                severity=severity,
                state=state,
                op=op,
                threshold=float(threshold),
                value=value,
                samples=int(samples),
                action=action,
                open_key=key,
                started_at=now,
                fired_at=now if state == "firing" else None,
                updated_at=now,
                details=dict(details or {}),
            )
            .on_conflict_do_nothing(index_elements=["open_key"])
            .returning(Alert.id)
        )
        with self._db.write() as s:
            alert_id = s.execute(stmt).scalar()
            if alert_id is None:
                return None
            for kind in ("pending", "firing") if state == "firing" else ("pending",):
                s.add(AlertEvent(alert_id=alert_id, at=now, kind=kind, value=value, actor=actor,
                                 message=message, details={"samples": samples}))  # fmt: skip
            s.flush()
            row = s.get(Alert, alert_id)
            assert row is not None
            return _record(row)

    def transition(
        self,
        alert_id: int,
        expected_state: str,
        new_state: str,
        *,
        value: float | None = None,
        samples: int | None = None,
        message: str | None = None,
        actor: str = ACTOR,
        at: datetime | None = None,
        details: dict[str, Any] | None = None,
        alert_details: dict[str, Any] | None = None,
    ) -> AlertRecord | None:
        """Move the alert from ``expected_state`` to ``new_state`` if it is still there.

        Compare-and-set: returns the changed alert, or None when it is not (or no longer) in
        ``expected_state``. Firing sets ``fired_at``; resolving sets ``resolved_at`` and
        clears ``open_key`` (the next alert of the key may open). The event is written in
        the same transaction; ``details`` go on the event, and their ``retired``/``expired``
        keys on the alert as well (no cooldown). ``alert_details`` replace the alert's
        details (the lifecycle's latest evidence).
        """
        if (expected_state, new_state) not in TRANSITIONS:
            allowed = ", ".join(f"{a}->{b}" for a, b in sorted(TRANSITIONS))
            raise ValueError(
                f"alert transition {expected_state}->{new_state} is not allowed; allowed: {allowed}"
            )
        now = utc(at) or utcnow()
        values: dict[str, Any] = {"state": new_state, "updated_at": now}
        if value is not None:
            values["value"] = value
        if samples is not None:
            values["samples"] = int(samples)
        if new_state == "firing":
            values["fired_at"] = now
        if new_state == "resolved":
            values["resolved_at"] = now
            values["open_key"] = None
        flags = {k: True for k in NO_COOLDOWN if (details or {}).get(k)}
        if alert_details is not None and not flags:
            values["details"] = dict(alert_details)
        q = (
            update(Alert)
            .where(Alert.id == alert_id, Alert.state == expected_state)
            .values(**values)
        )
        with self._db.write() as s:
            if getattr(s.execute(q), "rowcount", 0) != 1:
                return None
            s.add(
                AlertEvent(
                    alert_id=alert_id, at=now, kind=new_state, value=value, actor=actor,
                    message=message, details={"from": expected_state, **(details or {})},
                )
            )  # fmt: skip
            s.flush()
            row = s.get(Alert, alert_id, populate_existing=True)
            assert row is not None
            if flags:  # this transaction won the compare-and-set: no one else writes the row
                base = alert_details if alert_details is not None else row.details
                row.details = {**dict(base or {}), **flags}
                s.flush()
            return _record(row)

    def update_value(
        self,
        alert_id: int,
        expected_state: str,
        *,
        value: float | None,
        samples: int,
        at: datetime | None = None,
        details: dict[str, Any] | None = None,
    ) -> bool:
        """Record the latest value (and details) of an alert still in ``expected_state``.

        One UPDATE, no event (``details`` None leaves the details as they are): the
        lifecycle calls it when a measurement changes the value but not the state. False
        when the alert is no longer in that state.
        """
        values: dict[str, Any] = {
            "value": value,
            "samples": int(samples),
            "updated_at": utc(at) or utcnow(),
        }
        if details is not None:
            values["details"] = dict(details)
        q = (
            update(Alert)
            .where(Alert.id == alert_id, Alert.state == expected_state)
            .values(**values)
        )
        with self._db.write() as s:
            return getattr(s.execute(q), "rowcount", 0) == 1

    def add_event(
        self,
        alert_id: int,
        kind: str,
        message: str | None = None,
        actor: str = ACTOR,
        details: dict[str, Any] | None = None,
        *,
        value: float | None = None,
        at: datetime | None = None,
    ) -> int:
        """Add a note to an alert (notified, approved, retrain rejected, ...); its id."""
        event = AlertEvent(alert_id=alert_id, at=utc(at) or utcnow(), kind=kind, value=value,
                           actor=actor, message=message, details=dict(details or {}))  # fmt: skip
        with self._db.write() as s:
            s.add(event)
            s.flush()
            return int(event.id)

    def set_reason(self, alert_id: int, reason: str | None) -> bool:
        """Say why (a rejected retrain, ...); False for an unknown alert."""
        q = update(Alert).where(Alert.id == alert_id).values(reason=reason)
        with self._db.write() as s:
            return getattr(s.execute(q), "rowcount", 0) == 1

    # -- reading ---------------------------------------------------------------------------
    def get(self, alert_id: int) -> AlertRecord | None:
        with self._db.read() as s:
            row = s.get(Alert, alert_id)
            return _record(row) if row is not None else None

    def find_open(
        self, rule: str, environment: str, model_name: str, model_version: int | None, scope: str
    ) -> AlertRecord | None:
        """The open (pending or firing) alert of this key, if any."""
        key = open_key(rule, environment, model_name, model_version, scope)
        with self._db.read() as s:
            row = s.scalars(select(Alert).where(Alert.open_key == key)).first()
            return _record(row) if row is not None else None

    def open_for(self, environment: str, model_name: str) -> dict[str, AlertRecord]:
        """The open alerts of a model in an environment, by ``open_key``: one SELECT for
        a pass to hand to ``lifecycle.evaluate(open_alerts=...)``."""
        q = select(Alert).where(
            Alert.environment == environment,
            Alert.model_name == model_name,
            Alert.open_key.is_not(None),
        )
        with self._db.read() as s:
            return {str(r.open_key): _record(r) for r in s.scalars(q)}

    def events(self, alert_id: int) -> builtins.list[dict[str, Any]]:
        """The alert's events, oldest first, as JSON-ready dicts."""
        q = (
            select(AlertEvent)
            .where(AlertEvent.alert_id == alert_id)
            .order_by(AlertEvent.at, AlertEvent.id)
        )
        with self._db.read() as s:
            return [_event_dict(e) for e in s.scalars(q)]

    def list(
        self,
        state: str | None = None,
        environment: str | None = None,
        model_name: str | None = None,
        limit: int = 100,
        *,
        model_version: int | None = None,
    ) -> builtins.list[AlertRecord]:
        """Alerts, newest first; ``state`` is pending, firing, resolved or ``open`` (both
        pending and firing)."""
        q = select(Alert).order_by(Alert.started_at.desc(), Alert.id.desc()).limit(limit)
        if state == "open":
            q = q.where(Alert.state.in_(OPEN_STATES))
        elif state is not None:
            if state not in STATES:
                raise ValueError(f"alert state {state!r}: allowed {', '.join(STATES)} or open")
            q = q.where(Alert.state == state)
        if environment is not None:
            q = q.where(Alert.environment == environment)
        if model_name is not None:
            q = q.where(Alert.model_name == model_name)
        if model_version is not None:
            q = q.where(Alert.model_version == model_version)
        with self._db.read() as s:
            return [_record(r) for r in s.scalars(q)]

    def last_resolved(
        self,
        rule: str,
        environment: str,
        model_name: str,
        model_version: int | None,
        scope: str,
        *,
        fired_only: bool = True,
    ) -> AlertRecord | None:
        """The most recently resolved alert of this key (rule, environment, model, version,
        scope) that starts a cooldown.

        With ``fired_only`` (the default) only ``starts_cooldown`` alerts count: one resolved
        while still pending was never told to anyone, and one retired with its version (or
        expired) did not clear; neither mutes the key. Without it, any resolved alert.
        """
        q = select(Alert).where(
            Alert.rule == rule,
            Alert.environment == environment,
            Alert.model_name == model_name,
            Alert.scope == scope,
            Alert.state == "resolved",
        )
        q = q.where(
            Alert.model_version.is_(None)
            if model_version is None
            else Alert.model_version == model_version
        )
        if fired_only:
            q = q.where(Alert.fired_at.is_not(None))
        q = q.order_by(Alert.resolved_at.desc(), Alert.id.desc()).limit(_LAST_RESOLVED_SCAN)
        with self._db.read() as s:
            for row in s.scalars(q):
                record = _record(row)
                if not fired_only or record.starts_cooldown:
                    return record
            return None
