"""The worker's tables: jobs, per-photo analyses and faces.

Revision ID: 0001
Revises:
Create Date: 2025-01-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of db.types, so this migration keeps creating what it always created.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
SHA256 = sa.String(64)


def upgrade() -> None:
    """Create aftertrip_job, aftertrip_photo and aftertrip_face."""
    op.create_table(
        "aftertrip_job",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("trip_id", sa.BigInteger(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("celery_task_id", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("detector_name", sa.String(255), nullable=True),
        sa.Column("detector_sha256", SHA256, nullable=True),
        sa.Column("embedder_name", sa.String(255), nullable=True),
        sa.Column("embedder_sha256", SHA256, nullable=True),
        sa.Column("models", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_aftertrip_job"),
        sa.ForeignKeyConstraint(
            ["trip_id"], ["trips_trip.id"], name="fk_aftertrip_job_trip_id", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("celery_task_id", name="uq_aftertrip_job_celery_task_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_aftertrip_job_trip_id_status", "aftertrip_job", ["trip_id", "status"])

    op.create_table(
        "aftertrip_photo",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("photo_id", sa.BigInteger(), nullable=False),
        sa.Column("embedder_name", sa.String(255), nullable=False),
        sa.Column("embedder_sha256", SHA256, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("face_count", sa.Integer(), nullable=True),
        sa.Column("analyzed_at", TIMESTAMP, nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_aftertrip_photo"),
        sa.ForeignKeyConstraint(
            ["photo_id"],
            ["photos_photo.id"],
            name="fk_aftertrip_photo_photo_id",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["aftertrip_job.id"], name="fk_aftertrip_photo_job_id", ondelete="SET NULL"
        ),
        sa.UniqueConstraint(
            "photo_id", "embedder_sha256", name="uq_aftertrip_photo_photo_id_embedder_sha256"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_aftertrip_photo_job_id", "aftertrip_photo", ["job_id"])

    op.create_table(
        "aftertrip_face",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("photo_id", sa.BigInteger(), nullable=False),
        sa.Column("face_index", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.Column("landmarks", sa.JSON(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("embedder_name", sa.String(255), nullable=False),
        sa.Column("embedder_sha256", SHA256, nullable=False),
        sa.Column("tagface_id", sa.BigInteger(), nullable=True),
        sa.Column("group_label", sa.Integer(), nullable=True),
        sa.Column("matched_face_id", sa.BigInteger(), nullable=True),
        sa.Column("similarity", sa.Float(), nullable=True),
        sa.Column("is_cover", sa.Boolean(), nullable=False),
        sa.Column("thumbnail_key", sa.String(1024), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_aftertrip_face"),
        sa.ForeignKeyConstraint(
            ["photo_id"],
            ["photos_photo.id"],
            name="fk_aftertrip_face_photo_id",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tagface_id"],
            ["photos_tagface.id"],
            name="fk_aftertrip_face_tagface_id",
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["matched_face_id"],
            ["aftertrip_face.id"],
            name="fk_aftertrip_face_matched_face_id",
            ondelete="SET NULL",
        ),
        # One row per face of a photo per embedder: a redelivered job cannot add copies.
        sa.UniqueConstraint(
            "photo_id",
            "embedder_sha256",
            "face_index",
            name="uq_aftertrip_face_photo_id_embedder_sha256_face_index",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_aftertrip_face_tagface_id", "aftertrip_face", ["tagface_id"])
    op.create_index("ix_aftertrip_face_matched_face_id", "aftertrip_face", ["matched_face_id"])


def downgrade() -> None:
    """Drop the worker's tables (the web app's stay as they are)."""
    op.drop_table("aftertrip_face")
    op.drop_table("aftertrip_photo")
    op.drop_table("aftertrip_job")
