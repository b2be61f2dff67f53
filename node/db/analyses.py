"""Analyses of study versions: claim, store findings and the SR, fail, re-run; the
inputs of a version; previous reports (predecessors); study embeddings."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

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
    """One instance of a study version, as the worker needs it to read the file from the spool."""
    path: str  # relative to the spool directory
    sop_uid: str
    series_uid: str
    modality: str


@dataclass(frozen=True)
class ReportRow:
    """One stored SR as the report listing and the exporter see it."""
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
    """What storing one analysis produced: ids for the audit log and the export queue."""
    analysis_id: int
    report_id: int | None
    lesion_count: int


DEFAULT_LEASE_S = 300.0  # the default of analysis.lease_s
ATTEMPTS_EXHAUSTED = "attempts_exhausted"


class LeaseLost(RuntimeError):
    """The analysis lease is no longer this worker's: the sweeper reclaimed it after it
    expired (and another worker may hold it now), or the version was finished or requeued.
    The worker must not store anything (fencing)."""


def new_lease_owner() -> str:
    """A lease token unique to one claim: host, process and a random part (no paths)."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:16]}"


def _lease_until(now: datetime, lease_s: float) -> datetime:
    if lease_s <= 0:
        raise ValueError("lease_s must be positive")
    return now + timedelta(seconds=lease_s)


def claim_analysis(
    session: Session,
    study_version_id: int,
    now: datetime,
    *,
    owner: str | None = None,
    lease_s: float = DEFAULT_LEASE_S,
) -> str | None:
    """Start the analysis of a pending/queued version; returns the lease token, or None.

    The claim moves the version to ``analysing``, counts an attempt and gives the caller a
    lease until ``now + lease_s`` (``owner``, a fresh :func:`new_lease_owner` if None).
    None (nothing to do) once the version is ``analysing`` under someone's lease, analysed,
    failed, exported or superseded: a redelivered or duplicate message must not start a
    second analysis while the first worker still renews its lease.  A worker that died
    stops renewing; :func:`reclaim_expired_leases` then puts the version back to
    ``queued`` and the next message claims it here.
    """
    check_now(now)
    token = owner or new_lease_owner()
    until = _lease_until(now, lease_s)
    started = session.execute(
        update(StudyVersion)
        .where(StudyVersion.id == study_version_id, StudyVersion.state.in_(REPLACEABLE))
        .values(state=VersionState.ANALYSING.value)
    )
    if started.rowcount != 1:  # type: ignore[attr-defined]
        return None
    version, study = version_and_study(session, study_version_id)
    analysis = session.scalars(select(Analysis).where(Analysis.study_version_id == study_version_id)).one_or_none()
    if analysis is None:
        analysis = Analysis(study_version_id=study_version_id, attempts=0)
        session.add(analysis)
    # A version put back by a reclaim or an operator requeue keeps its row: one analysis per version.
    analysis.status = AnalysisStatus.RUNNING.value
    analysis.attempts = (analysis.attempts or 0) + 1
    analysis.started_at = now
    analysis.finished_at = None
    analysis.reason_code = None
    analysis.reason_text = None
    analysis.result = None
    analysis.lease_owner = token
    analysis.lease_expires_at = until
    session.flush()
    sync_study_status(session, study.id)
    add_audit(
        session,
        AuditKind.STARTED,
        now,
        study_uid=study.study_uid,
        detail={"version": version.version, "attempt": analysis.attempts},
    )
    return token


def renew_lease(session: Session, study_version_id: int, owner: str, now: datetime, lease_s: float) -> bool:
    """Extend the caller's lease to ``now + lease_s``; False when it is not the caller's any more.

    One conditional UPDATE: it races safely with :func:`reclaim_expired_leases` (whichever
    commits first wins; the loser's condition no longer matches).
    """
    check_now(now)
    result = session.execute(
        update(Analysis)
        .where(
            Analysis.study_version_id == study_version_id,
            Analysis.lease_owner == owner,
            Analysis.status == AnalysisStatus.RUNNING.value,
        )
        .values(lease_expires_at=_lease_until(now, lease_s))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def holds_lease(session: Session, study_version_id: int, owner: str) -> bool:
    """Whether ``owner`` still holds the running analysis of this version."""
    return (
        session.scalar(
            select(Analysis.id).where(
                Analysis.study_version_id == study_version_id,
                Analysis.lease_owner == owner,
                Analysis.status == AnalysisStatus.RUNNING.value,
            )
        )
        is not None
    )


@dataclass(frozen=True)
class Reclaimed:
    """A lease taken back from a worker: the version is ``queued`` again, or ``failed``."""

    study_version_id: int
    study_uid: str
    version: int
    attempts: int
    requeued: bool  # False: attempts exhausted, the version failed


def _requeue_or_exhaust(
    session: Session,
    analysis: Analysis,
    version: StudyVersion,
    study: Study,
    now: datetime,
    *,
    max_attempts: int,
    why: str,
) -> bool:
    """Put a version whose lease was given up back to ``queued``, or fail it once its
    attempts reach ``max_attempts``.  True when requeued."""
    analysis.lease_owner = None
    analysis.lease_expires_at = None
    if analysis.attempts >= max_attempts:
        _record_failure(
            session, analysis, version, study, now, ATTEMPTS_EXHAUSTED,
            f"{why}; gave up after {analysis.attempts} attempt(s) (analysis.max_attempts = {max_attempts})",
        )  # fmt: skip
        return False
    version.state = VersionState.QUEUED.value
    version.queued_at = now
    session.flush()
    sync_study_status(session, study.id)
    return True


def reclaim_expired_leases(session: Session, now: datetime, *, max_attempts: int) -> list[Reclaimed]:
    """Take back every analysis whose lease expired (its worker died), oldest first.

    Each is audited ``lease_expired`` (attempt, holder) and put back to ``queued`` for a
    new message, or, after ``max_attempts`` claims, failed with ``attempts_exhausted``.
    A ``running`` analysis without a lease (written before leases existed) counts as
    expired.  Guarded by a conditional UPDATE on the holder and the expiry, so a lease
    renewed meanwhile, or reclaimed by another sweeper, is left alone.
    """
    check_now(now)
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    expired = _lease_expired(now)
    rows = session.execute(
        select(Analysis.id, Analysis.study_version_id, Analysis.lease_owner, Analysis.lease_expires_at)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .where(
            Analysis.status == AnalysisStatus.RUNNING.value,
            StudyVersion.state == VersionState.ANALYSING.value,
            expired,
        )
        .order_by(Analysis.id)
    ).all()
    reclaimed: list[Reclaimed] = []
    for analysis_id, vid, owner, expires_at in rows:
        taken = session.execute(
            update(Analysis)
            .where(
                Analysis.id == analysis_id,
                Analysis.status == AnalysisStatus.RUNNING.value,
                Analysis.lease_owner.is_(None) if owner is None else Analysis.lease_owner == owner,
                expired,
            )
            .values(lease_owner=None, lease_expires_at=None)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            continue
        version, study = version_and_study(session, vid)
        analysis = session.scalars(
            select(Analysis).where(Analysis.id == analysis_id).execution_options(populate_existing=True)
        ).one()
        add_audit(
            session,
            AuditKind.LEASE_EXPIRED,
            now,
            study_uid=study.study_uid,
            detail={
                "version": version.version,
                "attempt": analysis.attempts,
                "holder": owner,
                "expired_at": expires_at.isoformat() if expires_at is not None else None,
            },
        )
        requeued = _requeue_or_exhaust(
            session, analysis, version, study, now, max_attempts=max_attempts,
            why=f"the worker stopped renewing its lease (attempt {analysis.attempts})",
        )  # fmt: skip
        if requeued:
            add_audit(
                session,
                AuditKind.REQUEUED,
                now,
                study_uid=study.study_uid,
                detail={"version": version.version, "reason": "lease_expired", "attempts": analysis.attempts},
            )
        reclaimed.append(Reclaimed(vid, study.study_uid, version.version, analysis.attempts, requeued))
    return reclaimed


def release_analysis(
    session: Session, study_version_id: int, owner: str, code: str, reason: str, now: datetime, *, max_attempts: int
) -> bool | None:
    """The holder gives its lease back after a transient error: the version is ``queued``
    again (True) or, its attempts spent, ``failed`` with ``attempts_exhausted`` (False).
    None, changing nothing, when the caller no longer holds the lease."""
    check_now(now)
    version, study = version_and_study(session, study_version_id)
    analysis = session.scalars(
        select(Analysis).where(
            Analysis.study_version_id == study_version_id,
            Analysis.lease_owner == owner,
            Analysis.status == AnalysisStatus.RUNNING.value,
        )
    ).one_or_none()
    if analysis is None or version.state != VersionState.ANALYSING.value:
        return None
    requeued = _requeue_or_exhaust(
        session, analysis, version, study, now, max_attempts=max_attempts, why=f"{code}: {reason}"
    )
    if requeued:
        add_audit(
            session,
            AuditKind.REQUEUED,
            now,
            study_uid=study.study_uid,
            detail={"version": version.version, "reason": code, "detail": reason, "attempts": analysis.attempts},
        )
    return requeued


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
    lease_owner: str | None = None,
) -> StoredAnalysis:
    """Persist a finished analysis: findings, lesion rows and the SR it produced.

    ``lesions`` are ``pipelines.findings.Lesion`` in JSON form (``AnalysisResult.to_json()
    ["lesions"]``).  ``report`` is ``{"sr_sop_uid", "series_uid", "path", "predecessor"}``
    (``path`` relative to the reports directory; ``predecessor`` the SOP Instance UID of
    the SR it replaces, or None).  Idempotent: storing again for an analysed version
    replaces the lesions and keeps the report of the same SOP Instance UID.

    With ``lease_owner`` (every worker passes its claim's token) the store is fenced: it
    raises :class:`LeaseLost`, storing nothing, unless the caller still holds the lease
    of the running analysis.  The check is a conditional UPDATE in this transaction, so
    a reclaim by the sweeper and this store cannot both succeed.
    """
    check_now(now)
    version, study = version_and_study(session, study_version_id)
    if lease_owner is not None:
        fenced = session.execute(
            update(Analysis)
            .where(
                Analysis.study_version_id == study_version_id,
                Analysis.lease_owner == lease_owner,
                Analysis.status == AnalysisStatus.RUNNING.value,
            )
            .values(lease_owner=None, lease_expires_at=None)
        )
        if fenced.rowcount != 1 or version.state != VersionState.ANALYSING.value:  # type: ignore[attr-defined]
            raise LeaseLost(f"study version {study_version_id}: the analysis lease is no longer held by this worker")
    if version.state not in (VersionState.ANALYSING.value, VersionState.ANALYSED.value, VersionState.EXPORTED.value):
        raise ValueError(f"study version {study_version_id} is {version.state}, not analysing: claim it first")
    analysis = session.scalars(
        select(Analysis).where(Analysis.study_version_id == study_version_id).execution_options(populate_existing=True)
    ).one()
    analysis.lease_owner = None
    analysis.lease_expires_at = None
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


def _record_failure(
    session: Session, analysis: Analysis, version: StudyVersion, study: Study, now: datetime, code: str, reason: str
) -> None:
    analysis.status = AnalysisStatus.FAILED.value
    analysis.reason_code = code
    analysis.reason_text = reason
    analysis.finished_at = now
    analysis.lease_owner = None
    analysis.lease_expires_at = None
    version.state = VersionState.FAILED.value
    session.flush()
    sync_study_status(session, study.id)
    add_audit(
        session,
        AuditKind.FAILED,
        now,
        study_uid=study.study_uid,
        detail={"version": version.version, "code": code, "reason": reason, "attempts": analysis.attempts},
    )


def fail_analysis(
    session: Session, study_version_id: int, code: str, reason: str, now: datetime, *, lease_owner: str | None = None
) -> bool:
    """Record that the analysis of a version failed (``code``: ``LocusError.code``).

    Returns False, changing nothing, when the version is already analysed, exported or
    superseded (a late error from a duplicate task must not undo a stored result), and,
    with ``lease_owner`` (a worker's claim token), when that worker no longer holds the
    lease: the version was reclaimed and belongs to another attempt now.
    """
    check_now(now)
    version, study = version_and_study(session, study_version_id)
    if version.state not in (*REPLACEABLE, VersionState.ANALYSING.value, VersionState.FAILED.value):
        return False
    analysis = session.scalars(select(Analysis).where(Analysis.study_version_id == study_version_id)).one_or_none()
    if lease_owner is not None and (
        analysis is None
        or analysis.lease_owner != lease_owner
        or analysis.status != AnalysisStatus.RUNNING.value
        or version.state != VersionState.ANALYSING.value
    ):
        return False
    if analysis is None:  # failed before it could be claimed (e.g. inputs vanished)
        analysis = Analysis(study_version_id=study_version_id, started_at=now, attempts=1)
        session.add(analysis)
    _record_failure(session, analysis, version, study, now, code, reason)
    return True


def requeue_failed(session: Session, study_version_id: int, now: datetime) -> bool:
    """Put a failed version back to ``pending`` for another analysis (operator re-run).

    Only the latest version of a study can be re-run (an older one would produce a
    report that a newer version already replaced).  Enqueue it afterwards as usual (the
    sweeper does: ``versions_to_enqueue``).  The operator grants a new round of
    ``analysis.max_attempts`` claims: ``attempts`` restarts (the audit row keeps the old count).
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
    analysis = session.scalars(select(Analysis).where(Analysis.study_version_id == study_version_id)).one_or_none()
    previous = analysis.attempts if analysis is not None else 0
    if analysis is not None:
        analysis.attempts = 0
    session.flush()
    sync_study_status(session, study.id)
    add_audit(session, AuditKind.REQUEUED, now, study_uid=study.study_uid,
              detail={"version": version.version, "reason": "operator", "previous_attempts": previous})  # fmt: skip
    return True


def _lease_expired(now: datetime) -> ColumnElement[bool]:
    """The analysis's lease has run out, or it never had one (rows from before leases)."""
    return or_(Analysis.lease_expires_at < now, Analysis.lease_expires_at.is_(None))


def _no_live_lease(now: datetime) -> ColumnElement[bool]:
    """No worker is working on the analysis: it is not running, or its lease expired."""
    return or_(Analysis.status != AnalysisStatus.RUNNING.value, _lease_expired(now))


def stranded_versions(session: Session, now: datetime) -> list[int]:
    """Versions ``analysing`` that no worker will finish: the analysis is ``running`` with
    an expired (or no) lease, or there is no analysis row at all.  The sweeper reclaims the
    first kind by itself; ``locus analyses requeue --stranded`` puts both back at once."""
    check_now(now)
    no_row = (
        select(StudyVersion.id)
        .outerjoin(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(StudyVersion.state == VersionState.ANALYSING.value, Analysis.id.is_(None))
    )
    expired = (
        select(StudyVersion.id)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(
            StudyVersion.state == VersionState.ANALYSING.value,
            _no_live_lease(now),
        )
    )
    return sorted({*session.scalars(no_row), *session.scalars(expired)})


def requeue_stranded(session: Session, study_version_id: int, now: datetime) -> bool:
    """Put a stranded version (see :func:`stranded_versions`) back to ``pending`` for a new
    analysis, with a new round of attempts; False, changing nothing, if it is not stranded
    (e.g. a worker renewed its lease meanwhile).  Audited ``requeued``, reason ``stranded``."""
    check_now(now)
    if study_version_id not in stranded_versions(session, now):
        return False
    version, study = version_and_study(session, study_version_id)
    analysis = session.scalars(select(Analysis).where(Analysis.study_version_id == study_version_id)).one_or_none()
    previous = analysis.attempts if analysis is not None else 0
    if analysis is not None:
        guard = session.execute(
            update(Analysis)
            .where(
                Analysis.id == analysis.id,
                _no_live_lease(now),
            )
            .values(lease_owner=None, lease_expires_at=None, attempts=0)
        )
        if guard.rowcount != 1:  # type: ignore[attr-defined]
            return False
    moved = session.execute(
        update(StudyVersion)
        .where(StudyVersion.id == study_version_id, StudyVersion.state == VersionState.ANALYSING.value)
        .values(state=VersionState.PENDING.value, queued_at=None)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        return False
    sync_study_status(session, study.id)
    add_audit(session, AuditKind.REQUEUED, now, study_uid=study.study_uid,
              detail={"version": version.version, "reason": "stranded", "previous_attempts": previous})  # fmt: skip
    return True


@dataclass(frozen=True)
class AnalysisRow:
    """One line of ``locus analyses list``: a study version and its analysis (if any)."""

    study_version_id: int
    study_uid: str
    version: int
    state: str  # the version's state
    status: str | None  # the analysis row's status
    attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    reason_code: str | None
    reason_text: str | None
    stranded: bool


def list_analyses(session: Session, now: datetime, *, state: str | None = None, limit: int = 100) -> list[AnalysisRow]:
    """Study versions with their analysis, newest first; ``state`` a version state or
    ``stranded`` (see :func:`stranded_versions`)."""
    check_now(now)
    stranded = set(stranded_versions(session, now))
    query = (
        select(StudyVersion, Study.study_uid, Analysis)
        .join(Study, Study.id == StudyVersion.study_id)
        .outerjoin(Analysis, Analysis.study_version_id == StudyVersion.id)
        .order_by(StudyVersion.id.desc())
        .limit(limit)
    )
    if state == "stranded":
        query = query.where(StudyVersion.id.in_(sorted(stranded) or [-1]))
    elif state is not None:
        query = query.where(StudyVersion.state == state)
    return [
        AnalysisRow(
            study_version_id=v.id,
            study_uid=uid,
            version=v.version,
            state=v.state,
            status=a.status if a is not None else None,
            attempts=a.attempts if a is not None else 0,
            lease_owner=a.lease_owner if a is not None else None,
            lease_expires_at=a.lease_expires_at if a is not None else None,
            reason_code=a.reason_code if a is not None else None,
            reason_text=a.reason_text if a is not None else None,
            stranded=v.id in stranded,
        )
        for v, uid, a in session.execute(query)
    ]


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
    """Every report of a study, newest version first, for the report listing."""
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
    """A study version's stored embedding for one model, or None when it was never encoded."""
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
