"""aftertrip_request and the job's progress columns: the web app's side without a task id.

- aftertrip_request: one row per "group this trip" the web app asked for, written by
  `aftertrip_client` in the app's own transaction (so an upload and its request commit
  together) and taken by the job that carries it out (`claimed_by`, its task id); the job
  deletes the rows it took when it ends. Rows nobody took are what the worker's sweep
  queues again after a broker outage.
- aftertrip_job.stage / progress_done / progress_total: where a running job is, written
  best-effort while it runs, so `aftertrip_client.trip_state` reads progress from the
  database instead of the result backend.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of db.types, so this migration keeps creating what it always created.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    """Create aftertrip_request; add aftertrip_job's progress columns."""
    op.create_table(
        "aftertrip_request",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("trip_id", sa.BigInteger(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("requested_at", TIMESTAMP, nullable=False),
        sa.Column("claimed_by", sa.String(255), nullable=True),
        sa.Column("claimed_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["trip_id"], ["trips_trip.id"], name="fk_aftertrip_request_trip_id", ondelete="CASCADE"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_aftertrip_request_trip_id", "aftertrip_request", ["trip_id"])
    op.create_index("ix_aftertrip_request_claimed_by", "aftertrip_request", ["claimed_by"])
    with op.batch_alter_table("aftertrip_job") as batch:
        batch.add_column(sa.Column("stage", sa.String(16), nullable=True))
        batch.add_column(sa.Column("progress_done", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("progress_total", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Drop aftertrip_request and the progress columns."""
    with op.batch_alter_table("aftertrip_job") as batch:
        batch.drop_column("progress_total")
        batch.drop_column("progress_done")
        batch.drop_column("stage")
    op.drop_table("aftertrip_request")  # its indexes with it (MariaDB's FK needs one)
