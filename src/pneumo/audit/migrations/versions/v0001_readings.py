"""Readings and the models that made them (pneumo 0.1.0, the first audit trail).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("arch", sa.String(64), nullable=False),
        sa.Column("classes", sa.Text, nullable=False),
        sa.Column("positive_class", sa.String(64)),
        sa.Column("threshold_method", sa.String(64)),
        sa.Column("folder", sa.Text),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "readings",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("pneumo_version", sa.String(32), nullable=False),
        sa.Column("runtime", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("image_format", sa.String(16)),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float),
        sa.Column("decision", sa.String(64), nullable=False),
        sa.Column("in_scope", sa.Boolean),
        sa.Column("latency_ms", sa.Float, nullable=False),
    )
    op.create_index("ix_readings_created_at", "readings", ["created_at"])
    op.create_index("ix_readings_model_id", "readings", ["model_id"])
    op.create_index("ix_readings_image_sha256", "readings", ["image_sha256"])


def downgrade() -> None:
    op.drop_table("readings")
    op.drop_table("models")
