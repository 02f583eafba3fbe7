"""Prediction log and feedback: what a served model answered, and the truth that came later.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("probabilities", sa.JSON),
        sa.Column("request_metadata", sa.JSON),
        sa.Column("input_stats", sa.JSON),
    )
    op.create_index("ix_predictions_model_at", "predictions", ["model_name", "model_version", "at"])
    op.create_index("ix_predictions_at", "predictions", ["at"])
    op.create_table(
        "feedback",
        sa.Column(
            "prediction_id",
            sa.String(32),
            sa.ForeignKey("predictions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_feedback_at", "feedback", ["at"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("predictions")
