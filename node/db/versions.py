"""Study versions: the data the completion rules read, and the exactly-once creation
of version n+1 with every instance present (see node.completion)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from sqlalchemy import Integer, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db._common import (
    IN_CHUNK,
    REPLACEABLE,
    SEG_SOP_CLASSES,
    add_audit,
    check_now,
    sync_study_status,
    version_and_study,
)
from node.db.models import (
    Analysis,
    AuditKind,
    Instance,
    InstanceOrigin,
    Series,
    Study,
    StudyVersion,
    StudyVersionInstance,
    VersionState,
)


@dataclass(frozen=True)
class VersionInfo:
    """The identifiers of a study version that workers and logs need."""
    id: int
    study_uid: str
    version: int
    state: str
    completion_rule: str
    ready_at: datetime
    instance_count: int
    instance_set_hash: str


@dataclass(frozen=True)
class SeriesState:
    """What completion knows of one series of a snapshot."""
    series_uid: str
    modality: str
    sop_class_uid: str
    frame_of_reference_uid: str | None
    number_of_slices: int | None
    instance_count: int
    last_received_at: datetime


@dataclass(frozen=True)
class SegReferences:
    """The images a SEG references, so completion can wait for them."""
    sop_uid: str
    referenced: tuple[tuple[str, str], ...]  # (series UID, SOP UID)


@dataclass(frozen=True)
class StudySnapshot:
    """What the completion rules look at for one study, read in one go."""

    study_id: int
    study_uid: str
    first_received_at: datetime
    last_received_at: datetime
    pending_since: datetime | None
    latest_version: int
    latest_state: str | None  # state of the latest version
    latest_started_at: datetime | None  # when its analysis started, if it did
    series: tuple[SeriesState, ...]
    segs: tuple[SegReferences, ...]
    present_referenced: frozenset[str]  # SOP UIDs referenced by a SEG that are present


def pending_study_ids(session: Session) -> list[int]:
    """Studies with instances not contained in any version, oldest first."""
    return list(
        session.scalars(
            select(Study.id).where(Study.pending_since.is_not(None)).order_by(Study.pending_since, Study.id)
        )
    )


def study_snapshot(session: Session, study_id: int) -> StudySnapshot | None:
    """The study as it is now in the index, or None when it is gone; completion decides on this."""
    study = session.execute(
        select(Study).where(Study.id == study_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if study is None:
        return None
    latest_state = latest_started = None
    if study.latest_version > 0:
        row = session.execute(
            select(StudyVersion.state, Analysis.started_at)
            .outerjoin(Analysis, Analysis.study_version_id == StudyVersion.id)
            .where(StudyVersion.study_id == study_id, StudyVersion.version == study.latest_version)
        ).first()
        if row is not None:
            latest_state, latest_started = row[0], row[1]
    series = tuple(
        SeriesState(
            series_uid=s.series_uid,
            modality=s.modality,
            sop_class_uid=s.sop_class_uid,
            frame_of_reference_uid=s.frame_of_reference_uid,
            number_of_slices=s.number_of_slices,
            instance_count=s.instance_count,
            last_received_at=s.last_received_at,
        )
        for s in session.scalars(
            select(Series)
            # A series holding only own instances (our SR sent back) is no input: it must
            # not hold completeness back while it is "streaming" nor count as a series.
            .where(Series.study_id == study_id, select(Instance.id).where(
                Instance.series_id == Series.id, Instance.origin != InstanceOrigin.OWN.value
            ).exists())
            .order_by(Series.id)
            .execution_options(populate_existing=True)
        )
    )
    segs: list[SegReferences] = []
    for sop_uid, refs in session.execute(
        select(Instance.sop_uid, Instance.referenced_instances)
        .join(Series, Series.id == Instance.series_id)
        .where(
            Series.study_id == study_id,
            Instance.origin != InstanceOrigin.OWN.value,
            or_(Series.modality == "SEG", Instance.sop_class_uid.in_(SEG_SOP_CLASSES)),
        )
        .order_by(Instance.id)
    ):
        segs.append(SegReferences(sop_uid, tuple((str(a), str(b)) for a, b in (refs or []))))
    wanted = sorted({sop for seg in segs for _, sop in seg.referenced})
    present: set[str] = set()
    for i in range(0, len(wanted), IN_CHUNK):
        present.update(
            session.scalars(
                select(Instance.sop_uid)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == study_id, Instance.sop_uid.in_(wanted[i : i + IN_CHUNK]))
            )
        )
    return StudySnapshot(
        study_id=study.id,
        study_uid=study.study_uid,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        pending_since=study.pending_since,
        latest_version=study.latest_version,
        latest_state=latest_state,
        latest_started_at=latest_started,
        series=series,
        segs=tuple(segs),
        present_referenced=frozenset(present),
    )


def lock_study(session: Session, study_id: int) -> StudySnapshot | None:
    """Lock the study row (PostgreSQL ``FOR UPDATE``) and re-read its snapshot.

    The listener updates the study row for every new instance, so while this lock is
    held no instance can be added to the study unseen; on SQLite the write transaction
    is exclusive already.
    """
    session.execute(select(Study.id).where(Study.id == study_id).with_for_update())
    return study_snapshot(session, study_id)


class DecisionLike(Protocol):
    """What a completion rule returns (``node.completion.Decision``)."""

    @property
    def rule(self) -> str:
        """The rule that decided (recorded with the version so the state is explained)."""

    @property
    def reason(self) -> str:
        """Why the rule decided so, in words for the operator."""


D = TypeVar("D", bound=DecisionLike)


def complete_study(
    session: Session,
    study_id: int,
    decide: Callable[[StudySnapshot], D | None],
    now: datetime,
) -> tuple[int, StudySnapshot, D] | None:
    """Lock the study, re-run ``decide`` on fresh data and, if it still says ready,
    create the next version (in a savepoint: a lost race leaves the caller's transaction
    usable).  Returns (version id, locked snapshot, decision) or None."""
    try:
        with session.begin_nested():
            snapshot = lock_study(session, study_id)
            decision = decide(snapshot) if snapshot is not None else None
            if snapshot is None or decision is None:
                return None
            version_id = create_study_version(session, snapshot, rule=decision.rule, reason=decision.reason, now=now)
    except IntegrityError:
        return None  # another sweeper created this version number first
    if version_id is None:
        return None
    return version_id, snapshot, decision


def create_study_version(
    session: Session, snapshot: StudySnapshot, *, rule: str, reason: str, now: datetime
) -> int | None:
    """Declare the study complete: version n+1 with every instance it holds now.

    ``snapshot`` must come from :func:`lock_study` in this transaction.  The conditional
    update on ``latest_version`` and the unique (study, version) key make this happen
    exactly once per version even when several sweepers race; the loser gets None.
    Versions still waiting for a worker are superseded (never analysed).
    """
    check_now(now)
    if snapshot.pending_since is None:
        return None
    number = snapshot.latest_version + 1
    won = session.execute(
        update(Study)
        .where(
            Study.id == snapshot.study_id,
            Study.latest_version == snapshot.latest_version,
            Study.pending_since.is_not(None),
        )
        .values(latest_version=number, pending_since=None, has_late_instances=False)
    )
    if won.rowcount != 1:  # type: ignore[attr-defined]
        return None

    superseded = session.execute(
        select(StudyVersion.id, StudyVersion.version).where(
            StudyVersion.study_id == snapshot.study_id, StudyVersion.state.in_(REPLACEABLE)
        )
    ).all()
    for old_id, old_version in superseded:
        session.execute(
            update(StudyVersion).where(StudyVersion.id == old_id).values(state=VersionState.SUPERSEDED.value)
        )
        add_audit(
            session,
            AuditKind.SUPERSEDED,
            now,
            study_uid=snapshot.study_uid,
            detail={"version": old_version, "by_version": number},
        )

    # Own instances (Locus results sent back) are never a version's input.
    received = Instance.origin != InstanceOrigin.OWN.value
    sop_uids = sorted(
        session.scalars(
            select(Instance.sop_uid)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == snapshot.study_id, received)
        )
    )
    digest = hashlib.sha256("\n".join(sop_uids).encode("ascii", "replace")).hexdigest()
    version = StudyVersion(
        study_id=snapshot.study_id,
        version=number,
        state=VersionState.PENDING.value,
        completion_rule=rule,
        ready_at=now,
        instance_count=len(sop_uids),
        instance_set_hash=digest,
    )
    session.add(version)
    session.flush()
    session.execute(
        insert(StudyVersionInstance).from_select(
            ["study_version_id", "instance_id"],
            select(literal(version.id, Integer()), Instance.id)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == snapshot.study_id, received),
        )
    )
    sync_study_status(session, snapshot.study_id)
    add_audit(
        session,
        AuditKind.COMPLETE,
        now,
        study_uid=snapshot.study_uid,
        detail={"version": number, "rule": rule, "reason": reason, "instances": len(sop_uids)},
    )
    return version.id


def get_version(session: Session, study_version_id: int) -> VersionInfo:
    """The version's identifiers; raises when the version does not exist."""
    version, study = version_and_study(session, study_version_id)
    return VersionInfo(
        id=version.id,
        study_uid=study.study_uid,
        version=version.version,
        state=version.state,
        completion_rule=version.completion_rule,
        ready_at=version.ready_at,
        instance_count=version.instance_count,
        instance_set_hash=version.instance_set_hash,
    )


def versions_to_enqueue(session: Session) -> list[int]:
    """Versions declared complete but not yet handed to the queue (e.g. after a crash)."""
    return list(
        session.scalars(
            select(StudyVersion.id).where(StudyVersion.state == VersionState.PENDING.value).order_by(StudyVersion.id)
        )
    )


def mark_queued(session: Session, study_version_ids: Iterable[int], now: datetime) -> int:
    """Record that analysis tasks were enqueued; returns how many versions moved to queued."""
    check_now(now)
    moved = 0
    for vid in study_version_ids:
        result = session.execute(
            update(StudyVersion)
            .where(StudyVersion.id == vid, StudyVersion.state == VersionState.PENDING.value)
            .values(state=VersionState.QUEUED.value, queued_at=now)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            moved += 1
            version, study = version_and_study(session, vid)
            sync_study_status(session, study.id)
            add_audit(session, AuditKind.QUEUED, now, study_uid=study.study_uid, detail={"version": version.version})
    return moved


def stale_queued_versions(session: Session, queued_before: datetime) -> list[int]:
    """Versions enqueued before ``queued_before`` that no worker has claimed yet.

    Their broker message may be lost (embedded broker file deleted, Redis flushed or
    failed over without persistence); see :func:`mark_requeued_stale`.
    """
    check_now(queued_before)
    return list(
        session.scalars(
            select(StudyVersion.id)
            .where(StudyVersion.state == VersionState.QUEUED.value, StudyVersion.queued_at < queued_before)
            .order_by(StudyVersion.id)
        )
    )


def mark_requeued_stale(
    session: Session, study_version_ids: Iterable[int], queued_before: datetime, now: datetime
) -> int:
    """Record that stale queued versions were enqueued again (``queued_at`` restarts).

    Guarded on the state and the old ``queued_at``: a version a worker claimed, or that
    another sweeper re-enqueued, in the meantime is left alone. Audited as ``requeued``
    with reason ``stale_queued``. Returns how many versions were updated.
    """
    check_now(now)
    moved = 0
    for vid in study_version_ids:
        version, study = version_and_study(session, vid)
        waited = (now - version.queued_at).total_seconds() if version.queued_at is not None else None
        result = session.execute(
            update(StudyVersion)
            .where(
                StudyVersion.id == vid,
                StudyVersion.state == VersionState.QUEUED.value,
                StudyVersion.queued_at < queued_before,
            )
            .values(queued_at=now)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            moved += 1
            add_audit(
                session,
                AuditKind.REQUEUED,
                now,
                study_uid=study.study_uid,
                detail={
                    "version": version.version,
                    "reason": "stale_queued",
                    "queued_for_s": round(waited, 1) if waited is not None else None,
                },
            )
    return moved
