"""Receiving: one row per SOP instance, idempotent on resend; rejections audited."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from node.db._common import (
    add_audit,
    check_now,
    check_uid,
    insert_ignore,
    later_of,
    utc_param,
)
from node.db.models import (
    AuditKind,
    Instance,
    Series,
    Study,
    StudyStatus,
)
from pipelines.errors import InputError


@dataclass(frozen=True)
class InstanceRecord:
    """What the listener knows about one stored instance (header fields, no pixels).

    ``path`` is relative to the spool directory.  ``number_of_slices`` is the number of
    images a complete PET series holds: Number of Slices (0054,0081), times Number of
    Time Slices (0054,0101) for a dynamic or gated series; None for other modalities.
    ``referenced_instances`` lists (series UID, SOP UID) of the source images a SEG
    references (Referenced Series Sequence, PS3.3 C.8.20.2 / C.7.6.16).
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax: str
    path: str
    size_bytes: int
    calling_ae: str | None
    frame_of_reference_uid: str | None = None
    number_of_slices: int | None = None
    instance_number: int | None = None
    referenced_instances: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class RecordOutcome:
    """Result of :func:`record_instance`.

    ``path`` is the spool path the database keeps for this SOP instance: on a resend it
    is the *first* copy's path, so a listener that wrote the resend elsewhere deletes
    its new file.  ``late`` is True when a new instance arrived after a study version
    already existed (a new version will follow).
    """

    new: bool
    receive_count: int
    path: str = ""
    late: bool = False


def record_instance(session: Session, rec: InstanceRecord, now: datetime) -> RecordOutcome:
    """Record one received instance; idempotent on its SOP Instance UID.

    A resend increments ``receive_count`` and keeps the first copy's path.  A new
    instance updates the series and study counters and timers and marks the study as
    having instances outside any version (``pending_since``), which the completion sweep
    acts on.  Raises :class:`~pipelines.errors.InputError` (``uid_conflict``) when a UID
    is already known under a different parent: a sender bug that must not merge studies.
    """
    check_now(now)
    for name in ("study_uid", "series_uid", "sop_uid", "sop_class_uid", "transfer_syntax"):
        check_uid(name, getattr(rec, name))
    check_uid("frame_of_reference_uid", rec.frame_of_reference_uid, required=False)
    if not rec.path or rec.path.startswith("/") or ".." in rec.path.split("/"):
        raise ValueError(f"instance path must be relative to the spool, got {rec.path!r}")
    if rec.size_bytes < 0:
        raise ValueError("size_bytes must be >= 0")

    # Most instances belong to a study and series already known: look up first, insert
    # (race-free) only when missing.
    study_id = session.scalar(select(Study.id).where(Study.study_uid == rec.study_uid))
    if study_id is None:
        insert_ignore(
            session,
            Study,
            {
                "study_uid": rec.study_uid,
                "status": StudyStatus.RECEIVING.value,
                "first_received_at": now,
                "last_received_at": now,
                "instance_count": 0,
                "latest_version": 0,
                "has_late_instances": False,
            },
            ["study_uid"],
        )
        study_id = session.scalar(select(Study.id).where(Study.study_uid == rec.study_uid))
        assert study_id is not None

    series_query = select(Series.id, Series.study_id).where(Series.series_uid == rec.series_uid)
    series_row = session.execute(series_query).first()
    if series_row is None:
        insert_ignore(
            session,
            Series,
            {
                "study_id": study_id,
                "series_uid": rec.series_uid,
                "modality": rec.modality.strip().upper() or "OT",
                "sop_class_uid": rec.sop_class_uid,
                "frame_of_reference_uid": rec.frame_of_reference_uid,
                "number_of_slices": rec.number_of_slices,
                "instance_count": 0,
                "first_received_at": now,
                "last_received_at": now,
            },
            ["series_uid"],
        )
        series_row = session.execute(series_query).one()
    series_id, series_study = series_row
    if series_study != study_id:
        raise InputError(
            f"series {rec.series_uid} already belongs to another study than {rec.study_uid}", code="uid_conflict"
        )

    refs = [[s, i] for s, i in rec.referenced_instances] or None
    inserted = insert_ignore(
        session,
        Instance,
        {
            "series_id": series_id,
            "sop_uid": rec.sop_uid,
            "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax": rec.transfer_syntax,
            "path": rec.path,
            "size_bytes": rec.size_bytes,
            "calling_ae": rec.calling_ae,
            "instance_number": rec.instance_number,
            "received_at": now,
            "last_received_at": now,
            "receive_count": 1,
            "referenced_instances": refs,
        },
        ["sop_uid"],
    )

    # Activity on the series and study (a resend is activity too: the sender is busy).
    series_values: dict[str, Any] = {"last_received_at": later_of(Series.last_received_at, now)}
    study_values: dict[str, Any] = {"last_received_at": later_of(Study.last_received_at, now)}
    if inserted:
        series_values["instance_count"] = Series.instance_count + 1
        series_values["frame_of_reference_uid"] = func.coalesce(
            Series.frame_of_reference_uid, rec.frame_of_reference_uid
        )
        series_values["number_of_slices"] = func.coalesce(Series.number_of_slices, rec.number_of_slices)
        study_values["instance_count"] = Study.instance_count + 1
        study_values["pending_since"] = func.coalesce(Study.pending_since, utc_param(now))
        study_values["has_late_instances"] = or_(Study.has_late_instances, Study.latest_version > 0)
    no_sync = {"synchronize_session": False}  # no ORM objects of these rows are loaded here
    session.execute(update(Series).where(Series.id == series_id).values(**series_values).execution_options(**no_sync))
    latest_version = session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(**study_values)
        .returning(Study.latest_version)
        .execution_options(**no_sync)
    ).scalar_one()

    if inserted:
        late = latest_version > 0
        outcome = RecordOutcome(new=True, receive_count=1, path=rec.path, late=late)
    else:
        existing_series, path = session.execute(
            select(Instance.series_id, Instance.path).where(Instance.sop_uid == rec.sop_uid)
        ).one()
        if existing_series != series_id:
            raise InputError(
                f"SOP instance {rec.sop_uid} already belongs to another series than {rec.series_uid}",
                code="uid_conflict",
            )
        count = session.execute(
            update(Instance)
            .where(Instance.sop_uid == rec.sop_uid)
            .values(receive_count=Instance.receive_count + 1, last_received_at=later_of(Instance.last_received_at, now))
            .returning(Instance.receive_count)
            .execution_options(**no_sync)
        ).scalar_one()
        outcome = RecordOutcome(new=False, receive_count=int(count or 0), path=path)

    detail: dict[str, Any] = {"new": outcome.new, "receive_count": outcome.receive_count, "size_bytes": rec.size_bytes}
    if outcome.late:
        detail["late"] = True
    add_audit(
        session,
        AuditKind.RECEIVED,
        now,
        study_uid=rec.study_uid,
        series_uid=rec.series_uid,
        sop_uid=rec.sop_uid,
        calling_ae=rec.calling_ae,
        detail=detail,
    )
    return outcome


def record_rejection(
    session: Session,
    *,
    code: str,
    reason: str,
    calling_ae: str | None,
    peer_host: str | None,
    sop_uid: str | None,
    now: datetime,
    study_uid: str | None = None,
) -> None:
    """Audit a refused association or instance (``code`` is stable snake_case)."""
    check_now(now)
    add_audit(
        session,
        AuditKind.REJECTED,
        now,
        study_uid=study_uid,
        sop_uid=sop_uid,
        calling_ae=calling_ae,
        detail={"code": code, "reason": reason, "peer_host": peer_host},
    )


def study_calling_aes(session: Session, study_uid: str) -> list[str]:
    """Calling AE titles that sent instances of a study (for return-to-sender)."""
    rows = session.scalars(
        select(Instance.calling_ae)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_uid == study_uid, Instance.calling_ae.is_not(None))
        .distinct()
    )
    return sorted(r for r in rows if r)
