"""Location reviews (confirm / correct a lesion's site) and the study selection of a dataset export.

A review names a lesion of the study's newest successful analysis by its ``lesion_id`` ("S2",
"S2C3"), as ``locus results lesions`` shows it.  ``confirm`` accepts the location currently shown
(the newest review's site, else the localizer's prediction); ``correct`` gives a library site id,
checked against the anatomy library (an unknown id, or a whole body region, is refused with the
reason).  Reviews are appended, never updated: the newest per lesion wins (by time, then
insertion order) and the rows are the history.

A lesion is the same annotation in every version of its study when it comes from the same SEG
instance, segment and component (a SOP Instance UID names immutable content, PS3.3 C.12.1.1.1):
a study re-analysed because late instances arrived keeps its reviews.  Reviews are attached to
the lesion row they were made on, and read across versions by that identity.

Each write adds its ``location_reviewed`` audit event in the same transaction (the audit row
outlives a deleted lesion row).

As everywhere in ``node.db``, callers own the transaction and functions never commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from library import AnatomyLibrary
from library.errors import LibraryError
from node.db._common import add_audit, check_now
from node.db.models import (
    Analysis,
    AnalysisStatus,
    AuditKind,
    Instance,
    Lesion,
    LocationReview,
    ReviewAction,
    Study,
    StudyVersion,
    StudyVersionInstance,
)
from pipelines.errors import InputError

REVIEWER_MAX = 128


class ReviewError(InputError):
    """A review that cannot be recorded (unknown study, lesion or site; nothing to confirm)."""

    code = "review_invalid"


@dataclass(frozen=True)
class ReviewRow:
    """One stored review, with the lesion it concerns."""

    id: int
    study_uid: str
    version: int
    lesion_id: str
    action: str
    site_id: str
    site_code: str
    site_scheme: str
    site_name: str
    predicted_site_id: str | None
    previous_site_id: str | None
    reviewer: str
    at: datetime
    note: str | None
    library_version: str
    library_hash: str


def _latest_analysis(session: Session, study_uid: str) -> tuple[int, int] | None:
    """(analysis id, version) of the study's newest successfully analysed version."""
    row = session.execute(
        select(Analysis.id, StudyVersion.version)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(Study.study_uid == study_uid, Analysis.status == AnalysisStatus.SUCCEEDED.value)
        .order_by(StudyVersion.version.desc())
        .limit(1)
    ).first()
    return (int(row[0]), int(row[1])) if row is not None else None


def _find_lesion(session: Session, study_uid: str, lesion_id: str) -> tuple[Lesion, int]:
    latest = _latest_analysis(session, study_uid)
    if latest is None:
        exists = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        raise ReviewError(
            f"no study with Study Instance UID {study_uid}" if exists is None
            else f"study {study_uid} has no successful analysis yet: nothing to review",
            code="unknown_study" if exists is None else "not_analysed",
        )
    analysis_id, version = latest
    lesion = session.scalars(
        select(Lesion).where(Lesion.analysis_id == analysis_id, Lesion.lesion_id == lesion_id)
    ).one_or_none()
    if lesion is None:
        known = list(session.scalars(select(Lesion.lesion_id).where(Lesion.analysis_id == analysis_id)
                                     .order_by(Lesion.id)))
        raise ReviewError(f"study {study_uid} version {version} has no lesion {lesion_id!r} "
                          f"(lesions: {', '.join(known) or 'none'})", code="unknown_lesion")
    return lesion, version


LesionIdentity = tuple[str, int, int | None]  # (SEG SOP Instance UID, segment number, component)


def _identity(seg_sop_uid: str | None, segment_number: int, component: int | None, row_id: int
              ) -> LesionIdentity | tuple[int]:
    """The SEG identity of a lesion; a lesion without a SEG UID is only itself (its row id)."""
    return (seg_sop_uid, segment_number, component) if seg_sop_uid else (row_id,)


def _study_reviews(session: Session, study_uid: str) -> dict[LesionIdentity | tuple[int], list[ReviewRow]]:
    """Every review of a study's lesions, any version, grouped by lesion identity, oldest first."""
    out: dict[LesionIdentity | tuple[int], list[ReviewRow]] = {}
    for r, les, version in session.execute(
        select(LocationReview, Lesion, StudyVersion.version)
        .join(Lesion, Lesion.id == LocationReview.lesion_row_id)
        .join(Analysis, Analysis.id == Lesion.analysis_id)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(Study.study_uid == study_uid)
        .order_by(LocationReview.at, LocationReview.id)
    ):
        key = _identity(les.seg_sop_uid, les.segment_number, les.component, les.id)
        out.setdefault(key, []).append(_row(r, study_uid, version, les.lesion_id))
    return out


def _check_reviewer(reviewer: str) -> str:
    name = (reviewer or "").strip()
    if not name:
        raise ReviewError("a review needs the reviewer's name (--by)", code="reviewer_missing")
    if len(name) > REVIEWER_MAX:
        raise ReviewError(f"reviewer name longer than {REVIEWER_MAX} characters", code="reviewer_invalid")
    return name


def _record(
    session: Session,
    study_uid: str,
    lesion_id: str,
    action: ReviewAction,
    site_id: str | None,
    *,
    reviewer: str,
    now: datetime,
    library: AnatomyLibrary,
    note: str | None,
) -> ReviewRow:
    check_now(now)
    name = _check_reviewer(reviewer)
    lesion, version = _find_lesion(session, study_uid, lesion_id)
    history = _study_reviews(session, study_uid).get(
        _identity(lesion.seg_sop_uid, lesion.segment_number, lesion.component, lesion.id), [])
    current = history[-1].site_id if history else lesion.site_id
    if action is ReviewAction.CONFIRM:
        if current is None:
            raise ReviewError(f"lesion {lesion_id} of study {study_uid} has no location to confirm (no localizer "
                              "result and no earlier review); use `locus review correct` with a site id",
                              code="nothing_to_confirm")
        site_id = current
    elif not site_id:
        raise ReviewError("a correction needs the library site id of the lesion's location", code="unknown_site")
    try:
        site = library.site(site_id)
    except LibraryError as exc:
        raise ReviewError(f"{exc} in anatomy library {library.name} {library.version}; "
                          "`locus library show` lists the site ids", code="unknown_site") from exc
    if site.level == "region":
        raise ReviewError(f"{site_id!r} is a whole body region ({site.name}); give a coarse location or a site",
                          code="site_too_coarse")
    row = LocationReview(
        lesion_row_id=lesion.id,
        action=action.value,
        site_id=site.id,
        site_code=site.code.value,
        site_scheme=site.code.scheme,
        site_name=site.name,
        predicted_site_id=lesion.site_id,
        previous_site_id=current,
        library_version=library.version,
        library_hash=library.content_hash,
        reviewer=name,
        at=now,
        note=(note or "").strip() or None,
    )
    session.add(row)
    session.flush()
    add_audit(
        session,
        AuditKind.LOCATION_REVIEWED,
        now,
        study_uid=study_uid,
        sop_uid=lesion.seg_sop_uid,
        detail={
            "version": version,
            "lesion_id": lesion.lesion_id,
            "action": action.value,
            "site_id": site.id,
            "previous_site_id": current,
            "predicted_site_id": lesion.site_id,
            "reviewer": name,
            "review_id": row.id,
        },
    )
    return _row(row, study_uid, version, lesion.lesion_id)


def confirm_location(session: Session, study_uid: str, lesion_id: str, *, reviewer: str, now: datetime,
                     library: AnatomyLibrary, note: str | None = None) -> ReviewRow:
    """Confirm the location currently shown for a lesion (newest review, else the prediction)."""
    return _record(session, study_uid, lesion_id, ReviewAction.CONFIRM, None, reviewer=reviewer, now=now,
                   library=library, note=note)


def correct_location(session: Session, study_uid: str, lesion_id: str, site_id: str, *, reviewer: str,
                     now: datetime, library: AnatomyLibrary, note: str | None = None) -> ReviewRow:
    """Set a lesion's location to the library site ``site_id`` (refused if the library lacks it)."""
    return _record(session, study_uid, lesion_id, ReviewAction.CORRECT, site_id, reviewer=reviewer, now=now,
                   library=library, note=note)


def _row(r: LocationReview, study_uid: str, version: int, lesion_id: str) -> ReviewRow:
    return ReviewRow(
        id=r.id, study_uid=study_uid, version=version, lesion_id=lesion_id, action=r.action, site_id=r.site_id,
        site_code=r.site_code, site_scheme=r.site_scheme, site_name=r.site_name,
        predicted_site_id=r.predicted_site_id, previous_site_id=r.previous_site_id, reviewer=r.reviewer, at=r.at,
        note=r.note, library_version=r.library_version, library_hash=r.library_hash,
    )


def list_reviews(session: Session, study_uid: str | None = None, *, latest_only: bool = False,
                 limit: int = 10_000) -> list[ReviewRow]:
    """Reviews in the order they were made (per study and lesion), or only the one that counts per lesion.

    ``latest_only`` keeps the newest review of each lesion identity (SEG instance, segment,
    component), whichever study version it was made on.
    """
    query = (
        select(LocationReview, Study.study_uid, StudyVersion.version, Lesion)
        .join(Lesion, Lesion.id == LocationReview.lesion_row_id)
        .join(Analysis, Analysis.id == Lesion.analysis_id)
        .join(StudyVersion, StudyVersion.id == Analysis.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .order_by(Study.study_uid, StudyVersion.version, Lesion.id, LocationReview.at, LocationReview.id)
    )
    if study_uid is not None:
        query = query.where(Study.study_uid == study_uid)
    rows: list[ReviewRow] = []
    newest: dict[tuple[str, LesionIdentity | tuple[int]], ReviewRow] = {}
    for r, uid, version, les in session.execute(query):
        row = _row(r, uid, version, les.lesion_id)
        rows.append(row)
        key = (uid, _identity(les.seg_sop_uid, les.segment_number, les.component, les.id))
        if key not in newest or (row.at, row.id) > (newest[key].at, newest[key].id):
            newest[key] = row
    if latest_only:
        kept = set(newest.values())
        rows = [r for r in rows if r in kept]
    return rows[:limit]


# ---------------------------------------------------------------------------------------
# Dataset export selection
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetLesion:
    """A lesion of an exported study: its SEG identity, box, prediction and newest review."""

    lesion_id: str
    seg_sop_uid: str | None
    segment_number: int
    component: int | None
    label: str
    voxel_count: int
    bbox: dict[str, Any] | None  # {"center_mm": [...], "size_mm": [...]} (LPS, voxel edges)
    predicted_site_id: str | None
    coarse_ranking: tuple[str, ...]  # the localizer's coarse labels, best first (HCL-AL coarse keys)
    reviews: tuple[ReviewRow, ...] = ()  # oldest first

    @property
    def review(self) -> ReviewRow | None:
        """The review that counts: the newest."""
        return self.reviews[-1] if self.reviews else None


@dataclass(frozen=True)
class DatasetStudy:
    """The newest analysed version of a study, with its exact input files."""

    study_uid: str
    version: int
    study_version_id: int
    analysed_at: datetime | None
    instance_paths: tuple[str, ...]  # relative to the spool
    lesions: tuple[DatasetLesion, ...] = field(default_factory=tuple)

    @property
    def reviewed(self) -> bool:
        """Whether any lesion of the study has a review (datasets may be limited to reviewed studies)."""
        return any(les.review is not None for les in self.lesions)


def _coarse_labels(localization: dict[str, Any] | None) -> tuple[str, ...]:
    ranking = (localization or {}).get("coarse_ranking") or []
    return tuple(str(r["label"]) for r in ranking if isinstance(r, dict) and r.get("label"))


def dataset_studies(session: Session, *, reviewed_only: bool = True, since: datetime | None = None
                    ) -> list[DatasetStudy]:
    """Studies to export: each study's newest successfully analysed version.

    ``reviewed_only``: only studies with at least one reviewed lesion in that version.
    ``since``: only studies analysed, or with a lesion reviewed, at or after that time.
    """
    if since is not None:
        check_now(since)
    newest: dict[int, tuple[int, int, int, datetime | None, str]] = {}
    for study_id, uid, version, version_id, analysis_id, finished in session.execute(
        select(Study.id, Study.study_uid, StudyVersion.version, StudyVersion.id, Analysis.id, Analysis.finished_at)
        .join(StudyVersion, StudyVersion.study_id == Study.id)
        .join(Analysis, Analysis.study_version_id == StudyVersion.id)
        .where(Analysis.status == AnalysisStatus.SUCCEEDED.value)
    ):
        if study_id not in newest or version > newest[study_id][0]:
            newest[study_id] = (version, version_id, analysis_id, finished, uid)
    out: list[DatasetStudy] = []
    for version, version_id, analysis_id, finished, uid in sorted(newest.values(), key=lambda t: t[4]):
        lesions = list(session.scalars(select(Lesion).where(Lesion.analysis_id == analysis_id).order_by(Lesion.id)))
        if not lesions:
            continue
        by_identity = _study_reviews(session, uid)
        reviews = {les.id: by_identity.get(_identity(les.seg_sop_uid, les.segment_number, les.component, les.id),
                                           [])
                   for les in lesions}
        if reviewed_only and not any(reviews.values()):
            continue
        if since is not None:
            recent_review = any(r.at >= since for rows in reviews.values() for r in rows)
            if not recent_review and (finished is None or finished < since):
                continue
        paths = tuple(session.scalars(
            select(Instance.path)
            .join(StudyVersionInstance, StudyVersionInstance.instance_id == Instance.id)
            .where(StudyVersionInstance.study_version_id == version_id)
            .order_by(Instance.path)
        ))
        out.append(DatasetStudy(
            study_uid=uid, version=version, study_version_id=version_id, analysed_at=finished,
            instance_paths=paths,
            lesions=tuple(
                DatasetLesion(
                    lesion_id=les.lesion_id, seg_sop_uid=les.seg_sop_uid, segment_number=les.segment_number,
                    component=les.component, label=les.label, voxel_count=les.voxel_count, bbox=les.bbox,
                    predicted_site_id=les.site_id, coarse_ranking=_coarse_labels(les.localization),
                    reviews=tuple(reviews.get(les.id, ())),
                )
                for les in lesions
            ),
        ))
    return out


def record_dataset_export(session: Session, now: datetime, *, detail: dict[str, Any],
                          study_uids: Sequence[str] = ()) -> None:
    """Audit that a dataset left the node: one event overall and one per exported study."""
    check_now(now)
    add_audit(session, AuditKind.DATASET_EXPORTED, now, detail=detail)
    for uid in study_uids:
        add_audit(session, AuditKind.DATASET_EXPORTED, now, study_uid=uid, detail={"manifest": detail.get("manifest")})

