"""Read models for the CLI and operators (JSON-ready dataclasses and dicts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.analyses import reports_for_study
from node.db.models import (
    Analysis,
    AnalysisStatus,
    AuditEvent,
    AuditKind,
    Export,
    Instance,
    InstanceOrigin,
    Lesion,
    Series,
    Study,
    StudyVersion,
)


@dataclass(frozen=True)
class StudySummary:
    """One study's row in ``locus studies``."""
    study_uid: str
    status: str
    instances: int
    series: int
    first_received_at: datetime
    last_received_at: datetime
    latest_version: int
    has_late_instances: bool
    lesions: int | None  # of the newest succeeded analysis; None when there is none


@dataclass(frozen=True)
class LesionRow:
    """One lesion's row in ``locus lesions``."""
    study_uid: str
    version: int
    lesion_id: str
    segment_number: int
    component: int | None
    label: str
    site_id: str | None
    site_name: str | None
    site_code: str | None
    suv_max: float | None
    suv_mean: float | None
    suv_peak: float | None
    suv_unit: str | None
    volume_ml: float
    tlg: float | None
    ct_mean_hu: float | None
    voxel_count: int
    centroid_mm: list[float] | None
    model_id: str | None


def _latest_succeeded_analysis_ids(session: Session, study_ids: Sequence[int] | None = None) -> dict[int, int]:
    """study id → id of the analysis of its newest successfully analysed version."""
    query = (
        select(StudyVersion.study_id, Analysis.id, StudyVersion.version)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(Analysis.status == AnalysisStatus.SUCCEEDED.value)
    )
    if study_ids is not None:
        query = query.where(StudyVersion.study_id.in_(list(study_ids)))
    best: dict[int, tuple[int, int]] = {}
    for study_id, analysis_id, version in session.execute(query):
        if study_id not in best or version > best[study_id][1]:
            best[study_id] = (analysis_id, version)
    return {k: v[0] for k, v in best.items()}


def list_studies(session: Session, *, limit: int = 100, status: str | None = None) -> list[StudySummary]:
    """Most recently active studies first."""
    query = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Study.status == status)
    studies = list(session.scalars(query))
    ids = [s.id for s in studies]
    series_counts = dict(
        session.execute(
            select(Series.study_id, func.count(Series.id)).where(Series.study_id.in_(ids)).group_by(Series.study_id)
        ).all()
    )
    analyses = _latest_succeeded_analysis_ids(session, ids)
    lesion_counts: dict[int, int] = dict(
        session.execute(
            select(Lesion.analysis_id, func.count(Lesion.id))
            .where(Lesion.analysis_id.in_(list(analyses.values())))
            .group_by(Lesion.analysis_id)
        ).all()
    )
    return [
        StudySummary(
            study_uid=s.study_uid,
            status=s.status,
            instances=s.instance_count,
            series=int(series_counts.get(s.id, 0)),
            first_received_at=s.first_received_at,
            last_received_at=s.last_received_at,
            latest_version=s.latest_version,
            has_late_instances=s.has_late_instances,
            lesions=lesion_counts.get(analyses[s.id], 0) if s.id in analyses else None,
        )
        for s in studies
    ]


def study_exists(session: Session, study_uid: str) -> bool:
    """Whether the database knows ``study_uid`` (query commands answer "no such study" otherwise)."""
    return session.scalar(select(Study.id).where(Study.study_uid == study_uid)) is not None


def list_lesions(session: Session, study_uid: str | None = None, *, limit: int = 1000) -> list[LesionRow]:
    """Lesions of each study's newest successful analysis (one study, or all)."""
    study_ids = None
    if study_uid is not None:
        sid = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        if sid is None:
            return []
        study_ids = [sid]
    analyses = _latest_succeeded_analysis_ids(session, study_ids)
    if not analyses:
        return []
    rows = session.execute(
        select(Lesion, Study.study_uid, StudyVersion.version)
        .join(Analysis, Analysis.id == Lesion.analysis_id)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(Lesion.analysis_id.in_(list(analyses.values())))
        .order_by(Study.study_uid, Lesion.segment_number, Lesion.component, Lesion.lesion_id)
        .limit(limit)
    )
    return [
        LesionRow(
            study_uid=uid,
            version=version,
            lesion_id=les.lesion_id,
            segment_number=les.segment_number,
            component=les.component,
            label=les.label,
            site_id=les.site_id,
            site_name=les.site_name,
            site_code=les.site_code,
            suv_max=les.suv_max,
            suv_mean=les.suv_mean,
            suv_peak=les.suv_peak,
            suv_unit=les.suv_unit,
            volume_ml=les.volume_ml,
            tlg=les.tlg,
            ct_mean_hu=les.ct_mean_hu,
            voxel_count=les.voxel_count,
            centroid_mm=les.centroid_mm,
            model_id=les.model_id,
        )
        for les, uid, version in rows
    ]


def study_detail(session: Session, study_uid: str, *, audit_limit: int = 50) -> dict[str, Any] | None:
    """Everything known about one study, JSON-ready (for ``locus results show``)."""
    study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
    if study is None:
        return None

    def ts(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    series = [
        {
            "series_uid": s.series_uid,
            "modality": s.modality,
            "instances": s.instance_count,
            "number_of_slices": s.number_of_slices,
            "frame_of_reference_uid": s.frame_of_reference_uid,
            "last_received_at": ts(s.last_received_at),
        }
        for s in session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id))
    ]
    versions = []
    for v, a in session.execute(
        select(StudyVersion, Analysis)
        .outerjoin(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(StudyVersion.study_id == study.id)
        .order_by(StudyVersion.version)
    ):
        entry: dict[str, Any] = {
            "version": v.version,
            "state": v.state,
            "completion_rule": v.completion_rule,
            "ready_at": ts(v.ready_at),
            "instances": v.instance_count,
            "instance_set_hash": v.instance_set_hash,
            "analysis": None,
        }
        if a is not None:
            entry["analysis"] = {
                "status": a.status,
                "reason_code": a.reason_code,
                "reason": a.reason_text,
                "attempts": a.attempts,
                "started_at": ts(a.started_at),
                "finished_at": ts(a.finished_at),
                "timings": a.timings,
                "result": a.result,
            }
        versions.append(entry)
    reports = []
    for r in reports_for_study(session, study_uid):
        exports = [
            {
                "destination": e.destination,
                "state": e.state,
                "attempts": e.attempts,
                "last_status": e.last_status,
                "last_error": e.last_error,
                "next_attempt_at": ts(e.next_attempt_at),
            }
            for e in session.scalars(select(Export).where(Export.report_id == r.id).order_by(Export.id))
        ]
        reports.append(
            {
                "version": r.version,
                "sr_sop_uid": r.sr_sop_uid,
                "series_uid": r.series_uid,
                "path": r.path,
                "predecessor_sop_uid": r.predecessor_sop_uid,
                "exports": exports,
            }
        )
    audit = [
        {"at": ts(e.at), "kind": e.kind, "sop_uid": e.sop_uid, "detail": e.detail}
        for e in session.scalars(
            select(AuditEvent)
            .where(AuditEvent.study_uid == study_uid, AuditEvent.kind != AuditKind.RECEIVED.value)
            .order_by(AuditEvent.id.desc())
            .limit(audit_limit)
        )
    ]
    return {
        "study_uid": study.study_uid,
        "status": study.status,
        "instances": study.instance_count,
        "first_received_at": ts(study.first_received_at),
        "last_received_at": ts(study.last_received_at),
        "latest_version": study.latest_version,
        "has_late_instances": study.has_late_instances,
        # SOP Instance UIDs received again with different content (dicom.duplicate_policy).
        "duplicates": study.duplicate_count,
        # Locus results sent back to us: indexed, never a version's input (not in "instances").
        "own_instances": int(
            session.scalar(
                select(func.count(Instance.id))
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == study.id, Instance.origin == InstanceOrigin.OWN.value)
            )
            or 0
        ),
        "series": series,
        "versions": versions,
        "reports": reports,
        "lesions": [_lesion_json(row) for row in list_lesions(session, study_uid)],
        "audit": audit,
    }


def _lesion_json(row: LesionRow) -> dict[str, Any]:
    return {k: getattr(row, k) for k in row.__dataclass_fields__}


def audit_events(
    session: Session, *, study_uid: str | None = None, kind: str | None = None, limit: int = 100
) -> list[AuditEvent]:
    """Newest audit events first (optionally for one study or of one kind)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if study_uid is not None:
        query = query.where(AuditEvent.study_uid == study_uid)
    if kind is not None:
        query = query.where(AuditEvent.kind == kind)
    return list(session.scalars(query))
