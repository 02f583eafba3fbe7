"""The audit log: who did what to which object, and when."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import AuditEvent


class AuditLog:
    """``store.audit``: append and read audit events."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(self, actor: str, action: str, subject: str, **details: Any) -> None:
        """Append one event (``details`` must be plain JSON)."""
        with self._db.write() as s:
            s.add(AuditEvent(actor=actor, action=action, subject=subject, details=details))

    def recent(self, limit: int = 100) -> list[AuditEvent]:
        """The newest ``limit`` events, newest first."""
        with self._db.read() as s:
            q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
            return list(s.scalars(q))
