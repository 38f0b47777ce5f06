"""aftertrip_face.chip_size: a face's size in the pixels its chip was cut from.

The trip write's grouping needs it to apply the small-face rule (`worker.rules.small_faces`)
as the album path does; faces stored before it have NULL and count as not small.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add aftertrip_face.chip_size (NULL for faces stored before)."""
    with op.batch_alter_table("aftertrip_face") as batch:
        batch.add_column(sa.Column("chip_size", sa.Float(), nullable=True))


def downgrade() -> None:
    """Drop aftertrip_face.chip_size."""
    with op.batch_alter_table("aftertrip_face") as batch:
        batch.drop_column("chip_size")
