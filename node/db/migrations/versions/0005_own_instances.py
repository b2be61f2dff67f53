"""Own instances and conflicting duplicates.

``instances.origin``: ``received`` (input from a sender) or ``own`` (an object this node
or another Locus produced, e.g. our SR forwarded back by a PACS routing rule). Own
instances are stored and indexed but never make a study version nor count toward its
completeness (node.completion). ``studies.duplicate_count``: how many times a SOP
Instance UID of the study arrived again with different content (dicom.duplicate_policy).

Revision ID: 0005_own_instances
Revises: 0004_analysis_leases
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_own_instances"
down_revision: str | None = "0004_analysis_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN with a server default: no table rebuild on either backend.
    op.add_column("instances", sa.Column("origin", sa.String(16), nullable=False, server_default="received"))
    op.add_column("studies", sa.Column("duplicate_count", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35 has it natively): a batch rebuild of a table that other
    # tables reference would drop and re-create it, and ON DELETE CASCADE would empty them.
    op.drop_column("studies", "duplicate_count")
    op.drop_column("instances", "origin")
