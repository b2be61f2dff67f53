"""Analysis leases: the database, not the broker, guarantees that a claimed analysis ends.

A worker that claims a study version holds a lease on its analysis row (``lease_owner``,
``lease_expires_at``) and renews it while it works.  The completion sweeper reclaims an
expired lease (the worker died: kill -9, OOM, lost host) and enqueues the version again,
up to ``analysis.max_attempts`` claims, then fails it with ``attempts_exhausted``.  Rows
``running`` before this revision get no lease (NULL), which the sweeper treats as expired.

Revision ID: 0004_analysis_leases
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_analysis_leases"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here (not imported from node.db) so this revision stays fixed.
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("analyses") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", TIMESTAMP, nullable=True))
    op.create_index(op.f("ix_analyses_lease_expires_at"), "analyses", ["lease_expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_analyses_lease_expires_at"), table_name="analyses")
    # Plain DROP COLUMN (SQLite >= 3.35): a batch rebuild of `analyses` would cascade-delete
    # the reports and lesions that reference it.
    op.drop_column("analyses", "lease_expires_at")
    op.drop_column("analyses", "lease_owner")
