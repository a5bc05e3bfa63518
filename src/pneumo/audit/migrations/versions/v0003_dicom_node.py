"""Readings from the DICOM node: a keyed hash of the SOP Instance UID and the calling AE title.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("readings") as batch:
        batch.add_column(sa.Column("instance_key", sa.String(64)))
        batch.add_column(sa.Column("calling_ae", sa.String(16)))
        batch.create_index("ix_readings_instance_key", ["instance_key"])


def downgrade() -> None:
    with op.batch_alter_table("readings") as batch:
        batch.drop_index("ix_readings_instance_key")
        batch.drop_column("calling_ae")
        batch.drop_column("instance_key")
