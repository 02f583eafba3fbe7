"""Deployments: the desired state of each environment, its history, and what replicas serve.

Every change is one transaction: the environment's row is locked, its ``generation``
compared with the one the caller read (compare-and-set), the change written with the next
generation, the history row inserted (unique per environment and generation, so history
cannot fork), the registry alias named after the environment moved to the stable version,
and an audit event written. A caller that lost the race gets ``DeploymentConflict`` and
nothing changes.

Replicas (server processes, edge devices) report what they serve with ``report_replica``;
that never changes the desired state or its generation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from loopline.drivers.metadata.database import Database
from loopline.drivers.metadata.models import (
    AuditEvent,
    Deployment,
    DeploymentEvent,
    DeploymentReplica,
    ModelAlias,
    ModelVersion,
    utcnow,
)
from loopline.errors import Conflict, NotFound

STATUSES = ("pending", "healthy", "degraded", "failed")
_FIELDS = (
    "model_name",
    "stable_version",
    "previous_version",
    "candidate_version",
    "strategy",
    "candidate_share",
    "candidate_since",
    "status",
    "target",
    "endpoint",
)


class DeploymentConflict(Conflict):
    """The deployment changed since it was read: re-read it and decide again."""


@dataclass(frozen=True)
class DeploymentState:
    """A deployment as read: plain values, safe to pass between threads."""

    environment: str
    model_name: str | None = None
    stable_version: int | None = None
    previous_version: int | None = None
    candidate_version: int | None = None
    strategy: str = "direct"
    candidate_share: float = 0.0
    candidate_since: datetime | None = None
    status: str = "pending"
    target: str = "local"
    endpoint: str | None = None
    generation: int = 0
    updated_at: datetime | None = None
    updated_by: str = "loopline"
    reason: str | None = None

    @property
    def versions(self) -> list[int]:
        """The versions that must be loaded to serve this state (stable first)."""
        out = [v for v in (self.stable_version, self.candidate_version) if v is not None]
        return list(dict.fromkeys(out))

    def ref(self, version: int | None) -> str | None:
        return f"{self.model_name}:{version}" if version is not None else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("environment", *_FIELDS, "generation", "updated_at", "updated_by", "reason"):
            value = getattr(self, key)
            out[key] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass(frozen=True)
class ReplicaState:
    environment: str
    replica_id: str
    generation: int
    versions: list[int]
    status: str
    endpoint: str | None
    host: str | None
    pid: int | None
    error: str | None
    stats: dict[str, Any] = field(default_factory=dict)
    started_at: datetime | None = None
    last_seen: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in ("started_at", "last_seen"):
            if out[key] is not None:
                out[key] = out[key].isoformat()
        return out


def _state(row: Deployment) -> DeploymentState:
    return DeploymentState(
        environment=row.environment,
        **{k: getattr(row, k) for k in _FIELDS},
        generation=row.generation,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
        reason=row.reason,
    )


class DeploymentRepository:
    """``store.deployments``: read and change deployments, record what replicas serve."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- desired state -------------------------------------------------------------------
    def get(self, environment: str) -> DeploymentState | None:
        with self._db.read() as s:
            row = s.get(Deployment, environment)
            return _state(row) if row is not None else None

    def all(self) -> list[DeploymentState]:
        with self._db.read() as s:
            return [
                _state(r) for r in s.scalars(select(Deployment).order_by(Deployment.environment))
            ]

    def change(
        self,
        environment: str,
        *,
        expected_generation: int,
        action: str,
        actor: str,
        reason: str | None = None,
        **changes: Any,
    ) -> DeploymentState:
        """Apply ``changes`` if the deployment is still at ``expected_generation``.

        ``expected_generation=0`` means the environment has no deployment yet. Raises
        DeploymentConflict when another change came first, NotFound for an unknown model
        version, Conflict for an archived one.
        """

        def decide(current: DeploymentState) -> tuple[str, dict[str, Any]]:
            if current.generation != expected_generation:
                raise DeploymentConflict(
                    f"deployment {environment} changed meanwhile (generation "
                    f"{current.generation}, expected {expected_generation}); read it again "
                    "(`loopline deployments`) and retry"
                )
            return action, changes

        return self.update(environment, decide, actor=actor, reason=reason)

    def update(
        self,
        environment: str,
        decide: Callable[[DeploymentState], tuple[str, dict[str, Any]] | None],
        *,
        actor: str,
        reason: str | None = None,
    ) -> DeploymentState:
        """Read the deployment, ``decide`` (action, changes) or None, and write, all in one
        transaction holding the environment's lock: concurrent updates queue, never fork.

        ``decide`` may raise to refuse; it must not touch the store.
        """
        with self._db.write() as s:
            # The lock also covers the first change, when there is no row to lock yet.
            self._db.lock(s, f"loopline.deployments:{environment}")
            row = s.scalars(
                select(Deployment).where(Deployment.environment == environment).with_for_update()
            ).first()
            current = _state(row) if row is not None else DeploymentState(environment=environment)
            decision = decide(current)
            if decision is None:
                return current
            action, changes = decision
            unknown = set(changes) - set(_FIELDS)
            if unknown:
                raise ValueError(f"unknown deployment fields: {sorted(unknown)}")
            if row is None:
                row = Deployment(environment=environment, generation=0, strategy="direct",
                                 candidate_share=0.0, status="pending", target="local")  # fmt: skip
                s.add(row)
            old_name = row.model_name
            for key, value in changes.items():
                setattr(row, key, value)
            if row.status not in STATUSES:
                raise ValueError(f"status {row.status!r}: allowed {', '.join(STATUSES)}")
            name = row.model_name
            for version in (row.stable_version, row.candidate_version):
                if version is not None:
                    _check_version(s, name, version)
            row.generation = current.generation + 1
            row.updated_at = utcnow()
            row.updated_by = actor
            row.reason = reason
            s.add(
                DeploymentEvent(
                    environment=environment, generation=row.generation, action=action,
                    model_name=name, stable_version=row.stable_version,
                    candidate_version=row.candidate_version, strategy=row.strategy,
                    candidate_share=row.candidate_share, actor=actor, reason=reason,
                    at=row.updated_at,
                )
            )  # fmt: skip
            if old_name is not None and old_name != name:
                _move_alias(self._db, s, old_name, environment, None)
            if name is not None:  # every change re-asserts it, so a hand-moved alias heals
                _move_alias(self._db, s, name, environment, row.stable_version)
            s.add(
                AuditEvent(
                    actor=actor,
                    action=f"deployment.{action}",
                    subject=f"{environment}",
                    details={
                        "generation": row.generation,
                        "model": name,
                        "stable": row.stable_version,
                        "candidate": row.candidate_version,
                        "strategy": row.strategy,
                        "share": row.candidate_share,
                        "reason": reason,
                    },
                )
            )
            s.flush()
            return _state(row)

    def set_status(self, environment: str, generation: int, status: str) -> bool:
        """Record the observed status of a generation (no new generation); False if stale."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: allowed {', '.join(STATUSES)}")
        with self._db.write() as s:
            row = s.get(Deployment, environment, with_for_update=True)
            if row is None or row.generation != generation:
                return False
            if row.status != status:
                row.status = status
            return True

    def history(self, environment: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Changes, newest first."""
        q = select(DeploymentEvent).order_by(DeploymentEvent.id.desc()).limit(limit)
        if environment is not None:
            q = q.where(DeploymentEvent.environment == environment)
        with self._db.read() as s:
            return [
                {
                    "environment": e.environment,
                    "generation": e.generation,
                    "action": e.action,
                    "model_name": e.model_name,
                    "stable_version": e.stable_version,
                    "candidate_version": e.candidate_version,
                    "strategy": e.strategy,
                    "candidate_share": e.candidate_share,
                    "actor": e.actor,
                    "reason": e.reason,
                    "at": e.at.isoformat(),
                }
                for e in s.scalars(q)
            ]

    # -- observed state ------------------------------------------------------------------
    def report_replica(
        self,
        environment: str,
        replica_id: str,
        *,
        generation: int,
        versions: list[int],
        status: str,
        endpoint: str | None = None,
        host: str | None = None,
        pid: int | None = None,
        error: str | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        """Upsert what one replica serves now (its heartbeat)."""
        now = utcnow()
        values = {
            "generation": generation,
            "versions": list(versions),
            "status": status,
            "endpoint": endpoint,
            "host": host,
            "pid": pid,
            "error": error,
            "stats": stats or {},
            "last_seen": now,
        }
        stmt = self._db.insert(DeploymentReplica).values(
            environment=environment, replica_id=replica_id, started_at=now, **values
        )
        stmt = stmt.on_conflict_do_update(index_elements=["environment", "replica_id"], set_=values)
        with self._db.write() as s:
            s.execute(stmt)

    def replicas(
        self, environment: str | None = None, *, seen_within_s: float | None = None
    ) -> list[ReplicaState]:
        q = select(DeploymentReplica).order_by(
            DeploymentReplica.environment, DeploymentReplica.replica_id
        )
        if environment is not None:
            q = q.where(DeploymentReplica.environment == environment)
        if seen_within_s is not None:
            q = q.where(DeploymentReplica.last_seen >= utcnow() - timedelta(seconds=seen_within_s))
        with self._db.read() as s:
            return [
                ReplicaState(
                    r.environment, r.replica_id, r.generation, list(r.versions or []), r.status,
                    r.endpoint, r.host, r.pid, r.error, dict(r.stats or {}), r.started_at,
                    r.last_seen,
                )
                for r in s.scalars(q)
            ]  # fmt: skip

    def remove_replica(self, environment: str, replica_id: str) -> None:
        with self._db.write() as s:
            s.execute(
                delete(DeploymentReplica).where(
                    DeploymentReplica.environment == environment,
                    DeploymentReplica.replica_id == replica_id,
                )
            )


def _check_version(s: Any, name: str | None, version: int) -> None:
    if name is None:
        raise ValueError("a deployment with a version needs a model name")
    row = s.scalars(
        select(ModelVersion)
        .where(ModelVersion.name == name, ModelVersion.version == version)
        .with_for_update(read=True)
    ).first()
    if row is None:
        raise NotFound(f"no model version {name}:{version} (see `loopline models`)")
    if row.archived_at is not None:
        raise Conflict(f"{name}:{version} is archived; unarchive it before deploying it")


def _move_alias(db: Database, s: Any, name: str, alias: str, version: int | None) -> None:
    if version is None:
        s.execute(delete(ModelAlias).where(ModelAlias.name == name, ModelAlias.alias == alias))
        return
    current = s.scalar(
        select(ModelAlias.version).where(ModelAlias.name == name, ModelAlias.alias == alias)
    )
    if current == version:
        return
    now = utcnow()
    stmt = db.insert(ModelAlias).values(name=name, alias=alias, version=version, updated_at=now)
    s.execute(
        stmt.on_conflict_do_update(
            index_elements=["name", "alias"], set_={"version": version, "updated_at": now}
        )
    )
    s.add(
        AuditEvent(
            actor="loopline",
            action="model.alias",
            subject=f"{name}:{version}",
            details={"alias": alias, "previous": current, "by": "deployment"},
        )
    )
