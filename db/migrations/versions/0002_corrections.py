"""Folder memory and the worker's own links: what corrections are recognised from.

- aftertrip_folder: each person folder's mean embedding per embedder, as the last regroup
  left it (per-photo results are stored in batches between regroups);
- aftertrip_link: the links the worker wrote, and the corrections people made to them.

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
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
SHA256 = sa.String(64)


def upgrade() -> None:
    """Create aftertrip_folder and aftertrip_link."""
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

    op.create_table(
        "aftertrip_link",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("trip_id", sa.BigInteger(), nullable=False),
        sa.Column("photo_id", sa.BigInteger(), nullable=False),
        sa.Column("tagface_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("noticed_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_aftertrip_link"),
        sa.ForeignKeyConstraint(
            ["trip_id"], ["trips_trip.id"], name="fk_aftertrip_link_trip_id", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["photo_id"],
            ["photos_photo.id"],
            name="fk_aftertrip_link_photo_id",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tagface_id"],
            ["photos_tagface.id"],
            name="fk_aftertrip_link_tagface_id",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["aftertrip_job.id"], name="fk_aftertrip_link_job_id", ondelete="SET NULL"
        ),
        # One record per link: a correction replaces the worker's record of it.
        sa.UniqueConstraint("photo_id", "tagface_id", name="uq_aftertrip_link_photo_id_tagface_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_aftertrip_link_trip_id_state", "aftertrip_link", ["trip_id", "state"])
    op.create_index("ix_aftertrip_link_tagface_id", "aftertrip_link", ["tagface_id"])
    op.create_index("ix_aftertrip_link_job_id", "aftertrip_link", ["job_id"])


def downgrade() -> None:
    """Drop aftertrip_link and aftertrip_folder."""
    op.drop_table("aftertrip_link")
    op.drop_table("aftertrip_folder")
