"""Replica-test outcomes: a candidate may be promoted only if its latest test passed."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import AuditEvent, ReplicaTest, utcnow


@dataclass(frozen=True)
class ReplicaTestRecord:
    id: str
    model_name: str
    model_version: int
    environment: str
    passed: bool
    reasons: list[str]
    report: dict[str, Any]
    started_at: datetime
    finished_at: datetime
    actor: str

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["started_at"] = self.started_at.isoformat()
        out["finished_at"] = self.finished_at.isoformat()
        return out


def _record(r: ReplicaTest) -> ReplicaTestRecord:
    return ReplicaTestRecord(
        r.id, r.model_name, r.model_version, r.environment, r.passed, list(r.reasons or []),
        dict(r.report or {}), r.started_at, r.finished_at, r.actor,
    )  # fmt: skip


class ReplicaTestRepository:
    """``store.replica_tests``: record and read replica tests."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        name: str,
        version: int,
        *,
        environment: str,
        passed: bool,
        reasons: list[str],
        report: dict[str, Any],
        started_at: datetime | None = None,
        actor: str = "loopline",
    ) -> ReplicaTestRecord:
        now = utcnow()
        row = ReplicaTest(
            id=uuid.uuid4().hex, model_name=name, model_version=version,
            environment=environment, passed=passed, reasons=list(reasons), report=report,
            started_at=started_at or now, finished_at=now, actor=actor,
        )  # fmt: skip
        with self._db.write() as s:
            s.add(row)
            s.add(
                AuditEvent(
                    actor=actor,
                    action="replica_test.passed" if passed else "replica_test.failed",
                    subject=f"{name}:{version}",
                    details={"environment": environment, "id": row.id, "reasons": reasons},
                )
            )
        return _record(row)

    def latest(
        self, name: str, version: int, environments: list[str] | None = None
    ) -> ReplicaTestRecord | None:
        """The newest test of ``name:version`` (run in one of ``environments`` if given)."""
        q = (
            select(ReplicaTest)
            .where(ReplicaTest.model_name == name, ReplicaTest.model_version == version)
            .order_by(ReplicaTest.finished_at.desc(), ReplicaTest.id.desc())
            .limit(1)
        )
        if environments is not None:
            q = q.where(ReplicaTest.environment.in_(environments))
        with self._db.read() as s:
            row = s.scalars(q).first()
            return _record(row) if row is not None else None

    def recent(self, name: str | None = None, limit: int = 20) -> list[ReplicaTestRecord]:
        q = select(ReplicaTest).order_by(ReplicaTest.finished_at.desc()).limit(limit)
        if name is not None:
            q = q.where(ReplicaTest.model_name == name)
        with self._db.read() as s:
            return [_record(r) for r in s.scalars(q)]
