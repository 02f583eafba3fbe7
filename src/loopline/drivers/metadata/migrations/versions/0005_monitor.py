"""Monitor: alerts and their events, the loops alerts start, the monitor's carried state;
an index for reading feedback incrementally.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rule", sa.String(100), nullable=False),
        sa.Column("metric", sa.String(100), nullable=False),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.Integer),
        sa.Column("scope", sa.String(300), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("op", sa.String(4), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("open_key", sa.String(700)),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("fired_at", TS),
        sa.Column("resolved_at", TS),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("details", sa.JSON, nullable=False),
        sa.UniqueConstraint("open_key", name="uq_alerts_open_key"),
    )
    op.create_index(
        "ix_alerts_rule_scope", "alerts", ["rule", "environment", "model_name", "scope"]
    )
    op.create_table(
        "alert_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "alert_id", sa.Integer, sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("message", sa.Text),
        sa.Column("details", sa.JSON, nullable=False),
    )
    op.create_index("ix_alert_events_alert", "alert_events", ["alert_id", "at"])
    op.create_table(
        "loops",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "alert_id", sa.Integer, sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("incumbent_version", sa.Integer),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("step", sa.String(24), nullable=False),
        sa.Column("owner", sa.String(200)),
        sa.Column("heartbeat_at", TS),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("dataset_version", sa.String(64)),
        sa.Column("run_id", sa.String(32)),
        sa.Column("model_version", sa.Integer),
        sa.Column("replica_test_id", sa.String(32)),
        sa.Column("deployment_generation", sa.Integer),
        sa.Column("decided_by", sa.String(200)),
        sa.Column("reason", sa.Text),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("timeline", sa.JSON, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("open_key", sa.String(300)),  # model|environment while a retrain is open
        sa.UniqueConstraint("alert_id", name="uq_loops_alert"),
        sa.UniqueConstraint("open_key", name="uq_loops_open_key"),
    )
    op.create_table(
        "monitor_state",
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_feedback_updated_at", "feedback", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_feedback_updated_at", "feedback")
    for table in ("monitor_state", "loops", "alert_events", "alerts"):
        op.drop_table(table)
