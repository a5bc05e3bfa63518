"""Readers' feedback, and whether serve --keep-images stored the image of a reading.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("reading_id", sa.String(36), sa.ForeignKey("readings.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("agreed", sa.Boolean, nullable=False),
        sa.Column("true_label", sa.String(64)),
        sa.Column("note", sa.String(280)),
    )
    op.create_index("ix_feedback_reading_id", "feedback", ["reading_id"])
    with op.batch_alter_table("readings") as batch:
        batch.add_column(sa.Column("image_kept", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("readings") as batch:
        batch.drop_column("image_kept")
    op.drop_table("feedback")
