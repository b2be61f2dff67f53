"""Initial schema: studies, series, instances, versions, analyses, lesions, reports, exports, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Types spelled out here (not imported from node.db) so this revision stays fixed when
# the models change later.
TIMESTAMP = sa.DateTime(timezone=True)
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_uid", sa.String(length=64), nullable=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("detail", JSON_DOC, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_kind_at"), "audit_events", ["kind", "at"])
    op.create_index(op.f("ix_audit_events_study_uid"), "audit_events", ["study_uid"])

    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("first_received_at", TIMESTAMP, nullable=False),
        sa.Column("last_received_at", TIMESTAMP, nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("pending_since", TIMESTAMP, nullable=True),
        sa.Column("has_late_instances", sa.Boolean(), nullable=False),
        sa.CheckConstraint(
            "status IN ('receiving', 'pending', 'queued', 'analysing', 'analysed', 'failed', 'exported')",
            name=op.f("ck_studies_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_uid", name=op.f("uq_studies_study_uid")),
    )
    op.create_index(op.f("ix_studies_pending_since"), "studies", ["pending_since"])

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=True),
        sa.Column("number_of_slices", sa.Integer(), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("first_received_at", TIMESTAMP, nullable=False),
        sa.Column("last_received_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_series_study_id_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_uid", name=op.f("uq_series_series_uid")),
    )
    op.create_index(op.f("ix_series_study_id"), "series", ["study_id"])

    op.create_table(
        "study_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("completion_rule", sa.String(length=32), nullable=False),
        sa.Column("ready_at", TIMESTAMP, nullable=False),
        sa.Column("queued_at", TIMESTAMP, nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("instance_set_hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint(
            "state IN ('pending', 'queued', 'analysing', 'analysed', 'failed', 'exported', 'superseded')",
            name=op.f("ck_study_versions_state"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_study_versions_study_id_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_versions")),
        sa.UniqueConstraint("study_id", "version", name=op.f("uq_study_versions_study_id_version")),
    )
    op.create_index(op.f("ix_study_versions_state"), "study_versions", ["state"])
    op.create_index(op.f("ix_study_versions_study_id"), "study_versions", ["study_id"])

    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_version_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("reason_text", sa.Text(), nullable=True),
        sa.Column("timings", JSON_DOC, nullable=True),
        sa.Column("result", JSON_DOC, nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')", name=op.f("ck_analyses_status")),
        sa.ForeignKeyConstraint(
            ["study_version_id"],
            ["study_versions.id"],
            name=op.f("fk_analyses_study_version_id_study_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analyses")),
        sa.UniqueConstraint("study_version_id", name=op.f("uq_analyses_study_version_id")),
    )
    op.create_table(
        "instances",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.Column("last_received_at", TIMESTAMP, nullable=False),
        sa.Column("receive_count", sa.Integer(), nullable=False),
        sa.Column("referenced_instances", JSON_DOC, nullable=True),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_instances_series_id_series"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_uid", name=op.f("uq_instances_sop_uid")),
    )
    op.create_index(op.f("ix_instances_series_id"), "instances", ["series_id"])

    op.create_table(
        "study_embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_version_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("preprocessing_version", sa.String(length=64), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["study_version_id"],
            ["study_versions.id"],
            name=op.f("fk_study_embeddings_study_version_id_study_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_embeddings")),
        sa.UniqueConstraint("study_version_id", "model_id", name=op.f("uq_study_embeddings_study_version_id_model_id")),
    )
    op.create_index(op.f("ix_study_embeddings_study_version_id"), "study_embeddings", ["study_version_id"])

    op.create_table(
        "lesions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("analysis_id", sa.Integer(), nullable=False),
        sa.Column("lesion_id", sa.String(length=32), nullable=False),
        sa.Column("seg_sop_uid", sa.String(length=64), nullable=True),
        sa.Column("segment_number", sa.Integer(), nullable=False),
        sa.Column("component", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(length=256), nullable=False),
        sa.Column("tracking_uid", sa.String(length=64), nullable=True),
        sa.Column("suv_max", sa.Float(), nullable=True),
        sa.Column("suv_mean", sa.Float(), nullable=True),
        sa.Column("suv_peak", sa.Float(), nullable=True),
        sa.Column("suv_unit", sa.String(length=32), nullable=True),
        sa.Column("volume_ml", sa.Float(), nullable=False),
        sa.Column("tlg", sa.Float(), nullable=True),
        sa.Column("ct_mean_hu", sa.Float(), nullable=True),
        sa.Column("voxel_count", sa.Integer(), nullable=False),
        sa.Column("bbox", JSON_DOC, nullable=True),
        sa.Column("centroid_mm", JSON_DOC, nullable=True),
        sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=True),
        sa.Column("site_id", sa.String(length=64), nullable=True),
        sa.Column("site_code", sa.String(length=64), nullable=True),
        sa.Column("site_scheme", sa.String(length=16), nullable=True),
        sa.Column("site_name", sa.String(length=256), nullable=True),
        sa.Column("localization", JSON_DOC, nullable=True),
        sa.Column("model_id", sa.String(length=128), nullable=True),
        sa.Column("flags", JSON_DOC, nullable=True),
        sa.ForeignKeyConstraint(
            ["analysis_id"], ["analyses.id"], name=op.f("fk_lesions_analysis_id_analyses"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lesions")),
        sa.UniqueConstraint("analysis_id", "lesion_id", name=op.f("uq_lesions_analysis_id_lesion_id")),
    )
    op.create_index(op.f("ix_lesions_analysis_id"), "lesions", ["analysis_id"])
    op.create_index(op.f("ix_lesions_site_id"), "lesions", ["site_id"])

    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("analysis_id", sa.Integer(), nullable=False),
        sa.Column("sr_sop_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("predecessor_sop_uid", sa.String(length=64), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["analysis_id"], ["analyses.id"], name=op.f("fk_reports_analysis_id_analyses"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reports")),
        sa.UniqueConstraint("sr_sop_uid", name=op.f("uq_reports_sr_sop_uid")),
    )
    op.create_index(op.f("ix_reports_analysis_id"), "reports", ["analysis_id"])

    op.create_table(
        "study_version_instances",
        sa.Column("study_version_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", BIG_ID, nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_study_version_instances_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["study_version_id"],
            ["study_versions.id"],
            name=op.f("fk_study_version_instances_study_version_id_study_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("study_version_id", "instance_id", name=op.f("pk_study_version_instances")),
    )
    op.create_index(op.f("ix_study_version_instances_instance_id"), "study_version_instances", ["instance_id"])

    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("done_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint("state IN ('pending', 'sending', 'done', 'failed')", name=op.f("ck_exports_state")),
        sa.ForeignKeyConstraint(
            ["report_id"], ["reports.id"], name=op.f("fk_exports_report_id_reports"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
        sa.UniqueConstraint("report_id", "destination", name=op.f("uq_exports_report_id_destination")),
    )
    op.create_index(op.f("ix_exports_report_id"), "exports", ["report_id"])
    op.create_index(op.f("ix_exports_state_next_attempt_at"), "exports", ["state", "next_attempt_at"])

    op.create_table(
        "export_attempts",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("export_id", sa.Integer(), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["export_id"], ["exports.id"], name=op.f("fk_export_attempts_export_id_exports"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_attempts")),
    )
    op.create_index(op.f("ix_export_attempts_export_id"), "export_attempts", ["export_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints; children before parents.
    op.drop_table("export_attempts")
    op.drop_table("exports")
    op.drop_table("study_version_instances")
    op.drop_table("reports")
    op.drop_table("lesions")
    op.drop_table("study_embeddings")
    op.drop_table("instances")
    op.drop_table("analyses")
    op.drop_table("study_versions")
    op.drop_table("series")
    op.drop_table("studies")
    op.drop_table("audit_events")
