"""``store.monitor_state``: what a monitoring pass carries to the next, compare-and-set.

A pass reads its state (``get``), works, and writes the new state back with the
generation it read (``put``). The write succeeds only when nobody wrote in between: a
first write inserts generation 1 (two first writers race on the primary key, one wins),
later writes update ``where generation == expected``. The loser gets False and must
re-read: two monitors never both advance the same cursor.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import MonitorState, utcnow


class MonitorStateRepository:
    """JSON state by key (``monitor|production|vehicles``, ...) with a write generation."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, key: str) -> tuple[int, dict[str, Any]]:
        """``(generation, state)`` of ``key``; ``(0, {})`` when it was never written."""
        q = select(MonitorState.generation, MonitorState.state).where(MonitorState.key == key)
        with self._db.read() as s:
            row = s.execute(q).first()
        if row is None:
            return 0, {}
        return int(row.generation), dict(row.state or {})

    def put(self, key: str, state: dict[str, Any], expected_generation: int) -> bool:
        """Write ``state`` as generation ``expected_generation + 1`` if ``key`` is still at
        ``expected_generation``; False when another writer got there first."""
        now = utcnow()
        with self._db.write_connection() as conn:
            if expected_generation == 0:
                stmt = (
                    self._db.insert(MonitorState)
                    .values(key=key, generation=1, state=state, updated_at=now)
                    .on_conflict_do_nothing(index_elements=["key"])
                    .returning(MonitorState.key)
                )
            else:
                stmt = (
                    update(MonitorState)
                    .where(
                        MonitorState.key == key,
                        MonitorState.generation == expected_generation,
                    )
                    .values(generation=expected_generation + 1, state=state, updated_at=now)
                    .returning(MonitorState.key)
                )
            # RETURNING, not rowcount: an ignored insert's rowcount is not portable.
            return conn.execute(stmt).first() is not None

    def keys(self, prefix: str = "") -> list[str]:
        """The keys stored, sorted, those starting with ``prefix`` when given."""
        q = select(MonitorState.key).order_by(MonitorState.key)
        if prefix:
            q = q.where(MonitorState.key.startswith(prefix, autoescape=True))
        with self._db.read() as s:
            return list(s.scalars(q))

    def delete(self, key: str) -> bool:
        """Forget ``key`` (a monitor starting afresh); False when it was not stored."""
        with self._db.write_connection() as conn:
            return conn.execute(delete(MonitorState).where(MonitorState.key == key)).rowcount == 1
