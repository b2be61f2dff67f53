"""Report exports: an outbox with leases, bounded retries and a visible failed state
(docs/design.md F5, F6: no retry storms, no silent loss)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from node.db._common import (
    add_audit,
    check_now,
    insert_ignore,
    sync_study_status,
)
from node.db.models import (
    Analysis,
    AuditKind,
    Export,
    ExportAttempt,
    ExportState,
    Report,
    Study,
    StudyVersion,
    VersionState,
)


@dataclass(frozen=True)
class ExportRow:
    """One export claimed by :func:`due_exports`: what to send, where."""

    export_id: int
    report_id: int
    destination: str
    attempts: int  # failed attempts so far in this round
    sr_sop_uid: str
    sr_series_uid: str
    sr_path: str
    study_uid: str
    study_version: int


def _export_context(session: Session, export_id: int) -> tuple[Export, str, int, int]:
    row = session.execute(
        select(Export, Study.study_uid, StudyVersion.version, StudyVersion.id)
        .join(Report, Report.id == Export.report_id)
        .join(Analysis, Analysis.id == Report.analysis_id)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(Export.id == export_id)
        .execution_options(populate_existing=True)
    ).first()
    if row is None:
        raise LookupError(f"no export with id {export_id}")
    return row[0], row[1], row[2], row[3]


def create_export(session: Session, report_id: int, destination: str, *, now: datetime | None = None) -> int:
    """Queue a report for a destination; idempotent on (report, destination)."""
    now = now or datetime.now(UTC)
    check_now(now)
    if not destination or len(destination) > 64:
        raise ValueError("destination must be 1-64 characters")
    created = insert_ignore(
        session,
        Export,
        {
            "report_id": report_id,
            "destination": destination,
            "state": ExportState.PENDING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        },
        ["report_id", "destination"],
    )
    export_id = session.scalar(
        select(Export.id).where(Export.report_id == report_id, Export.destination == destination)
    )
    assert export_id is not None
    if created:
        _, study_uid, version, _ = _export_context(session, export_id)
        add_audit(
            session,
            AuditKind.EXPORT_QUEUED,
            now,
            study_uid=study_uid,
            detail={"export_id": export_id, "destination": destination, "version": version},
        )
    return int(export_id)


def due_exports(session: Session, now: datetime, *, limit: int = 100, lease_s: float = 300.0) -> list[ExportRow]:
    """Claim the exports due now and return what to send.

    Claimed rows become ``sending`` with a lease of ``lease_s``: another exporter does not
    take them, and if this one dies without calling :func:`record_export_attempt` they are
    due again when the lease ends.  Each claim is a conditional update, so two exporters
    never send the same report to the same place at once.
    """
    check_now(now)
    candidates = session.execute(
        select(Export.id, Export.state, Export.next_attempt_at)
        .where(
            or_(
                and_(
                    Export.state == ExportState.PENDING.value,
                    or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= now),
                ),
                and_(Export.state == ExportState.SENDING.value, Export.next_attempt_at <= now),
            )
        )
        .order_by(Export.next_attempt_at, Export.id)
        .limit(limit)
    ).all()
    lease_end = now + timedelta(seconds=lease_s)
    claimed: list[ExportRow] = []
    for export_id, state, next_at in candidates:
        guard = Export.next_attempt_at.is_(None) if next_at is None else Export.next_attempt_at == next_at
        result = session.execute(
            update(Export)
            .where(Export.id == export_id, Export.state == state, guard)
            .values(state=ExportState.SENDING.value, next_attempt_at=lease_end, updated_at=now)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        row = session.execute(
            select(Export, Report, Study.study_uid, StudyVersion.version)
            .join(Report, Report.id == Export.report_id)
            .join(Analysis, Analysis.id == Report.analysis_id)
            .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
            .join(Study, Study.id == StudyVersion.study_id)
            .where(Export.id == export_id)
            .execution_options(populate_existing=True)
        ).one()
        export, report, study_uid, version = row
        claimed.append(
            ExportRow(
                export_id=export.id,
                report_id=report.id,
                destination=export.destination,
                attempts=export.attempts,
                sr_sop_uid=report.sr_sop_uid,
                sr_series_uid=report.series_uid,
                sr_path=report.path,
                study_uid=study_uid,
                study_version=version,
            )
        )
    return claimed


def record_export_attempt(
    session: Session,
    export_id: int,
    *,
    ok: bool,
    status: int | None,
    error: str | None,
    next_attempt_at: datetime | None,
    now: datetime,
) -> None:
    """Record one send: ``done`` when ok, else ``pending`` until ``next_attempt_at`` or,
    without one (attempts exhausted: see ``ExportSettings.next_attempt_at``), ``failed``."""
    check_now(now)
    export, study_uid, version_number, version_id = _export_context(session, export_id)
    session.add(ExportAttempt(export_id=export_id, at=now, ok=ok, status=status, error=error))
    if export.state == ExportState.DONE.value:
        return  # a duplicate report of a send that already succeeded: history only
    export.attempts += 1
    export.last_status = status
    export.updated_at = now
    detail: dict[str, Any] = {
        "export_id": export_id,
        "destination": export.destination,
        "version": version_number,
        "attempt": export.attempts,
        "status": status,
    }
    if ok:
        export.state = ExportState.DONE.value
        export.last_error = None
        export.next_attempt_at = None
        export.done_at = now
        session.flush()
        add_audit(session, AuditKind.EXPORTED, now, study_uid=study_uid, detail=detail)
        _maybe_version_exported(session, version_id)
    else:
        export.last_error = error
        export.next_attempt_at = next_attempt_at
        export.state = ExportState.PENDING.value if next_attempt_at is not None else ExportState.FAILED.value
        detail.update(error=error, final=next_attempt_at is None)
        if next_attempt_at is not None:
            detail["next_attempt_at"] = next_attempt_at.isoformat()
        session.flush()
        add_audit(session, AuditKind.EXPORT_FAILED, now, study_uid=study_uid, detail=detail)


def _maybe_version_exported(session: Session, version_id: int) -> None:
    open_exports = session.scalar(
        select(func.count(Export.id))
        .join(Report, Report.id == Export.report_id)
        .join(Analysis, Analysis.id == Report.analysis_id)
        .where(Analysis.study_version_id == version_id, Export.state != ExportState.DONE.value)
    )
    if open_exports == 0:
        result = session.execute(
            update(StudyVersion)
            .where(StudyVersion.id == version_id, StudyVersion.state == VersionState.ANALYSED.value)
            .values(state=VersionState.EXPORTED.value)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            study_id = session.scalar(select(StudyVersion.study_id).where(StudyVersion.id == version_id))
            assert study_id is not None
            sync_study_status(session, study_id)


def retry_failed_exports(
    session: Session, now: datetime, *, study_uid: str | None = None, destination: str | None = None
) -> int:
    """Put failed exports back to pending (a new round of attempts); returns how many."""
    check_now(now)
    query = select(Export.id).where(Export.state == ExportState.FAILED.value)
    if destination is not None:
        query = query.where(Export.destination == destination)
    if study_uid is not None:
        query = (
            query.join(Report, Report.id == Export.report_id)
            .join(Analysis, Analysis.id == Report.analysis_id)
            .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
            .join(Study, Study.id == StudyVersion.study_id)
            .where(Study.study_uid == study_uid)
        )
    count = 0
    for export_id in list(session.scalars(query)):
        result = session.execute(
            update(Export)
            .where(Export.id == export_id, Export.state == ExportState.FAILED.value)
            .values(state=ExportState.PENDING.value, attempts=0, next_attempt_at=now, updated_at=now)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            count += 1
            export, uid, version, _ = _export_context(session, export_id)
            add_audit(
                session,
                AuditKind.EXPORT_RETRY,
                now,
                study_uid=uid,
                detail={"export_id": export_id, "destination": export.destination, "version": version},
            )
    return count
