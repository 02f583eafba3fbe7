"""``store.loops``: the loops that alerts started, one per alert, held by one process at a time.

A loop row is created once per alert (the unique ``alert_id``: a second ``create`` returns
the row the first one wrote, also when both race), and one retrain per model and
environment is open at a time: a loop that retrains carries ``open_key``
(``model|environment``, unique) until it ends, so of two monitors starting retrains of
one model at once the second gets ``LoopBusy``. A process works on a loop only while it
holds it: ``claim`` is one compare-and-set UPDATE that succeeds when nobody holds the loop,
when the caller already does, or when the holder's heartbeat is older than
``stale_after_s`` (it died); ``advance`` writes only for the holder of an open loop, in a
transaction holding the row's lock, and appends an event to the timeline. ``transition``
changes a loop whatever holds it, if its status (and step) are still the ones expected (a
person's decision). A loop that ends is written no more: its holder's next write raises
``LoopEnded``.

Every write may carry notes on the loop's alert (``AlertNote``: an alert event) and the
alert's reason: they are written in the same transaction as the loop row, so a loop never
ends (or starts) without its alert saying so.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, or_, select, update

from loopline.clock import utc
from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import Alert, AlertEvent, LoopRun, utcnow
from loopline.errors import Conflict, NotFound

STATUSES = ("running", "waiting_approval", "succeeded", "rejected", "failed")
OPEN_STATUSES = ("running", "waiting_approval")
FINAL_STATUSES = ("succeeded", "rejected", "failed")
ACTOR = "loopline (monitor)"
_CREATE_TRIES = 5  # an open loop that ends while we look at it lets the next insert in
FIELDS = (
    "status",
    "step",
    "dataset_version",
    "run_id",
    "model_version",
    "replica_test_id",
    "deployment_generation",
    "decided_by",
    "reason",
    "state",
    "finished_at",
    "incumbent_version",
)


class LoopNotHeld(Conflict):
    """The caller does not hold the loop (another process claimed it)."""


class LoopEnded(LoopNotHeld):
    """The loop has ended (a person rejected it, a deadline passed): nothing writes to it."""


class LoopBusy(Conflict):
    """Another loop already retrains this model in this environment (``open_key`` taken)."""

    def __init__(self, loop: LoopRecord) -> None:
        super().__init__(
            f"loop {loop.id} (alert {loop.alert_id}) already retrains {loop.model_name} for "
            f"{loop.environment}"
        )
        self.loop = loop


def open_key(model_name: str, environment: str) -> str:
    """The key one open retrain of a model in an environment holds (unique while open)."""
    return f"{model_name}|{environment}"


@dataclass(frozen=True)
class AlertNote:
    """An event for the loop's alert, written with the loop's row (``details`` gain the
    loop's id)."""

    kind: str
    message: str | None
    actor: str = ACTOR
    details: dict[str, Any] = field(default_factory=dict)


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


@dataclass(frozen=True)
class LoopRecord:
    """A loop as read: plain values (aware UTC times), safe to pass between threads."""

    id: int
    alert_id: int
    action: str
    model_name: str
    environment: str
    incumbent_version: int | None
    status: str
    step: str
    owner: str | None
    heartbeat_at: datetime | None
    attempts: int
    dataset_version: str | None
    run_id: str | None
    model_version: int | None
    replica_test_id: str | None
    deployment_generation: int | None
    decided_by: str | None
    reason: str | None
    state: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    open_key: str | None = None

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("heartbeat_at", "started_at", "updated_at", "finished_at"):
            out[key] = _iso(out[key])
        return out


def _record(row: LoopRun) -> LoopRecord:
    return LoopRecord(
        id=row.id,
        alert_id=row.alert_id,
        action=row.action,
        model_name=row.model_name,
        environment=row.environment,
        incumbent_version=row.incumbent_version,
        status=row.status,
        step=row.step,
        owner=row.owner,
        heartbeat_at=utc(row.heartbeat_at),
        attempts=row.attempts or 0,
        dataset_version=row.dataset_version,
        run_id=row.run_id,
        model_version=row.model_version,
        replica_test_id=row.replica_test_id,
        deployment_generation=row.deployment_generation,
        decided_by=row.decided_by,
        reason=row.reason,
        state=dict(row.state or {}),
        timeline=list(row.timeline or []),
        started_at=utc(row.started_at),
        updated_at=utc(row.updated_at),
        finished_at=utc(row.finished_at),
        open_key=row.open_key,
    )


def _event(event: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A timeline entry: ``{step, status, at, detail}`` (``at`` now unless given)."""
    out = {
        "step": event.get("step"),
        "status": event.get("status"),
        "at": event.get("at") or now.isoformat(),
        "detail": event.get("detail"),
    }
    out.update({k: v for k, v in event.items() if k not in out})
    return out


def _check(fields: dict[str, Any]) -> None:
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown loop fields {sorted(unknown)}; allowed: {', '.join(FIELDS)}")
    status = fields.get("status")
    if status is not None and status not in STATUSES:
        raise ValueError(f"loop status {status!r}: allowed {', '.join(STATUSES)}")


def _note(
    s: Any,
    alert_id: int,
    loop_id: int,
    notes: Sequence[AlertNote],
    reason: str | None,
    now: datetime,
) -> None:
    """Write ``notes`` (and ``reason``) on the alert in the loop's transaction ``s``."""
    for n in notes:
        s.add(AlertEvent(alert_id=alert_id, at=now, kind=n.kind, message=n.message,
                         actor=n.actor, details={"loop_id": loop_id, **n.details}))  # fmt: skip
    if reason is not None:
        s.execute(update(Alert).where(Alert.id == alert_id).values(reason=reason))
    if notes or reason is not None:
        s.flush()


class LoopRepository:
    """``store.loops``: create, claim, advance and read loops; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- writing ---------------------------------------------------------------------------
    def create(
        self,
        alert_id: int,
        action: str,
        model_name: str,
        environment: str,
        incumbent_version: int | None,
        status: str,
        step: str,
        **fields: Any,
    ) -> LoopRecord:
        """The loop of ``alert_id``: created now, or the one that already exists."""
        return self.create_or_get(
            alert_id, action, model_name, environment, incumbent_version, status, step, **fields
        )[0]

    def create_or_get(
        self,
        alert_id: int,
        action: str,
        model_name: str,
        environment: str,
        incumbent_version: int | None,
        status: str,
        step: str,
        *,
        event: dict[str, Any] | None = None,
        open_key: str | None = None,
        notes: Sequence[AlertNote] = (),
        alert_reason: str | None = None,
        **fields: Any,
    ) -> tuple[LoopRecord, bool]:
        """(the loop of ``alert_id``, whether this call created it); ``event`` starts its
        timeline, ``notes`` and ``alert_reason`` go on the alert with it (only when created).

        Of concurrent callers exactly one creates it. ``open_key`` (see ``open_key()``)
        marks a retrain: when another open loop holds the key, raises LoopBusy with it.
        """
        _check({"status": status, **fields})
        for _ in range(_CREATE_TRIES):
            now = utcnow()
            values = {
                "alert_id": alert_id,
                "action": action,
                "model_name": model_name,
                "environment": environment,
                "incumbent_version": incumbent_version,
                "status": status,
                "step": step,
                "attempts": 0,
                "state": {},
                "timeline": [_event(event, now)] if event else [],
                "started_at": now,
                "updated_at": now,
                "open_key": open_key if status in OPEN_STATUSES else None,
                **fields,
            }
            stmt = (
                self._db.insert(LoopRun)
                .values(**values)
                .on_conflict_do_nothing()  # the alert's loop exists, or the key is taken
                .returning(LoopRun.id)
            )
            with self._db.write() as s:
                new_id = s.execute(stmt).scalar()
                if new_id is not None:
                    _note(s, alert_id, new_id, notes, alert_reason, now)
                row = s.scalars(select(LoopRun).where(LoopRun.alert_id == alert_id)).first()
                if row is not None:
                    return _record(row), new_id is not None
                other = None
                if open_key is not None:
                    q = select(LoopRun).where(LoopRun.open_key == open_key)
                    other = s.scalars(q).first()
                if other is not None:
                    raise LoopBusy(_record(other))
        raise Conflict(  # it kept opening and ending under us: say so, the caller retries
            f"could not create the loop of alert {alert_id}: {open_key} kept changing"
        )

    def claim(self, loop_id: int, owner: str, stale_after_s: float) -> LoopRecord | None:
        """Hold the loop for ``owner``: the loop as now held, or None when another holds it.

        Claimable while open, when nobody holds it, when ``owner`` already does, or when
        the holder's heartbeat is older than ``stale_after_s``. A claim by a new holder
        counts an attempt. An ended loop is claimed by nobody (None).
        """
        now = utcnow()
        stale = now - timedelta(seconds=stale_after_s)
        stmt = (
            update(LoopRun)
            .where(
                LoopRun.id == loop_id,
                LoopRun.status.in_(OPEN_STATUSES),
                or_(
                    LoopRun.owner.is_(None),
                    LoopRun.owner == owner,
                    LoopRun.heartbeat_at.is_(None),
                    LoopRun.heartbeat_at < stale,
                ),
            )
            .values(
                owner=owner,
                heartbeat_at=now,
                attempts=case(
                    (LoopRun.owner == owner, LoopRun.attempts), else_=LoopRun.attempts + 1
                ),
            )
        )
        with self._db.write() as s:
            won = getattr(s.execute(stmt), "rowcount", 0) == 1
            row = s.get(LoopRun, loop_id)
            if row is None:
                raise NotFound(f"no loop {loop_id}")
            return _record(row) if won else None

    def heartbeat(self, loop_id: int, owner: str) -> bool:
        """Say ``owner`` still works on the loop; False when it no longer holds it."""
        stmt = (
            update(LoopRun)
            .where(LoopRun.id == loop_id, LoopRun.owner == owner)
            .values(heartbeat_at=utcnow())
        )
        with self._db.write() as s:
            return getattr(s.execute(stmt), "rowcount", 0) == 1

    def release(self, loop_id: int, owner: str) -> bool:
        """Let go of the loop (it waits: for labels, a person, a canary); False if not held."""
        stmt = (
            update(LoopRun)
            .where(LoopRun.id == loop_id, LoopRun.owner == owner)
            .values(owner=None, heartbeat_at=None)
        )
        with self._db.write() as s:
            return getattr(s.execute(stmt), "rowcount", 0) == 1

    def advance(
        self,
        loop_id: int,
        owner: str,
        *,
        event: dict[str, Any] | None = None,
        notes: Sequence[AlertNote] = (),
        alert_reason: str | None = None,
        **fields: Any,
    ) -> LoopRecord:
        """Set ``fields`` (and append ``event`` to the timeline, ``notes`` and
        ``alert_reason`` to the alert) if ``owner`` holds the loop and it is open.

        Raises LoopNotHeld otherwise (LoopEnded when it has ended): a process that lost the
        loop must stop working on it.
        """
        _check(fields)
        with self._db.write() as s:
            row = self._held(s, loop_id, owner)
            return self._apply(s, row, event, fields, notes, alert_reason)

    def finish(
        self,
        loop_id: int,
        owner: str,
        status: str,
        reason: str | None,
        *,
        actor: str = ACTOR,
        **fields: Any,
    ) -> LoopRecord:
        """End the loop held by ``owner`` (succeeded, rejected or failed), and say so on its
        alert in the same transaction: a ``loop.<status>`` event, and unless it succeeded,
        ``reason`` as the alert's reason. A succeeded loop's step becomes ``done``."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"a loop ends {', '.join(FINAL_STATUSES)}, not {status!r}")
        _check(fields)
        detail = reason or "done"
        with self._db.write() as s:
            row = self._held(s, loop_id, owner)
            event = {"step": row.step, "status": status, "detail": detail}
            values = {
                "status": status,
                "step": "done" if status == "succeeded" else row.step,
                "reason": reason,
                "finished_at": utcnow(),
                **fields,
            }
            note = AlertNote(f"loop.{status}", detail, actor)
            why = reason if status != "succeeded" else None
            return self._apply(s, row, event, values, [note], why)

    def transition(
        self,
        loop_id: int,
        expected_status: str | Sequence[str],
        *,
        steps: Sequence[str] | None = None,
        event: dict[str, Any] | None = None,
        notes: Sequence[AlertNote] = (),
        alert_reason: str | None = None,
        **fields: Any,
    ) -> LoopRecord | None:
        """Set ``fields`` if the loop's status is still ``expected_status`` and (given
        ``steps``) its step one of them, whoever holds it: a person's decision. None when
        it changed meanwhile. ``notes``/``alert_reason`` as for ``advance``."""
        _check(fields)
        expected = [expected_status] if isinstance(expected_status, str) else expected_status
        with self._db.write() as s:
            row = s.scalars(select(LoopRun).where(LoopRun.id == loop_id).with_for_update()).first()
            if row is None:
                raise NotFound(f"no loop {loop_id}")
            if row.status not in expected or (steps is not None and row.step not in steps):
                return None
            return self._apply(s, row, event, fields, notes, alert_reason)

    def _held(self, s: Any, loop_id: int, owner: str) -> LoopRun:
        """The loop's row, locked, if ``owner`` holds it and it is open."""
        row = s.scalars(select(LoopRun).where(LoopRun.id == loop_id).with_for_update()).first()
        if row is None:
            raise NotFound(f"no loop {loop_id}")
        if row.status not in OPEN_STATUSES:
            raise LoopEnded(f"loop {loop_id} has ended ({row.status}); nothing writes to it")
        if row.owner != owner:
            raise LoopNotHeld(
                f"loop {loop_id} is held by {row.owner or 'nobody'}, not {owner}; claim it first"
            )
        return row

    def _apply(
        self,
        s: Any,
        row: LoopRun,
        event: dict[str, Any] | None,
        fields: dict[str, Any],
        notes: Sequence[AlertNote] = (),
        alert_reason: str | None = None,
    ) -> LoopRecord:
        now = utcnow()
        for key, value in fields.items():
            setattr(row, key, value)
        if event:
            row.timeline = [*(row.timeline or []), _event(event, now)]  # a new list: JSON
        row.updated_at = now
        if row.status not in OPEN_STATUSES:  # ended: nobody holds it, the model is free
            row.owner, row.heartbeat_at, row.open_key = None, None, None
        elif row.owner is not None:
            row.heartbeat_at = now
        _note(s, row.alert_id, row.id, notes, alert_reason, now)
        s.flush()
        return _record(row)

    # -- reading ---------------------------------------------------------------------------
    def get(self, loop_id: int) -> LoopRecord:
        with self._db.read() as s:
            row = s.get(LoopRun, loop_id)
            if row is None:
                raise NotFound(f"no loop {loop_id} (see `loopline alerts`)")
            return _record(row)

    def get_by_alert(self, alert_id: int) -> LoopRecord | None:
        with self._db.read() as s:
            row = s.scalars(select(LoopRun).where(LoopRun.alert_id == alert_id)).first()
            return _record(row) if row is not None else None

    def list(
        self,
        status: str | Sequence[str] | None = None,
        *,
        model_name: str | None = None,
        environment: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[LoopRecord]:
        """Loops, oldest first, filtered as given (``status`` one or several)."""
        q = select(LoopRun).order_by(LoopRun.id)
        if status is not None:
            q = q.where(LoopRun.status.in_([status] if isinstance(status, str) else status))
        if model_name is not None:
            q = q.where(LoopRun.model_name == model_name)
        if environment is not None:
            q = q.where(LoopRun.environment == environment)
        if limit is not None:
            q = q.order_by(None).order_by(LoopRun.id.desc()).limit(limit)
        with self._db.read() as s:
            rows = [_record(r) for r in s.scalars(q)]
        return sorted(rows, key=lambda r: r.id)
