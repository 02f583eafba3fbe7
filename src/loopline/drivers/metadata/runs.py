"""Pipeline runs: what ran, how it was started, how it ended, and who may resume it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from loopline import __version__
from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import PipelineRun, utcnow
from loopline.errors import NotFound

RESUMABLE = ("failed", "interrupted")


@dataclass(frozen=True)
class RunClaim:
    """The outcome of ``RunRepository.claim``: whether it won, and the run as it now is."""

    won: bool
    run: PipelineRun


class RunRepository:
    """``store.runs``: create, update, find and claim pipeline runs."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self,
        run_id: str,
        *,
        pipeline: str,
        project: str,
        config: dict[str, Any],
        trigger: str = "manual",
        trigger_ref: str | None = None,
        git_commit: str | None = None,
    ) -> PipelineRun:
        """Record a new run, ``running`` in this process."""
        row = PipelineRun(
            id=run_id,
            pipeline=pipeline,
            project=project,
            status="running",
            trigger=trigger,
            trigger_ref=trigger_ref,
            config=config,
            git_commit=git_commit,
            loopline_version=__version__,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=utcnow(),
        )
        with self._db.write() as s:
            s.add(row)
        return row

    def update(self, run_id: str, **fields: Any) -> None:
        """Set columns of a run (status, error, finished_at, lineage ...)."""
        with self._db.write() as s:
            s.execute(update(PipelineRun).where(PipelineRun.id == run_id).values(**fields))

    def get(self, run_id: str) -> PipelineRun:
        """A run by id or unique id prefix; a run whose process died reads ``interrupted``."""
        return _mark_dead(self._get(run_id))

    def recent(self, limit: int = 50) -> list[PipelineRun]:
        """The newest ``limit`` runs, newest first."""
        with self._db.read() as s:
            q = select(PipelineRun).order_by(PipelineRun.started_at.desc()).limit(limit)
            return [_mark_dead(r) for r in s.scalars(q)]

    def claim(self, run_id: str) -> RunClaim:
        """Take a failed or interrupted run over for this process, atomically.

        A run may be claimed when it failed or was interrupted, or when it is recorded as
        running by a process of this host that no longer exists. The claim is one
        compare-and-set UPDATE on the status (and pid and host) that was read, so of two
        concurrent claims exactly one wins; the winner's run is ``running`` with this
        process's pid and host, its error and finish time cleared.
        """
        row = self._get(run_id)
        cond: Any
        if row.status in RESUMABLE:
            cond = PipelineRun.status.in_(RESUMABLE)
        elif row.status == "running" and _process_gone(row):
            cond = (
                (PipelineRun.status == "running")
                & (PipelineRun.pid == row.pid)
                & (PipelineRun.host == row.host)
            )
        else:
            return RunClaim(False, _mark_dead(row))
        stmt = (
            update(PipelineRun)
            .where(PipelineRun.id == row.id, cond)
            .values(
                status="running",
                pid=os.getpid(),
                host=socket.gethostname(),
                error=None,
                finished_at=None,
            )
        )
        with self._db.write() as s:
            won = s.connection().execute(stmt).rowcount == 1
        return RunClaim(won, _mark_dead(self._get(row.id)))

    def _get(self, run_id: str) -> PipelineRun:
        with self._db.read() as s:
            row = s.get(PipelineRun, run_id)
            if row is not None:
                return row
            q = select(PipelineRun).where(PipelineRun.id.startswith(run_id)).limit(2)
            matches = list(s.scalars(q))
        if len(matches) != 1:
            raise NotFound(f"no run {run_id!r} (see `loopline runs`)")
        return matches[0]


def _process_gone(run: PipelineRun) -> bool:
    """True when ``run`` is recorded by a process of this host that no longer exists."""
    if run.host != socket.gethostname() or not run.pid:
        return False
    try:
        os.kill(run.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _mark_dead(run: PipelineRun) -> PipelineRun:
    """Report a 'running' run whose process is gone (killed) as 'interrupted'."""
    if run.status == "running" and _process_gone(run):
        run.status = "interrupted"
    return run
