"""``store.loops``: the loops that alerts started, one per alert, held by one process at a time.

A loop row is created once per alert (the unique ``alert_id``: a second ``create`` returns
the row the first one wrote, also when both race). A process works on a loop only while it
holds it: ``claim`` is one compare-and-set UPDATE that succeeds when nobody holds the loop,
when the caller already does, or when the holder's heartbeat is older than
``stale_after_s`` (it died); ``advance`` writes only for the holder, in a transaction
holding the row's lock, and appends an event to the timeline. ``transition`` changes a loop
whatever holds it, if its status is still the one expected (a person's approval).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, or_, select, update

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import LoopRun, utcnow
from loopline.errors import Conflict, NotFound

STATUSES = ("running", "waiting_approval", "succeeded", "rejected", "failed")
OPEN_STATUSES = ("running", "waiting_approval")
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


def _utc(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


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
        heartbeat_at=_utc(row.heartbeat_at),
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
        started_at=_utc(row.started_at),
        updated_at=_utc(row.updated_at),
        finished_at=_utc(row.finished_at),
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
        **fields: Any,
    ) -> tuple[LoopRecord, bool]:
        """(the loop of ``alert_id``, whether this call created it); ``event`` starts its
        timeline. Of concurrent callers exactly one creates it."""
        _check({"status": status, **fields})
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
            **fields,
        }
        stmt = (
            self._db.insert(LoopRun)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["alert_id"])
            .returning(LoopRun.id)
        )
        with self._db.write() as s:
            new_id = s.execute(stmt).scalar()
            row = s.scalars(select(LoopRun).where(LoopRun.alert_id == alert_id)).first()
            assert row is not None  # inserted above, or by the caller that won
            return _record(row), new_id is not None

    def claim(self, loop_id: int, owner: str, stale_after_s: float) -> LoopRecord | None:
        """Hold the loop for ``owner``: the loop as now held, or None when another holds it.

        Claimable when nobody holds it, when ``owner`` already does, or when the holder's
        heartbeat is older than ``stale_after_s``. A claim by a new holder counts an attempt.
        """
        now = utcnow()
        stale = now - timedelta(seconds=stale_after_s)
        stmt = (
            update(LoopRun)
            .where(
                LoopRun.id == loop_id,
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
        self, loop_id: int, owner: str, *, event: dict[str, Any] | None = None, **fields: Any
    ) -> LoopRecord:
        """Set ``fields`` (and append ``event`` to the timeline) if ``owner`` holds the loop.

        Raises LoopNotHeld otherwise: a process that lost the loop must stop working on it.
        """
        _check(fields)
        with self._db.write() as s:
            row = s.scalars(select(LoopRun).where(LoopRun.id == loop_id).with_for_update()).first()
            if row is None:
                raise NotFound(f"no loop {loop_id}")
            if row.owner != owner:
                raise LoopNotHeld(
                    f"loop {loop_id} is held by {row.owner or 'nobody'}, not {owner}; "
                    "claim it first"
                )
            return self._apply(s, row, event, fields)

    def transition(
        self,
        loop_id: int,
        expected_status: str | Sequence[str],
        *,
        event: dict[str, Any] | None = None,
        **fields: Any,
    ) -> LoopRecord | None:
        """Set ``fields`` if the loop's status is still ``expected_status`` (whoever holds
        it): a person's decision. None when its status changed meanwhile."""
        _check(fields)
        expected = [expected_status] if isinstance(expected_status, str) else expected_status
        with self._db.write() as s:
            row = s.scalars(select(LoopRun).where(LoopRun.id == loop_id).with_for_update()).first()
            if row is None:
                raise NotFound(f"no loop {loop_id}")
            if row.status not in expected:
                return None
            return self._apply(s, row, event, fields)

    def _apply(
        self, s: Any, row: LoopRun, event: dict[str, Any] | None, fields: dict[str, Any]
    ) -> LoopRecord:
        now = utcnow()
        for key, value in fields.items():
            setattr(row, key, value)
        if event:
            row.timeline = [*(row.timeline or []), _event(event, now)]  # a new list: JSON
        row.updated_at = now
        if row.owner is not None:
            row.heartbeat_at = now
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
