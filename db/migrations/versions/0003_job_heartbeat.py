"""aftertrip_job.heartbeat_at: renewed while a worker runs the job.

A `running` row whose heartbeat stopped has lost its worker (or the worker lost the
database); the next job of the trip, or `aftertrip-faces status`, marks it failed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of db.types.UTCDateTime's column type.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    """Add aftertrip_job.heartbeat_at (NULL for jobs that ran before)."""
    with op.batch_alter_table("aftertrip_job") as batch:
        batch.add_column(sa.Column("heartbeat_at", TIMESTAMP, nullable=True))


def downgrade() -> None:
    """Drop aftertrip_job.heartbeat_at."""
    with op.batch_alter_table("aftertrip_job") as batch:
        batch.drop_column("heartbeat_at")
