"""SQLAlchemy models of the metadata store.

The schema is owned by Alembic migrations (``migrations/versions``); these classes must
match the latest migration. Change both together, never rewrite an applied migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for col in self.__table__.columns:
            value = getattr(self, col.key)
            if isinstance(value, datetime):
                if value.tzinfo is None:
                    value = value.replace(tzinfo=UTC)
                value = value.isoformat()
            out[col.key] = value
        return out


class DatasetVersion(Base):
    """An immutable, content-addressed set of records read from a data source."""

    __tablename__ = "dataset_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source_uri: Mapped[str] = mapped_column(Text)
    n_records: Mapped[int] = mapped_column(Integer)
    records_sha256: Mapped[str] = mapped_column(String(64))
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by_run: Mapped[str | None] = mapped_column(String(32), nullable=True)


class PipelineRun(Base):
    """One execution of a pipeline, and what started it (a person, a schedule, an alert)."""

    __tablename__ = "pipeline_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(100))
    project: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    trigger: Mapped[str] = mapped_column(String(20), default="manual")
    trigger_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    dataset_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    git_commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    loopline_version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class StepRun(Base):
    """One step of a run: parameters, input/output artifact digests, timings and log."""

    __tablename__ = "step_runs"
    __table_args__ = (Index("ix_step_runs_cache", "step", "cache_key", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("pipeline_runs.id"), index=True)
    step: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20))
    cache_key: Mapped[str] = mapped_column(String(64))
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    cached_from: Mapped[str | None] = mapped_column(String(32), nullable=True)
    code_version: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    log: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class HpoTrial(Base):
    """One hyper-parameter trial of a train step."""

    __tablename__ = "hpo_trials"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("pipeline_runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    epochs: Mapped[int] = mapped_column(Integer, default=0)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelVersion(Base):
    """A registered model version with its metrics, bundle and lineage."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    bundle_uri: Mapped[str] = mapped_column(Text)
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    dataset_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # An archived version holds no alias and is hidden from listings; NAME:VERSION finds it.
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelAlias(Base):
    """A movable name (candidate, staging, production) pointing at one version."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """Who did what to which object, and when."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(String(300))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Prediction(Base):
    """One answer of a served model: label, confidence, request metadata, input statistics.

    Written in batches by the server's prediction log, off the request path.
    """

    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_model_at", "model_name", "model_version", "at"),
        Index("ix_predictions_env_at", "environment", "at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(20))
    label: Mapped[str] = mapped_column(String(200))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    request_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    input_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    environment: Mapped[str | None] = mapped_column(String(64), nullable=True)
    deployment_generation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # stable, canary, shadow, or addressed (the request named its version)
    variant: Mapped[str | None] = mapped_column(String(16), nullable=True)
    camera_id: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)


class Feedback(Base):
    """The ground-truth label of a prediction, arriving later; one per prediction."""

    __tablename__ = "feedback"

    prediction_id: Mapped[str] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True
    )
    label: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # Monitor reads feedback incrementally by this (ix_feedback_updated_at).
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class Deployment(Base):
    """The desired state of one environment: which versions serve, how traffic splits.

    ``generation`` grows by one with every change (compare-and-set); each change also
    writes a ``DeploymentEvent`` with the same generation.
    """

    __tablename__ = "deployments"

    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    stable_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    candidate_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    strategy: Mapped[str] = mapped_column(String(16), default="direct")
    candidate_share: Mapped[float] = mapped_column(Float, default=0.0)
    candidate_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    target: Mapped[str] = mapped_column(String(32), default="local")
    endpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200), default="loopline")
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class DeploymentEvent(Base):
    """One change of a deployment: the state it led to, who made it and why."""

    __tablename__ = "deployment_history"
    __table_args__ = (
        UniqueConstraint("environment", "generation", name="uq_deployment_history_gen"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    stable_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    candidate_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    strategy: Mapped[str] = mapped_column(String(16))
    candidate_share: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeploymentReplica(Base):
    """What one serving process (or edge device) of an environment reports it serves."""

    __tablename__ = "deployment_replicas"

    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    versions: Mapped[list[int]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReplicaTest(Base):
    """The outcome of a candidate's replica test: passed or not, why, and the full report."""

    __tablename__ = "replica_tests"
    __table_args__ = (
        Index("ix_replica_tests_model", "model_name", "model_version", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    environment: Mapped[str] = mapped_column(String(64))
    passed: Mapped[bool] = mapped_column(Boolean)
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200), default="loopline")


class Device(Base):
    """An edge device of an environment: the version it runs and its latest telemetry."""

    __tablename__ = "devices"

    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    telemetry: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    via: Mapped[str | None] = mapped_column(String(16), nullable=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TelemetrySample(Base):
    """One telemetry report of a device or server (latency, CPU, memory, sensors)."""

    __tablename__ = "telemetry"
    __table_args__ = (Index("ix_telemetry_device_at", "environment", "device_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    via: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Capture(Base):
    """A request image kept for retraining (content-addressed), linked to its prediction."""

    __tablename__ = "captures"

    prediction_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(Integer)
    media_type: Mapped[str] = mapped_column(String(64))
    environment: Mapped[str | None] = mapped_column(String(64), nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    dataset_version: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Alert(Base):
    """One occurrence of an alert rule for a (version, scope): pending, firing, resolved.

    ``open_key`` is the dedup key (rule, environment, model, version, scope) while the alert
    is not resolved and NULL after: its unique constraint keeps one open alert per key.
    """

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("open_key", name="uq_alerts_open_key"),
        Index("ix_alerts_rule_scope", "rule", "environment", "model_name", "scope"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(100))
    metric: Mapped[str] = mapped_column(String(100))
    environment: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    scope: Mapped[str] = mapped_column(String(300), default="global")
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))  # pending | firing | resolved
    op: Mapped[str] = mapped_column(String(4))
    threshold: Mapped[float] = mapped_column(Float)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples: Mapped[int] = mapped_column(Integer, default=0)
    action: Mapped[str] = mapped_column(String(16), default="none")
    open_key: Mapped[str | None] = mapped_column(String(700), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    fired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AlertEvent(Base):
    """One transition of an alert (or a note on it: notified, approved, retrain rejected)."""

    __tablename__ = "alert_events"
    __table_args__ = (Index("ix_alert_events_alert", "alert_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # pending, firing, resolved, notified, ...
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    actor: Mapped[str] = mapped_column(String(200), default="loopline (monitor)")
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class LoopRun(Base):
    """The action an alert started (retrain, notify, approve), as a resumable state machine.

    One per alert (unique ``alert_id``): a monitor restarted mid-loop finds it and resumes
    it; two monitors never run two loops for one alert. ``open_key`` is
    ``model|environment`` while a retrain is open and NULL once it ends: its unique
    constraint keeps one open retrain per model and environment. ``owner`` and
    ``heartbeat_at`` say which process holds it; a stale heartbeat lets another take it over.
    """

    __tablename__ = "loops"
    __table_args__ = (
        UniqueConstraint("alert_id", name="uq_loops_alert"),
        UniqueConstraint("open_key", name="uq_loops_open_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(16))
    model_name: Mapped[str] = mapped_column(String(200))
    environment: Mapped[str] = mapped_column(String(64))
    incumbent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # waiting_approval | running | succeeded | rejected | failed
    status: Mapped[str] = mapped_column(String(24))
    step: Mapped[str] = mapped_column(String(24))
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dataset_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    replica_test_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    deployment_generation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timeline: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    open_key: Mapped[str | None] = mapped_column(String(300), nullable=True)


class MonitorState(Base):
    """What a monitoring pass carries to the next (cursors, windows, CUSUM statistics).

    ``generation`` grows with each write (compare-and-set), so two monitors never both
    advance the same cursor.
    """

    __tablename__ = "monitor_state"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
