"""Tables of the results database (SQLAlchemy 2 typed ORM).

The shape follows the flow of a study through the node:

    studies ─< series ─< instances             what arrived (one row per SOP instance)
    studies ─< study_versions >─< instances    what was declared complete, and when
    study_versions ─ analyses ─< lesions       what a worker measured (one analysis per version)
    analyses ─< reports ─< exports ─< export_attempts   what was sent where
    audit_events                               every state change, in its own transaction
    study_versions ─< study_embeddings         study-level vectors (HLIP encoder)
    study_embedding_packs                      packed copy of the searchable vectors (derived)
    lesions ─< location_reviews                radiologist confirmations/corrections (latest wins)

States are plain strings with CHECK constraints (no database enum types, so adding a
state is one migration on both backends).  Times are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from node.db.base import Base, JSONType, UTCDateTime

# 64-bit keys for the tables that grow per instance; SQLite needs "INTEGER PRIMARY KEY"
# for its rowid alias (autoincrement), which is 64-bit there anyway.
BigId = BigInteger().with_variant(Integer(), "sqlite")

UID = String(64)  # PS3.5 §9: a UID is at most 64 characters
AE = String(16)  # PS3.5 §6.2 VR AE


def _in(column: str, values: type[enum.Enum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class VersionState(enum.StrEnum):
    """Life of one study version (one complete instance set)."""

    PENDING = "pending"  # declared complete by the sweep; not yet handed to the queue
    QUEUED = "queued"  # the analysis task was enqueued
    ANALYSING = "analysing"  # a worker claimed it
    ANALYSED = "analysed"  # findings stored (and a report, if one was due)
    FAILED = "failed"  # the analysis failed (reason on the analysis row)
    EXPORTED = "exported"  # every export of its report is done
    SUPERSEDED = "superseded"  # a newer version replaced it before analysis started


class InstanceOrigin(enum.StrEnum):
    """Where an indexed instance came from (``instances.origin``)."""

    RECEIVED = "received"  # input from a sender
    OWN = "own"  # a Locus result sent back to us (our SR forwarded by the PACS, another Locus's SR)


class StudyStatus(enum.StrEnum):
    """Summary of a study: ``receiving`` until a version exists, then its latest version's state."""

    RECEIVING = "receiving"
    PENDING = "pending"
    QUEUED = "queued"
    ANALYSING = "analysing"
    ANALYSED = "analysed"
    FAILED = "failed"
    EXPORTED = "exported"


class AnalysisStatus(enum.StrEnum):
    """Where an analysis run stands; ``running`` rows carry a lease a sweeper can reclaim."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ExportState(enum.StrEnum):
    """Where one export of one report stands, so each report is sent once per destination."""
    PENDING = "pending"  # waiting for next_attempt_at
    SENDING = "sending"  # claimed by an exporter until next_attempt_at (lease)
    DONE = "done"
    FAILED = "failed"  # attempts exhausted; `locus exports retry` puts it back to pending


class AuditKind(enum.StrEnum):
    """What an audit row records; every received or refused instance and state change has one."""
    RECEIVED = "received"
    REJECTED = "rejected"
    COMPLETE = "complete"
    SUPERSEDED = "superseded"
    QUEUED = "queued"
    STARTED = "started"
    ANALYSED = "analysed"
    FAILED = "failed"
    REQUEUED = "requeued"
    LEASE_EXPIRED = "lease_expired"  # a worker stopped renewing its analysis lease (died)
    EXPORT_QUEUED = "export_queued"
    EXPORTED = "exported"
    EXPORT_FAILED = "export_failed"
    EXPORT_RETRY = "export_retry"
    LOCATION_REVIEWED = "location_reviewed"
    DATASET_EXPORTED = "dataset_exported"
    DUPLICATE = "duplicate"  # a SOP Instance UID received again with different content


class Study(Base):
    """A study as received, keyed by its Study Instance UID, with its completion state."""
    __tablename__ = "studies"
    __table_args__ = (CheckConstraint(_in("status", StudyStatus), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    status: Mapped[str] = mapped_column(String(16), default=StudyStatus.RECEIVING.value)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    latest_version: Mapped[int] = mapped_column(Integer, default=0)
    # When the oldest instance not contained in any version arrived; NULL when every
    # instance belongs to a version.  The completion sweep looks only at these studies,
    # and the force-complete cap counts from here.
    pending_since: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    # New instances arrived after a version was queued or analysed (a re-run is due).
    has_late_instances: Mapped[bool] = mapped_column(Boolean, default=False)
    # SOP Instance UIDs of this study received again with different content
    # (dicom.duplicate_policy; each one also audited as "duplicate").
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Series(Base):
    """A series of a study, with what completion and the analysis need to know of it."""
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)
    number_of_slices: Mapped[int | None] = mapped_column(Integer)  # (0054,0081), PET only
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Instance(Base):
    """One received instance: its UIDs and where its bytes are in the spool."""
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(1024))  # relative to the spool directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    receive_count: Mapped[int] = mapped_column(Integer, default=1)
    # For SEG: [[series_uid, sop_uid], ...] of the source images it references.
    referenced_instances: Mapped[list[list[str]] | None] = mapped_column(JSONType)
    # InstanceOrigin: "own" = produced by this node or another Locus (never a version's
    # input, never counted toward completeness); "received" = everything else.
    origin: Mapped[str] = mapped_column(
        String(16), default="received", server_default="received"
    )


class StudyVersion(Base):
    """One declared-complete instance set of a study; version 1, 2, … as late data arrives."""

    __tablename__ = "study_versions"
    __table_args__ = (
        UniqueConstraint("study_id", "version"),
        CheckConstraint(_in("state", VersionState), name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    completion_rule: Mapped[str] = mapped_column(String(32))
    ready_at: Mapped[datetime] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    instance_count: Mapped[int] = mapped_column(Integer)
    # sha256 over the sorted SOP Instance UIDs: equal hashes = the same instance set.
    instance_set_hash: Mapped[str] = mapped_column(String(64))


class StudyVersionInstance(Base):
    """Which instances a study version contains (its exact input)."""

    __tablename__ = "study_version_instances"

    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id", ondelete="CASCADE"), primary_key=True)
    instance_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Analysis(Base):
    """One analysis run of one study version, with the lease that makes a killed worker recoverable."""
    __tablename__ = "analyses"
    __table_args__ = (CheckConstraint(_in("status", AnalysisStatus), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    reason_code: Mapped[str | None] = mapped_column(String(64))  # LocusError.code
    reason_text: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # AnalysisResult.to_json()
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    # The worker holding the analysis while it runs (migration 0004): it renews the lease,
    # the sweeper reclaims it once expired, and only the holder may store a result (fencing).
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class Lesion(Base):
    """One measured lesion of an analysis, as written to the SR."""
    __tablename__ = "lesions"
    __table_args__ = (UniqueConstraint("analysis_id", "lesion_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"), index=True)
    lesion_id: Mapped[str] = mapped_column(String(32))  # "S2", "S2C3"
    seg_sop_uid: Mapped[str | None] = mapped_column(UID)
    segment_number: Mapped[int] = mapped_column(Integer)
    component: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(256))
    tracking_uid: Mapped[str | None] = mapped_column(UID)
    suv_max: Mapped[float | None] = mapped_column(Float)
    suv_mean: Mapped[float | None] = mapped_column(Float)
    suv_peak: Mapped[float | None] = mapped_column(Float)
    suv_unit: Mapped[str | None] = mapped_column(String(32))  # UCUM, e.g. g/ml{SUVbw}
    volume_ml: Mapped[float] = mapped_column(Float)
    tlg: Mapped[float | None] = mapped_column(Float)
    ct_mean_hu: Mapped[float | None] = mapped_column(Float)
    voxel_count: Mapped[int] = mapped_column(Integer)
    bbox: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # {"center_mm": [...], "size_mm": [...]}
    centroid_mm: Mapped[list[float] | None] = mapped_column(JSONType)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)
    site_id: Mapped[str | None] = mapped_column(String(64), index=True)
    site_code: Mapped[str | None] = mapped_column(String(64))
    site_scheme: Mapped[str | None] = mapped_column(String(16))
    site_name: Mapped[str | None] = mapped_column(String(256))
    localization: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # rankings, alternatives, flags
    model_id: Mapped[str | None] = mapped_column(String(128))
    flags: Mapped[list[dict[str, str]] | None] = mapped_column(JSONType)


class Report(Base):
    """One SR written for an analysis, with the UIDs that identify it in the PACS."""
    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"), index=True)
    sr_sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(1024))
    predecessor_sop_uid: Mapped[str | None] = mapped_column(UID)  # Predecessor Documents Sequence
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Export(Base):
    """One report's export to one destination: the outbox row the exporter claims."""
    __tablename__ = "exports"
    __table_args__ = (
        UniqueConstraint("report_id", "destination"),
        CheckConstraint(_in("state", ExportState), name="state"),
        Index("ix_exports_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # in the current round (reset by retry)
    last_status: Mapped[int | None] = mapped_column(Integer)  # DIMSE status of the last attempt
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ExportAttempt(Base):
    """One try of an export, kept so an operator can see why a send failed."""
    __tablename__ = "export_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    export_id: Mapped[int] = mapped_column(ForeignKey("exports.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    ok: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class AuditEvent(Base):
    """PHI-free trail of state changes: UIDs and codes, never names or patient IDs."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_kind_at", "kind", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID)
    sop_uid: Mapped[str | None] = mapped_column(UID)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class ReviewAction(enum.StrEnum):
    """What a reviewer did to a lesion's location; the SR's next version carries it."""
    CONFIRM = "confirm"  # the location shown (prediction or earlier review) is right
    CORRECT = "correct"  # the lesion is elsewhere: a library site id is given


class LocationReview(Base):
    """One radiologist review of a lesion's location; the newest row of a lesion wins.

    Rows are never updated or deleted by the node (the history is the table); the site is
    stored coded, as the library named it when the review was made.
    """

    __tablename__ = "location_reviews"
    __table_args__ = (
        CheckConstraint(_in("action", ReviewAction), name="action"),
        Index("ix_location_reviews_lesion_row_id_at", "lesion_row_id", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lesion_row_id: Mapped[int] = mapped_column(ForeignKey("lesions.id", ondelete="CASCADE"))
    action: Mapped[str] = mapped_column(String(16))
    site_id: Mapped[str] = mapped_column(String(64), index=True)
    site_code: Mapped[str] = mapped_column(String(64))
    site_scheme: Mapped[str] = mapped_column(String(16))
    site_name: Mapped[str] = mapped_column(String(256))
    predicted_site_id: Mapped[str | None] = mapped_column(String(64))  # the localizer's, when it ran
    previous_site_id: Mapped[str | None] = mapped_column(String(64))  # what this review replaced
    library_version: Mapped[str] = mapped_column(String(32))
    library_hash: Mapped[str] = mapped_column(String(64))
    reviewer: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    note: Mapped[str | None] = mapped_column(Text)


class StudyEmbedding(Base):
    """A study-level embedding; the vector is float32 little-endian bytes (portable)."""

    __tablename__ = "study_embeddings"
    __table_args__ = (UniqueConstraint("study_version_id", "model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(String(128))
    dim: Mapped[int] = mapped_column(Integer)
    preprocessing_version: Mapped[str] = mapped_column(String(64))
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class StudyEmbeddingPack(Base):
    """Packed copy of the searchable embeddings: up to ``PACK_SIZE`` vectors per row.

    Derived from ``study_embeddings`` (the source of truth) and maintained in the same
    transaction by :func:`node.db.analyses.store_embedding`: for every (study, model) it holds
    exactly one entry, the embedding of the study's latest version that has one from that
    model, in the pack group of its preprocessing version.  Why: one 2 KB vector per row costs
    one database page per study to read (≈ 0.5 s for 100,000 studies on SQLite); packed rows
    are read sequentially in a few tens of ms.  Arrays are little-endian (``study_ids`` int64 =
    ``studies.id``, ``versions`` int32, ``vectors`` float32 ``[count, dim]``).  The quantized columns let a query
    read a quarter of the bytes and still return the exact result (see ``node.db.embedding_codes``).
    """

    __tablename__ = "study_embedding_packs"
    __table_args__ = (UniqueConstraint("model_id", "preprocessing_version", "pack_no"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(128))
    preprocessing_version: Mapped[str] = mapped_column(String(64))
    pack_no: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    study_ids: Mapped[bytes] = mapped_column(LargeBinary)
    versions: Mapped[bytes] = mapped_column(LargeBinary)
    # int8 codes of ``vectors`` for the search's bounded first pass (node.db.embedding_codes):
    # int8 [count, dim], float32 per-vector scale, float32 norm, float32 residual norm (rounded up).
    # Before ``vectors``: SQLite reaches a column only through the overflow pages of those before it.
    codes: Mapped[bytes] = mapped_column(LargeBinary)
    code_scales: Mapped[bytes] = mapped_column(LargeBinary)
    norms: Mapped[bytes] = mapped_column(LargeBinary)
    residual_norms: Mapped[bytes] = mapped_column(LargeBinary)
    vectors: Mapped[bytes] = mapped_column(LargeBinary)
