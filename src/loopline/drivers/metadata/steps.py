"""Step runs (parameters, input/output digests, cache keys, logs) and HPO trials."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import HpoTrial, StepRun, utcnow
from loopline.errors import NotFound


class StepRepository:
    """``store.steps``: start and finish step runs, find cached ones."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def start(
        self,
        run_id: str,
        step: str,
        *,
        cache_key: str,
        code_version: str,
        params: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        cached: bool = False,
        cached_from: str | None = None,
    ) -> int:
        """Record a step of ``run_id`` as running; returns the step run's id."""
        row = StepRun(
            run_id=run_id,
            step=step,
            status="running",
            cache_key=cache_key,
            code_version=code_version,
            params=params or {},
            inputs=inputs or {},
            cached=cached,
            cached_from=cached_from,
            started_at=utcnow(),
        )
        with self._db.write() as s:
            s.add(row)
            s.flush()
            return row.id

    def finish(
        self,
        step_id: int,
        *,
        status: str,
        outputs: dict[str, Any] | None = None,
        log: str | None = None,
        error: str | None = None,
        duration_s: float | None = None,
    ) -> None:
        """Record how a step ended; the duration defaults to the time since it started."""
        with self._db.write() as s:
            row = s.get(StepRun, step_id)
            if row is None:
                raise NotFound(f"no step run {step_id}")
            now = utcnow()
            started = row.started_at
            if started.tzinfo is None:  # SQLite returns naive UTC
                started = started.replace(tzinfo=now.tzinfo)
            row.status = status
            row.finished_at = now
            row.duration_s = (now - started).total_seconds() if duration_s is None else duration_s
            if outputs is not None:
                row.outputs = outputs
            if log is not None:
                row.log = log
            if error is not None:
                row.error = error

    def find_cached(self, step: str, cache_key: str) -> StepRun | None:
        """The latest successful run of ``step`` with this cache key, if any."""
        q = (
            select(StepRun)
            .where(
                StepRun.step == step,
                StepRun.cache_key == cache_key,
                StepRun.status == "succeeded",
            )
            .order_by(StepRun.id.desc())
            .limit(1)
        )
        with self._db.read() as s:
            return s.scalars(q).first()

    def for_run(self, run_id: str) -> list[StepRun]:
        """The steps of a run in the order they started."""
        with self._db.read() as s:
            q = select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.id)
            return list(s.scalars(q))


class TrialRepository:
    """``store.trials``: hyper-parameter trials of a run's train step."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        run_id: str,
        number: int,
        *,
        state: str,
        params: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        value: float | None = None,
        epochs: int = 0,
        duration_s: float | None = None,
    ) -> None:
        """Insert or replace trial ``number`` of a run (a resumed run re-records trials)."""
        values: dict[str, Any] = dict(
            state=state,
            params=params or {},
            metrics=metrics or {},
            value=value,
            epochs=epochs,
            duration_s=duration_s,
        )
        stmt = self._db.insert(HpoTrial).values(
            run_id=run_id, number=number, created_at=utcnow(), **values
        )
        stmt = stmt.on_conflict_do_update(index_elements=["run_id", "number"], set_=values)
        with self._db.write() as s:
            s.execute(stmt)

    def for_run(self, run_id: str) -> list[HpoTrial]:
        """The trials of a run by number."""
        with self._db.read() as s:
            q = select(HpoTrial).where(HpoTrial.run_id == run_id).order_by(HpoTrial.number)
            return list(s.scalars(q))
