"""Location reviews: radiologist confirmations and corrections of lesion sites.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Types spelled out here (not imported from node.db) so this revision stays fixed when
# the models change later.
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "location_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lesion_row_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("site_code", sa.String(length=64), nullable=False),
        sa.Column("site_scheme", sa.String(length=16), nullable=False),
        sa.Column("site_name", sa.String(length=256), nullable=False),
        sa.Column("predicted_site_id", sa.String(length=64), nullable=True),
        sa.Column("previous_site_id", sa.String(length=64), nullable=True),
        sa.Column("library_version", sa.String(length=32), nullable=False),
        sa.Column("library_hash", sa.String(length=64), nullable=False),
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.CheckConstraint("action IN ('confirm', 'correct')", name=op.f("ck_location_reviews_action")),
        sa.ForeignKeyConstraint(
            ["lesion_row_id"], ["lesions.id"], name=op.f("fk_location_reviews_lesion_row_id_lesions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_location_reviews")),
    )
    op.create_index(op.f("ix_location_reviews_lesion_row_id_at"), "location_reviews", ["lesion_row_id", "at"])
    op.create_index(op.f("ix_location_reviews_site_id"), "location_reviews", ["site_id"])


def downgrade() -> None:
    op.drop_table("location_reviews")
