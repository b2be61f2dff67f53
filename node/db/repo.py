"""Every read and write of the results database, as functions taking a ``Session`` first.

This module is the one import the rest of the node uses (``from node.db import repo``);
the functions live in small modules by concern:

- :mod:`node.db.ingest` — received instances and rejections (the listener);
- :mod:`node.db.versions` — completion snapshots and exactly-once study versions;
- :mod:`node.db.analyses` — claim / store / fail analyses, reports, embeddings (workers);
- :mod:`node.db.exports` — the export outbox with leases and bounded retries;
- :mod:`node.db.queries` — read models for the CLI.

Callers own the transaction (``with database.session() as s: ...``): each function
changes state *and* writes the audit event describing the change in that same
transaction, so both commit or neither does (docs/design.md D4).  Functions never commit.

Concurrency: the listener records instances from several association threads, the
completion sweep may run in more than one process, and Celery may deliver a task twice.
Inserts that can race use ``INSERT … ON CONFLICT DO NOTHING`` on the natural key; state
transitions are conditional ``UPDATE … WHERE state = …`` whose row count says who won.
On SQLite every write transaction is serialised anyway (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

from node.db._common import SEG_SOP_CLASSES
from node.db.analyses import (
    ATTEMPTS_EXHAUSTED,
    AnalysisRow,
    LeaseLost,
    Reclaimed,
    ReportRow,
    StoredAnalysis,
    VersionInstance,
    claim_analysis,
    fail_analysis,
    holds_lease,
    instances_for_version,
    list_analyses,
    load_embedding,
    new_lease_owner,
    previous_report,
    reclaim_expired_leases,
    release_analysis,
    renew_lease,
    reports_for_study,
    requeue_failed,
    requeue_stranded,
    store_analysis_result,
    store_embedding,
    stranded_versions,
)
from node.db.exports import (
    ExportRow,
    create_export,
    due_exports,
    record_export_attempt,
    retry_failed_exports,
)
from node.db.ingest import (
    IndexedCopy,
    InstanceRecord,
    RecordOutcome,
    indexed_copy,
    indexed_instances,
    record_instance,
    record_rejection,
    study_calling_aes,
)
from node.db.queries import (
    LesionRow,
    StudySummary,
    audit_events,
    list_lesions,
    list_studies,
    study_detail,
    study_exists,
)
from node.db.versions import (
    SegReferences,
    SeriesState,
    StudySnapshot,
    VersionInfo,
    complete_study,
    create_study_version,
    get_version,
    lock_study,
    mark_queued,
    mark_requeued_stale,
    pending_study_ids,
    stale_queued_versions,
    study_snapshot,
    versions_to_enqueue,
)

__all__ = [
    "ATTEMPTS_EXHAUSTED",
    "SEG_SOP_CLASSES",
    "AnalysisRow",
    "ExportRow",
    "IndexedCopy",
    "InstanceRecord",
    "LeaseLost",
    "LesionRow",
    "Reclaimed",
    "RecordOutcome",
    "ReportRow",
    "SegReferences",
    "SeriesState",
    "StoredAnalysis",
    "StudySnapshot",
    "StudySummary",
    "VersionInfo",
    "VersionInstance",
    "audit_events",
    "claim_analysis",
    "complete_study",
    "create_export",
    "create_study_version",
    "due_exports",
    "fail_analysis",
    "get_version",
    "holds_lease",
    "indexed_copy",
    "indexed_instances",
    "instances_for_version",
    "list_analyses",
    "list_lesions",
    "list_studies",
    "load_embedding",
    "lock_study",
    "mark_queued",
    "mark_requeued_stale",
    "new_lease_owner",
    "pending_study_ids",
    "previous_report",
    "reclaim_expired_leases",
    "record_export_attempt",
    "record_instance",
    "record_rejection",
    "release_analysis",
    "renew_lease",
    "reports_for_study",
    "requeue_failed",
    "requeue_stranded",
    "retry_failed_exports",
    "stale_queued_versions",
    "store_analysis_result",
    "store_embedding",
    "stranded_versions",
    "study_calling_aes",
    "study_detail",
    "study_exists",
    "study_snapshot",
    "versions_to_enqueue",
]
