"""Deploy: deployments and their history, replicas, replica tests, edge devices and their
telemetry, captured request images; predictions gain environment, variant and camera.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("environment", sa.String(64), primary_key=True),
        sa.Column("model_name", sa.String(200)),
        sa.Column("stable_version", sa.Integer),
        sa.Column("previous_version", sa.Integer),
        sa.Column("candidate_version", sa.Integer),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("candidate_share", sa.Float, nullable=False),
        sa.Column("candidate_since", TS),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("endpoint", sa.Text),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text),
    )
    op.create_table(
        "deployment_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("model_name", sa.String(200)),
        sa.Column("stable_version", sa.Integer),
        sa.Column("candidate_version", sa.Integer),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("candidate_share", sa.Float, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("at", TS, nullable=False),
        sa.UniqueConstraint("environment", "generation", name="uq_deployment_history_gen"),
    )
    op.create_table(
        "deployment_replicas",
        sa.Column("environment", sa.String(64), primary_key=True),
        sa.Column("replica_id", sa.String(200), primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.Text),
        sa.Column("host", sa.String(200)),
        sa.Column("pid", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("stats", sa.JSON, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=False),
    )
    op.create_table(
        "replica_tests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("passed", sa.Boolean, nullable=False),
        sa.Column("reasons", sa.JSON, nullable=False),
        sa.Column("report", sa.JSON, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
    )
    op.create_index(
        "ix_replica_tests_model", "replica_tests", ["model_name", "model_version", "finished_at"]
    )
    op.create_table(
        "devices",
        sa.Column("environment", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(200), primary_key=True),
        sa.Column("model_name", sa.String(200)),
        sa.Column("model_version", sa.Integer),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("host", sa.String(200)),
        sa.Column("info", sa.JSON, nullable=False),
        sa.Column("telemetry", sa.JSON, nullable=False),
        sa.Column("via", sa.String(16)),
        sa.Column("first_seen", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=False),
    )
    op.create_table(
        "telemetry",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(200), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("via", sa.String(16), nullable=False),
        sa.Column("model_version", sa.Integer),
        sa.Column("metrics", sa.JSON, nullable=False),
    )
    op.create_index("ix_telemetry_device_at", "telemetry", ["environment", "device_id", "at"])
    op.create_table(
        "captures",
        sa.Column("prediction_id", sa.String(32), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("media_type", sa.String(64), nullable=False),
        sa.Column("environment", sa.String(64)),
        sa.Column("at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("dataset_version", sa.String(64)),
    )
    op.create_index("ix_captures_sha256", "captures", ["sha256"])
    op.create_index("ix_captures_expires_at", "captures", ["expires_at"])
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("environment", sa.String(64)))
        batch.add_column(sa.Column("deployment_generation", sa.Integer))
        batch.add_column(sa.Column("variant", sa.String(16)))
        batch.add_column(sa.Column("camera_id", sa.String(200)))
    op.create_index("ix_predictions_env_at", "predictions", ["environment", "at"])
    op.create_index("ix_predictions_camera_id", "predictions", ["camera_id"])


def downgrade() -> None:
    op.drop_index("ix_predictions_camera_id", "predictions")
    op.drop_index("ix_predictions_env_at", "predictions")
    with op.batch_alter_table("predictions") as batch:
        for col in ("camera_id", "variant", "deployment_generation", "environment"):
            batch.drop_column(col)
    for table in (
        "captures",
        "telemetry",
        "devices",
        "replica_tests",
        "deployment_replicas",
        "deployment_history",
        "deployments",
    ):
        op.drop_table(table)
