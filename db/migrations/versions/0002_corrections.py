"""Folder memory and the worker's own links: what corrections are recognised from.

- aftertrip_folder: each person folder's mean embedding per embedder, as the last regroup
  left it (per-photo results are stored in batches between regroups).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of db.types, so this migration keeps creating what it always created.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
SHA256 = sa.String(64)


def upgrade() -> None:
    """Create aftertrip_folder."""
    op.create_table(
        "aftertrip_folder",
        sa.Column("tagface_id", sa.BigInteger(), nullable=False),
        sa.Column("embedder_sha256", SHA256, nullable=False),
        sa.Column("trip_id", sa.BigInteger(), nullable=False),
        sa.Column("centroid", sa.LargeBinary(), nullable=False),
        sa.Column("face_count", sa.Integer(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("tagface_id", "embedder_sha256", name="pk_aftertrip_folder"),
        sa.ForeignKeyConstraint(
            ["tagface_id"],
            ["photos_tagface.id"],
            name="fk_aftertrip_folder_tagface_id",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["trip_id"], ["trips_trip.id"], name="fk_aftertrip_folder_trip_id", ondelete="CASCADE"
        ),
    )
    op.create_index(
        "ix_aftertrip_folder_trip_id_embedder_sha256",
        "aftertrip_folder",
        ["trip_id", "embedder_sha256"],
    )


def downgrade() -> None:
    """Drop aftertrip_folder."""
    op.drop_table("aftertrip_folder")
