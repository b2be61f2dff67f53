"""Shared internals of the repository modules: validation, race-free inserts, audit rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from node.db.base import UTCDateTime
from node.db.models import (
    AuditEvent,
    AuditKind,
    Study,
    StudyStatus,
    StudyVersion,
    VersionState,
)
from pipelines.dicom.uid import is_valid_uid
from pipelines.errors import InputError

SEG_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
    }
)

# A version that is still waiting for a worker can be replaced by a newer one.
REPLACEABLE = (VersionState.PENDING.value, VersionState.QUEUED.value)
IN_CHUNK = 500  # bound IN lists (SQLite's variable limit, PostgreSQL plan size)


def check_now(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")


def check_uid(name: str, value: str | None, *, required: bool = True) -> None:
    if value is None or value == "":
        if required:
            raise InputError(f"{name} is missing", code="missing_uid")
        return
    if not is_valid_uid(value, allow_leading_zeros=True):  # received UIDs: see pipelines.dicom.uid
        raise InputError(f"{name} {value[:80]!r} is not a valid UID (PS3.5 §9.1)", code="invalid_uid")


def insert_ignore(session: Session, model: type[Any], values: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """INSERT unless a row with the same unique ``keys`` exists; True if this call inserted.

    Uses RETURNING rather than the row count, which psycopg reports as -1 here.
    """
    session.flush()
    dialect = session.get_bind().dialect.name
    table = model.__table__
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
    else:  # pragma: no cover - Database() refuses other backends when it is opened
        raise ValueError(f"database dialect {dialect!r} is not supported (SQLite or PostgreSQL only)")
    result = session.execute(stmt.returning(*table.primary_key.columns))
    return result.first() is not None


def add_audit(
    session: Session,
    kind: AuditKind,
    now: datetime,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    calling_ae: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEvent(
            at=now,
            kind=kind.value,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            calling_ae=calling_ae,
            detail=detail,
        )
    )


def later_of(column: Any, now: datetime) -> Any:
    """SQL for max(column, now), so out-of-order writers never move a timestamp back."""
    return case((column < now, utc_param(now)), else_=column)


def utc_param(now: datetime) -> Any:
    """``now`` as a typed bind value (UTC conversion applies outside column comparisons)."""
    return literal(now, UTCDateTime())


def sync_study_status(session: Session, study_id: int) -> None:
    """Study status = state of its latest version (``receiving`` before the first)."""
    latest = session.scalar(
        select(StudyVersion.state)
        .where(StudyVersion.study_id == study_id, StudyVersion.state != VersionState.SUPERSEDED.value)
        .order_by(StudyVersion.version.desc())
        .limit(1)
    )
    status = StudyStatus(latest).value if latest is not None else StudyStatus.RECEIVING.value
    session.execute(update(Study).where(Study.id == study_id).values(status=status))


def version_and_study(session: Session, study_version_id: int) -> tuple[StudyVersion, Study]:
    row = session.execute(
        select(StudyVersion, Study)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(StudyVersion.id == study_version_id)
        .execution_options(populate_existing=True)
    ).first()
    if row is None:
        raise LookupError(f"no study version with id {study_version_id}")
    return row[0], row[1]
