"""Analyses of study versions: claim, store findings and the SR, fail, re-run; the
inputs of a version; previous reports (predecessors); study embeddings."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from node.db import embedding_packs
from node.db._common import (
    REPLACEABLE,
    add_audit,
    check_now,
    check_uid,
    insert_ignore,
    sync_study_status,
    version_and_study,
)
from node.db.models import (
    Analysis,
    AnalysisStatus,
    AuditKind,
    Instance,
    Lesion,
    Report,
    Series,
    Study,
    StudyEmbedding,
    StudyVersion,
    StudyVersionInstance,
    VersionState,
)


class VersionInstance(NamedTuple):
    path: str  # relative to the spool directory
    sop_uid: str
    series_uid: str
    modality: str


@dataclass(frozen=True)
class ReportRow:
    id: int
    analysis_id: int
    study_uid: str
    version: int
    sr_sop_uid: str
    series_uid: str
    path: str
    predecessor_sop_uid: str | None
    created_at: datetime


@dataclass(frozen=True)
class StoredAnalysis:
    analysis_id: int
    report_id: int | None
    lesion_count: int


def claim_analysis(session: Session, study_version_id: int, now: datetime) -> bool:
    """Start (or resume) the analysis of a study version; False when there is nothing to do.

    True for a pending/queued version (it becomes ``analysing``) and for one already
    ``analysing`` (a redelivered task after a worker died: ``attempts`` counts up).
    False once it is analysed, failed, exported or superseded.
    """
    check_now(now)
    started = session.execute(
        update(StudyVersion)
        .where(StudyVersion.id == study_version_id, StudyVersion.state.in_(REPLACEABLE))
        .values(state=VersionState.ANALYSING.value)
    )
    version, study = version_and_study(session, study_version_id)
    if started.rowcount == 1:  # type: ignore[attr-defined]
        analysis = session.scalars(select(Analysis).where(Analysis.study_version_id == study_version_id)).one_or_none()
        if analysis is None:
            analysis = Analysis(study_version_id=study_version_id, attempts=0)
            session.add(analysis)
        # A version put back by requeue_failed keeps its row: one analysis per version.
        analysis.status = AnalysisStatus.RUNNING.value
        analysis.attempts += 1
        analysis.started_at = now
        analysis.finished_at = None
        analysis.reason_code = None
        analysis.reason_text = None
        analysis.result = None
        attempt = analysis.attempts
    elif version.state == VersionState.ANALYSING.value:
        session.execute(
            update(Analysis)
            .where(Analysis.study_version_id == study_version_id)
            .values(attempts=Analysis.attempts + 1, started_at=now)
        )
        attempt = int(
            session.scalar(select(Analysis.attempts).where(Analysis.study_version_id == study_version_id)) or 0
        )
    else:
        return False
    session.flush()
    sync_study_status(session, study.id)
    add_audit(
        session,
        AuditKind.STARTED,
        now,
        study_uid=study.study_uid,
        detail={"version": version.version, "attempt": attempt},
    )
    return True


def _lesion_values(analysis_id: int, lesion: Mapping[str, Any], suv_unit: str | None) -> dict[str, Any]:
    """Columns of a lesion row from ``pipelines.findings.Lesion`` as JSON (``to_json`` shape)."""
    try:
        m = lesion["measurements"]
        loc = lesion.get("localization")
        site = (loc or {}).get("site")
        bbox = lesion.get("bbox")
        return {
            "analysis_id": analysis_id,
            "lesion_id": str(lesion["lesion_id"]),
            "seg_sop_uid": lesion.get("seg_sop_instance_uid"),
            "segment_number": int(lesion["segment_number"]),
            "component": lesion.get("component"),
            "label": str(lesion.get("segment_label") or ""),
            "tracking_uid": lesion.get("tracking_uid"),
            "suv_max": m.get("suv_max"),
            "suv_mean": m.get("suv_mean"),
            "suv_peak": m.get("suv_peak"),
            "suv_unit": suv_unit,
            "volume_ml": float(m["volume_ml"]),
            "tlg": m.get("tlg"),
            "ct_mean_hu": m.get("ct_mean_hu"),
            "voxel_count": int(m["voxel_count"]),
            "bbox": dict(bbox) if bbox is not None else None,
            "centroid_mm": list(lesion["centroid_mm"]) if lesion.get("centroid_mm") is not None else None,
            "frame_of_reference_uid": lesion.get("frame_of_reference_uid"),
            "site_id": site.get("site_id") if site else None,
            "site_code": site["code"]["value"] if site else None,
            "site_scheme": site["code"]["scheme"] if site else None,
            "site_name": site.get("name") if site else None,
            "localization": dict(loc) if loc else None,
            "model_id": loc["model"]["model_id"] if loc and loc.get("model") else None,
            "flags": list(lesion.get("flags") or []) or None,
        }
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"lesion {lesion.get('lesion_id')!r} is not in pipelines.findings.Lesion JSON form: missing {exc}"
        ) from exc


def store_analysis_result(
    session: Session,
    study_version_id: int,
    result_json: dict[str, Any],
    lesions: list[dict[str, Any]],
    report: Mapping[str, Any] | None,
    now: datetime,
    *,
    timings: dict[str, float] | None = None,
) -> StoredAnalysis:
    """Persist a finished analysis: findings, lesion rows and the SR it produced.

    ``lesions`` are ``pipelines.findings.Lesion`` in JSON form (``AnalysisResult.to_json()
    ["lesions"]``).  ``report`` is ``{"sr_sop_uid", "series_uid", "path", "predecessor"}``
    (``path`` relative to the reports directory; ``predecessor`` the SOP Instance UID of
    the SR it replaces, or None).  Idempotent: storing again for an analysed version
    replaces the lesions and keeps the report of the same SOP Instance UID.
    """
    check_now(now)
    version, study = version_and_study(session, study_version_id)
    if version.state not in (VersionState.ANALYSING.value, VersionState.ANALYSED.value, VersionState.EXPORTED.value):
        raise ValueError(f"study version {study_version_id} is {version.state}, not analysing: claim it first")
    analysis = session.scalars(select(Analysis).where(Analysis.study_version_id == study_version_id)).one()
    analysis.status = AnalysisStatus.SUCCEEDED.value
    analysis.result = result_json
    analysis.timings = timings if timings is not None else result_json.get("timings_s")
    analysis.reason_code = None
    analysis.reason_text = None
    analysis.finished_at = now
    session.flush()

    suv = result_json.get("suv") or {}
    suv_unit = suv.get("unit") if isinstance(suv, dict) else None
    rows = [_lesion_values(analysis.id, lesion, suv_unit) for lesion in lesions]
    session.execute(delete(Lesion).where(Lesion.analysis_id == analysis.id))
    if rows:
        session.execute(insert(Lesion), rows)

    report_id: int | None = None
    if report is not None:
        unknown = set(report) - {"sr_sop_uid", "series_uid", "path", "predecessor"}
        if unknown:
            raise ValueError(f"unknown report keys {sorted(unknown)}")
        check_uid("sr_sop_uid", report["sr_sop_uid"])
        check_uid("series_uid", report["series_uid"])
        check_uid("predecessor", report.get("predecessor"), required=False)
        insert_ignore(
            session,
            Report,
            {
                "analysis_id": analysis.id,
                "sr_sop_uid": report["sr_sop_uid"],
                "series_uid": report["series_uid"],
                "path": str(report["path"]),
                "predecessor_sop_uid": report.get("predecessor"),
                "created_at": now,
            },
            ["sr_sop_uid"],
        )
        report_id = session.scalar(select(Report.id).where(Report.sr_sop_uid == report["sr_sop_uid"]))

    if version.state == VersionState.ANALYSING.value:
        version.state = VersionState.ANALYSED.value
    session.flush()
    sync_study_status(session, study.id)
    add_audit(
        session,
        AuditKind.ANALYSED,
        now,
        study_uid=study.study_uid,
        detail={
            "version": version.version,
            "lesions": len(rows),
            "sr_sop_uid": report["sr_sop_uid"] if report else None,
        },
    )
    return StoredAnalysis(analysis_id=analysis.id, report_id=report_id, lesion_count=len(rows))


def fail_analysis(session: Session, study_version_id: int, code: str, reason: str, now: datetime) -> bool:
    """Record that the analysis of a version failed (``code``: ``LocusError.code``).

    Returns False, changing nothing, when the version is already analysed, exported or
    superseded (a late error from a duplicate task must not undo a stored result).
    """
    check_now(now)
    version, study = version_and_study(session, study_version_id)
    if version.state not in (*REPLACEABLE, VersionState.ANALYSING.value, VersionState.FAILED.value):
        return False
    analysis = session.scalars(select(Analysis).where(Analysis.study_version_id == study_version_id)).one_or_none()
    if analysis is None:  # failed before it could be claimed (e.g. inputs vanished)
        analysis = Analysis(study_version_id=study_version_id, started_at=now, attempts=1)
        session.add(analysis)
    analysis.status = AnalysisStatus.FAILED.value
    analysis.reason_code = code
    analysis.reason_text = reason
    analysis.finished_at = now
    version.state = VersionState.FAILED.value
    session.flush()
    sync_study_status(session, study.id)
    add_audit(
        session,
        AuditKind.FAILED,
        now,
        study_uid=study.study_uid,
        detail={"version": version.version, "code": code, "reason": reason},
    )
    return True


def requeue_failed(session: Session, study_version_id: int, now: datetime) -> bool:
    """Put a failed version back to ``pending`` for another analysis (operator re-run).

    Only the latest version of a study can be re-run (an older one would produce a
    report that a newer version already replaced).  Enqueue it afterwards as usual.
    """
    check_now(now)
    version, study = version_and_study(session, study_version_id)
    if version.version != study.latest_version:
        return False
    result = session.execute(
        update(StudyVersion)
        .where(StudyVersion.id == study_version_id, StudyVersion.state == VersionState.FAILED.value)
        .values(state=VersionState.PENDING.value, queued_at=None)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    sync_study_status(session, study.id)
    add_audit(session, AuditKind.REQUEUED, now, study_uid=study.study_uid, detail={"version": version.version})
    return True


def instances_for_version(session: Session, study_version_id: int) -> list[VersionInstance]:
    """The exact input of a version: (path, sop_uid, series_uid, modality), series by series."""
    rows = session.execute(
        select(Instance.path, Instance.sop_uid, Series.series_uid, Series.modality)
        .join(StudyVersionInstance, StudyVersionInstance.instance_id == Instance.id)
        .join(Series, Series.id == Instance.series_id)
        .where(StudyVersionInstance.study_version_id == study_version_id)
        .order_by(Series.series_uid, Instance.instance_number, Instance.sop_uid)
    )
    return [VersionInstance(*row) for row in rows]


def _report_rows(session: Session, *conditions: Any) -> list[ReportRow]:
    rows = session.execute(
        select(Report, StudyVersion.version, Study.study_uid)
        .join(Analysis, Analysis.id == Report.analysis_id)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(*conditions)
        .order_by(StudyVersion.version.desc(), Report.id.desc())
    )
    return [
        ReportRow(
            id=r.id,
            analysis_id=r.analysis_id,
            study_uid=uid,
            version=v,
            sr_sop_uid=r.sr_sop_uid,
            series_uid=r.series_uid,
            path=r.path,
            predecessor_sop_uid=r.predecessor_sop_uid,
            created_at=r.created_at,
        )
        for r, v, uid in rows
    ]


def previous_report(session: Session, study_uid: str, before_version: int) -> ReportRow | None:
    """The newest SR of an earlier version of the study (its Predecessor Document), or None."""
    rows = _report_rows(session, Study.study_uid == study_uid, StudyVersion.version < before_version)
    return rows[0] if rows else None


def reports_for_study(session: Session, study_uid: str) -> list[ReportRow]:
    return _report_rows(session, Study.study_uid == study_uid)


def _vector_bytes(vector: Sequence[float]) -> bytes:
    arr = array("f", vector)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def _vector_floats(data: bytes) -> list[float]:
    arr = array("f")
    arr.frombytes(data)
    if sys.byteorder != "little":  # pragma: no cover
        arr.byteswap()
    return arr.tolist()


def store_embedding(
    session: Session,
    study_version_id: int,
    *,
    model_id: str,
    vector: Sequence[float],
    preprocessing_version: str,
    now: datetime,
) -> int:
    """Store (or replace) a study embedding as float32 little-endian bytes.

    The packed search copy (:mod:`node.db.embedding_packs`) is updated in the same
    transaction, so a committed embedding is always searchable and nothing else is.
    """
    check_now(now)
    if not vector:
        raise ValueError("empty embedding vector")
    version, _study = version_and_study(session, study_version_id)
    existing = session.scalars(
        select(StudyEmbedding).where(
            StudyEmbedding.study_version_id == study_version_id, StudyEmbedding.model_id == model_id
        )
    ).one_or_none()
    row = existing or StudyEmbedding(study_version_id=study_version_id, model_id=model_id)
    row.dim = len(vector)
    row.preprocessing_version = preprocessing_version
    row.vector = _vector_bytes(vector)
    row.created_at = now
    if existing is None:
        session.add(row)
    session.flush()
    embedding_packs.index_embedding(session, study_id=version.study_id, version=version.version, model_id=model_id,
                                    preprocessing_version=preprocessing_version, vector=row.vector, dim=row.dim)  # fmt: skip
    return row.id


def load_embedding(session: Session, study_version_id: int, model_id: str) -> list[float] | None:
    row = session.scalars(
        select(StudyEmbedding).where(
            StudyEmbedding.study_version_id == study_version_id, StudyEmbedding.model_id == model_id
        )
    ).one_or_none()
    if row is None:
        return None
    values = _vector_floats(row.vector)
    if len(values) != row.dim:
        raise ValueError(f"embedding {row.id} holds {len(values)} values, expected {row.dim}")
    return values
