"""Receiving: one row per SOP instance, idempotent on resend; rejections audited."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from node.db._common import add_audit, check_now, check_uid
from node.db.base import Database
from node.db.models import (
    AuditEvent,
    AuditKind,
    Instance,
    InstanceOrigin,
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
    # "own": the listener recognised a Locus result by its header (UID root, device
    # identity); the index also recognises this node's SRs by the reports table.
    origin: str = InstanceOrigin.RECEIVED.value
    # Set by the listener when this SOP Instance UID is already indexed and the new
    # copy's content differs: the dicom.duplicate_policy applied ("keep_first": the new
    # bytes were not written; "replace": ``path`` is the new copy, to index instead).
    duplicate: str | None = None


#: SR Storage SOP classes all share this root (PS3.4 B.5, "1.2.840.10008.5.1.4.1.1.88.x");
#: only these are looked up in the reports table.
SR_SOP_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1.88."


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
    own: bool = False  # a Locus result: indexed, but no version and no completeness
    duplicate: str | None = None  # the duplicate policy applied to different content
    # Row ids for a caller's post-commit cache (KnownIds); not part of the outcome's value.
    study_id: int | None = field(default=None, compare=False)
    series_id: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class KnownIds:
    """Database ids of a study and series the caller has seen committed before.

    Study and series rows are never deleted or re-parented once committed, so a listener
    may cache them (``RecordOutcome.study_id`` / ``series_id`` after its commit) and
    skip two lookups per instance. Never cache ids from a transaction that rolled back.
    """

    study_id: int
    series_id: int


class _IngestSQL:
    """The ingest statements as plain SQL, executed on the DB-API connection.

    Why not SQLAlchemy Core here: per statement, SQLAlchemy's execution path (cache key,
    compiled-cache lookup, result wrapping) costs ~0.1-0.2 ms of GIL-held CPU, which on
    the C-STORE path was most of the index time. These few statements run directly on
    the driver cursor inside the session's transaction (sqlite3 or psycopg), with the
    typed values converted by their column type's own SQLAlchemy bind processor, so what
    is stored is exactly what the ORM would store (UTC timestamps, JSON, booleans).

    Standard SQL plus ``ON CONFLICT … DO NOTHING`` and ``RETURNING``, which SQLite
    (>= 3.35) and PostgreSQL share.
    """

    STUDY_ID = "SELECT id FROM studies WHERE study_uid = :study_uid"
    SERIES_IDS = "SELECT id, study_id FROM series WHERE series_uid = :series_uid"
    INSERT_STUDY = (
        "INSERT INTO studies (study_uid, status, first_received_at, last_received_at, instance_count,"
        " latest_version, has_late_instances)"
        " VALUES (:study_uid, :status, :now, :now, 0, 0, :false) ON CONFLICT (study_uid) DO NOTHING"
    )
    INSERT_SERIES = (
        "INSERT INTO series (study_id, series_uid, modality, sop_class_uid, frame_of_reference_uid,"
        " number_of_slices, instance_count, first_received_at, last_received_at)"
        " VALUES (:study_id, :series_uid, :modality, :sop_class_uid, :frame_of_reference_uid,"
        " :number_of_slices, 0, :now, :now) ON CONFLICT (series_uid) DO NOTHING"
    )
    INSERT_INSTANCE = (
        "INSERT INTO instances (series_id, sop_uid, sop_class_uid, transfer_syntax, path, size_bytes,"
        " calling_ae, instance_number, received_at, last_received_at, receive_count, referenced_instances,"
        " origin)"
        " VALUES (:series_id, :sop_uid, :sop_class_uid, :transfer_syntax, :path, :size_bytes, :calling_ae,"
        " :instance_number, :now, :now, 1, :referenced_instances, :origin)"
        " ON CONFLICT (sop_uid) DO NOTHING RETURNING id"
    )
    OUR_REPORT = "SELECT 1 FROM reports WHERE sr_sop_uid = :sop_uid"
    _LATER = "CASE WHEN last_received_at < :now THEN :now ELSE last_received_at END"
    GROW_SERIES = (
        f"UPDATE series SET last_received_at = {_LATER}, instance_count = instance_count + 1,"
        " frame_of_reference_uid = COALESCE(frame_of_reference_uid, :frame_of_reference_uid),"
        " number_of_slices = COALESCE(number_of_slices, :number_of_slices) WHERE id = :series_id"
    )
    GROW_STUDY = (
        f"UPDATE studies SET last_received_at = {_LATER}, instance_count = instance_count + 1,"
        " pending_since = COALESCE(pending_since, :now),"
        " has_late_instances = (has_late_instances OR latest_version > 0)"
        " WHERE id = :study_id RETURNING latest_version"
    )
    TOUCH_SERIES = f"UPDATE series SET last_received_at = {_LATER} WHERE id = :series_id"
    TOUCH_STUDY = f"UPDATE studies SET last_received_at = {_LATER} WHERE id = :study_id"
    EXISTING_INSTANCE = (
        "SELECT series_id, path, origin, size_bytes, transfer_syntax FROM instances WHERE sop_uid = :sop_uid"
    )
    # A replacing copy (dicom.duplicate_policy = "replace"): indexed in place of the first
    # one; for a received instance the study becomes pending again (a new version).
    REPLACE_INSTANCE = (
        "UPDATE instances SET path = :path, size_bytes = :size_bytes, transfer_syntax = :transfer_syntax,"
        " instance_number = :instance_number, referenced_instances = :referenced_instances,"
        " calling_ae = :calling_ae WHERE sop_uid = :sop_uid"
    )
    PEND_STUDY = (
        f"UPDATE studies SET last_received_at = {_LATER}, pending_since = COALESCE(pending_since, :now),"
        " has_late_instances = (has_late_instances OR latest_version > 0)"
        " WHERE id = :study_id RETURNING latest_version"
    )
    COUNT_DUPLICATE = "UPDATE studies SET duplicate_count = duplicate_count + 1 WHERE id = :study_id"
    RESEND_INSTANCE = (
        f"UPDATE instances SET receive_count = receive_count + 1, last_received_at = {_LATER}"
        " WHERE sop_uid = :sop_uid RETURNING receive_count"
    )
    AUDIT = (
        "INSERT INTO audit_events (at, kind, study_uid, series_uid, sop_uid, calling_ae, detail)"
        " VALUES (:now, :kind, :study_uid, :series_uid, :sop_uid, :calling_ae, :detail)"
    )

    def __init__(self, dialect: Dialect) -> None:
        if dialect.name not in ("sqlite", "postgresql"):  # pragma: no cover - refused by Database()
            raise ValueError(f"database dialect {dialect.name!r} is not supported (SQLite or PostgreSQL only)")
        self.named = dialect.name == "sqlite"  # sqlite3 binds :name; psycopg binds %(name)s
        # Parameters that need their column type's conversion; everything else is a
        # plain str/int/None that both drivers bind as is.
        typed = {
            "now": Instance.__table__.c.received_at.type,
            "false": Study.__table__.c.has_late_instances.type,
            "referenced_instances": Instance.__table__.c.referenced_instances.type,
            "detail": AuditEvent.__table__.c.detail.type,
        }
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for name, type_ in typed.items():
            proc = type_._cached_bind_processor(dialect)
            if proc is not None:
                self.processors[name] = proc
        self._sql: dict[str, str] = {}

    def sql(self, text: str) -> str:
        if self.named:
            return text
        cached = self._sql.get(text)
        if cached is None:
            cached = self._sql[text] = re.sub(r":([a-z_]+)", r"%(\1)s", text.replace("%", "%%"))
        return cached

    def run(self, cursor: Any, text: str, params: dict[str, Any]) -> Any:
        procs = self.processors
        bound = {k: (procs[k](v) if k in procs else v) for k, v in params.items()}
        cursor.execute(self.sql(text), bound)
        return cursor


_SQL: dict[str, _IngestSQL] = {}


def _ingest_sql(dialect: Dialect) -> _IngestSQL:
    q = _SQL.get(dialect.name)
    if q is None:
        q = _SQL[dialect.name] = _IngestSQL(dialect)
    return q


def check_record(rec: InstanceRecord, now: datetime) -> None:
    """Refuse a record the index must never hold (InputError for UIDs, ValueError otherwise)."""
    check_now(now)
    for name in ("study_uid", "series_uid", "sop_uid", "sop_class_uid", "transfer_syntax"):
        check_uid(name, getattr(rec, name))
    check_uid("frame_of_reference_uid", rec.frame_of_reference_uid, required=False)
    if not rec.path or rec.path.startswith("/") or ".." in rec.path.split("/"):
        raise ValueError(f"instance path must be relative to the spool, got {rec.path!r}")
    if rec.size_bytes < 0:
        raise ValueError("size_bytes must be >= 0")


def record_instance(
    session: Session, rec: InstanceRecord, now: datetime, *, known: KnownIds | None = None
) -> RecordOutcome:
    """Record one received instance; idempotent on its SOP Instance UID.

    A resend increments ``receive_count`` and keeps the first copy's path.  A new
    instance updates the series and study counters and timers and marks the study as
    having instances outside any version (``pending_since``), which the completion sweep
    acts on.  Raises :class:`~pipelines.errors.InputError` (``uid_conflict``) when a UID
    is already known under a different parent: a sender bug that must not merge studies.
    ``known`` (ids committed earlier for this study and series) skips the lookups.

    Own instances (``rec.origin == "own"``, or an SR whose SOP Instance UID is in the
    reports table: this node's report sent back) are indexed but leave the study alone:
    no ``pending_since``, no timers, no count, so they never make a study version. A
    record with ``duplicate`` set (different content under a known UID) is counted in
    ``studies.duplicate_count`` and audited as ``duplicate``; with "replace" its path
    and header fields replace the indexed copy's and the study becomes pending again.
    Nothing is committed here; a caller that wants one instance's failure not to undo
    others in the same transaction wraps each call in a savepoint.
    """
    check_record(rec, now)
    if session.new or session.dirty or session.deleted:
        session.flush()  # the statements below must see the caller's pending ORM rows
    conn = session.connection()
    cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        return _record_on_cursor(cur, conn.dialect, rec, now, known=known)
    finally:
        cur.close()


def _record_on_cursor(
    cur: Any, dialect: Dialect, rec: InstanceRecord, now: datetime, *, known: KnownIds | None = None
) -> RecordOutcome:
    """:func:`record_instance` on a DB-API cursor inside an open transaction.

    Shared by :func:`record_instance` (one record in a session) and
    :class:`BatchRecorder` (many records per transaction); both validate first
    (:func:`check_record`).
    """
    q = _ingest_sql(dialect)
    if known is not None:
        study_id, series_id = known.study_id, known.series_id
    else:
        study_id, series_id = _study_and_series(q, cur, rec, now)

    own = rec.origin == InstanceOrigin.OWN.value or (
        # This node's SR sent back to it (e.g. a PACS forwarding every stable study):
        # one indexed lookup, for SR classes only.
        rec.sop_class_uid.startswith(SR_SOP_CLASS_ROOT)
        and q.run(cur, q.OUR_REPORT, {"sop_uid": rec.sop_uid}).fetchone() is not None
    )
    origin = InstanceOrigin.OWN.value if own else InstanceOrigin.RECEIVED.value
    refs = [[s, i] for s, i in rec.referenced_instances] or None
    inserted = q.run(
        cur,
        q.INSERT_INSTANCE,
        {
            "series_id": series_id,
            "sop_uid": rec.sop_uid,
            "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax": rec.transfer_syntax,
            "path": rec.path,
            "size_bytes": rec.size_bytes,
            "calling_ae": rec.calling_ae,
            "instance_number": rec.instance_number,
            "now": now,
            "referenced_instances": refs,
            "origin": origin,
        },
    ).fetchone() is not None

    detail: dict[str, Any] = {"size_bytes": rec.size_bytes}
    if inserted:
        q.run(
            cur,
            q.GROW_SERIES,
            {
                "series_id": series_id,
                "now": now,
                "frame_of_reference_uid": rec.frame_of_reference_uid,
                "number_of_slices": rec.number_of_slices,
            },
        )
        latest_version = 0
        if not own:
            # Own instances leave the study alone: no pending version, no completeness
            # timer, not counted (node.completion); else our SR would make a version whose
            # SR comes back again, forever.
            (latest_version,) = q.run(cur, q.GROW_STUDY, {"study_id": study_id, "now": now}).fetchone()
        outcome = RecordOutcome(
            new=True, receive_count=1, path=rec.path, late=latest_version > 0, own=own,
            study_id=study_id, series_id=series_id,
        )
    else:
        # A resend (activity too: the sender is busy). Check the parent before writing.
        existing_series, path, existing_origin, old_size, old_ts = q.run(
            cur, q.EXISTING_INSTANCE, {"sop_uid": rec.sop_uid}
        ).fetchone()
        if existing_series != series_id:
            raise InputError(
                f"SOP instance {rec.sop_uid} already belongs to another series than {rec.series_uid}",
                code="uid_conflict",
            )
        own = existing_origin == InstanceOrigin.OWN.value
        q.run(cur, q.TOUCH_SERIES, {"series_id": series_id, "now": now})
        late = False
        if rec.duplicate is not None:
            # Different content under a known SOP Instance UID (PS3.3 C.12.1.1.1).
            q.run(cur, q.COUNT_DUPLICATE, {"study_id": study_id})
            detail.update(
                duplicate=rec.duplicate, previous_size_bytes=int(old_size), transfer_syntax=rec.transfer_syntax,
                previous_transfer_syntax=old_ts,
            )
        if rec.duplicate == "replace":
            q.run(
                cur,
                q.REPLACE_INSTANCE,
                {
                    "path": rec.path,
                    "size_bytes": rec.size_bytes,
                    "transfer_syntax": rec.transfer_syntax,
                    "instance_number": rec.instance_number,
                    "referenced_instances": refs,
                    "calling_ae": rec.calling_ae,
                    "sop_uid": rec.sop_uid,
                },
            )
            path = rec.path
            if not own:
                (latest_version,) = q.run(cur, q.PEND_STUDY, {"study_id": study_id, "now": now}).fetchone()
                late = latest_version > 0
        elif not own:
            q.run(cur, q.TOUCH_STUDY, {"study_id": study_id, "now": now})
        (count,) = q.run(cur, q.RESEND_INSTANCE, {"sop_uid": rec.sop_uid, "now": now}).fetchone()
        outcome = RecordOutcome(
            new=False, receive_count=int(count or 0), path=path, late=late, own=own, duplicate=rec.duplicate,
            study_id=study_id, series_id=series_id,
        )

    detail.update(new=outcome.new, receive_count=outcome.receive_count)
    if outcome.late:
        detail["late"] = True
    if outcome.own:
        detail["origin"] = InstanceOrigin.OWN.value
    for kind in (AuditKind.RECEIVED, AuditKind.DUPLICATE) if rec.duplicate else (AuditKind.RECEIVED,):
        q.run(
            cur,
            q.AUDIT,
            {
                "now": now,
                "kind": kind.value,
                "study_uid": rec.study_uid,
                "series_uid": rec.series_uid,
                "sop_uid": rec.sop_uid,
                "calling_ae": rec.calling_ae,
                "detail": detail,
            },
        )
    return outcome


def _study_and_series(q: _IngestSQL, cur: Any, rec: InstanceRecord, now: datetime) -> tuple[int, int]:
    """Look up (or create, race-free) the study and series rows; refuse a re-parented series."""
    row = q.run(cur, q.STUDY_ID, {"study_uid": rec.study_uid}).fetchone()
    if row is None:
        q.run(
            cur,
            q.INSERT_STUDY,
            {"study_uid": rec.study_uid, "status": StudyStatus.RECEIVING.value, "now": now, "false": False},
        )
        row = q.run(cur, q.STUDY_ID, {"study_uid": rec.study_uid}).fetchone()
    (study_id,) = row
    row = q.run(cur, q.SERIES_IDS, {"series_uid": rec.series_uid}).fetchone()
    if row is None:
        q.run(
            cur,
            q.INSERT_SERIES,
            {
                "study_id": study_id,
                "series_uid": rec.series_uid,
                "modality": rec.modality.strip().upper() or "OT",
                "sop_class_uid": rec.sop_class_uid,
                "frame_of_reference_uid": rec.frame_of_reference_uid,
                "number_of_slices": rec.number_of_slices,
                "now": now,
            },
        )
        row = q.run(cur, q.SERIES_IDS, {"series_uid": rec.series_uid}).fetchone()
    series_id, series_study = row
    if series_study != study_id:
        raise InputError(
            f"series {rec.series_uid} already belongs to another study than {rec.study_uid}", code="uid_conflict"
        )
    return int(study_id), int(series_id)


class BatchRecorder:
    """Indexes batches of records, one transaction per batch, on one kept connection.

    For the listener's group-commit writer (node.listener.index_writer), which is its
    only user and calls it from one thread. Each record runs in its own savepoint: a
    record refused with ``InputError`` (e.g. ``uid_conflict``) or ``ValueError`` is undone
    alone and reported in its slot of the result; any other failure, the commit included,
    rolls the whole batch back and is raised (nothing of the batch is then indexed).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        # A DBAPI connection from the engine's pool, used directly: SQLAlchemy's
        # Connection.begin()/commit() machinery (events, the begin hook) cost more CPU per
        # batch than the batch's own statements on the C-STORE path (py-spy).
        self._raw: Any = None

    def record_batch(
        self, items: Sequence[tuple[InstanceRecord, datetime, KnownIds | None]]
    ) -> list[RecordOutcome | Exception]:
        """Index ``items`` (record, receive time, known ids) and commit; per-item outcomes."""
        results: list[RecordOutcome | Exception] = []
        raw = self._connection()
        dialect = self.db.engine.dialect
        try:
            cur = raw.cursor()
            try:
                if self.db.is_sqlite:
                    # The connection runs in autocommit mode (node.db.base); take the write
                    # lock now, as the engine's begin hook does for every write transaction.
                    self._begin_immediate(cur)
                # psycopg (PostgreSQL) opens its transaction implicitly with the first statement.
                # A batch of one needs no savepoint: refusing its record is rolling back
                # the whole transaction (two statements fewer, each a round trip on PostgreSQL).
                alone = len(items) == 1
                for rec, now, known in items:
                    results.append(self._one(cur, dialect, rec, now, known, savepoint=not alone))
                if alone and isinstance(results[0], Exception):
                    self._rollback(raw, cur)
                else:
                    self._commit(raw, cur)
            finally:
                cur.close()
        except BaseException:
            self.close()  # rolled back; the next batch starts on a fresh connection
            raise
        return results

    def _begin_immediate(self, cur: Any) -> None:
        """``BEGIN IMMEDIATE``, retried every 0.2 ms while another process holds the lock.

        Several listener processes (node.listener.processes) share one SQLite file; its
        busy handler sleeps 1, 2, 5, 10 ... ms between attempts, far longer than the
        ~0.3 ms another writer holds the lock for a batch, so this connection runs with
        ``busy_timeout=0`` (set in :meth:`_connection`) and retries here, within the same
        overall limit (``sqlite_busy_timeout_ms``). Inside the transaction no other lock
        is needed: WAL readers never block the writer.
        """
        deadline = time.monotonic() + self.db.sqlite_busy_timeout_ms / 1000
        while True:
            try:
                cur.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.0002)

    def _commit(self, raw: Any, cur: Any) -> None:
        if self.db.is_sqlite:
            cur.execute("COMMIT")
        else:
            raw.commit()

    def _rollback(self, raw: Any, cur: Any) -> None:
        if self.db.is_sqlite:
            cur.execute("ROLLBACK")
        else:
            raw.rollback()

    @staticmethod
    def _one(
        cur: Any, dialect: Dialect, rec: InstanceRecord, now: datetime, known: KnownIds | None, *, savepoint: bool
    ) -> Any:
        """One record; a refusal (``InputError``) is returned, undone to its savepoint if
        ``savepoint``, else left for the caller to roll back with the transaction."""
        try:
            check_record(rec, now)
        except (InputError, ValueError) as exc:
            return exc  # nothing executed for this record
        if not savepoint:
            try:
                return _record_on_cursor(cur, dialect, rec, now, known=known)
            except InputError as exc:
                return exc
        cur.execute("SAVEPOINT locus_ingest")
        try:
            outcome: RecordOutcome | Exception = _record_on_cursor(cur, dialect, rec, now, known=known)
        except InputError as exc:
            cur.execute("ROLLBACK TO SAVEPOINT locus_ingest")
            outcome = exc
        cur.execute("RELEASE SAVEPOINT locus_ingest")
        return outcome

    def _connection(self) -> Any:
        if self._raw is None:
            raw = self.db.engine.raw_connection()
            if self.db.is_sqlite:
                cur = raw.cursor()
                cur.execute("PRAGMA busy_timeout=0")  # retried in _begin_immediate instead
                cur.close()
            self._raw = raw
        return self._raw

    def close(self) -> None:
        """Roll back anything open and return the connection to the pool (invalidated
        if it is broken)."""
        raw, self._raw = self._raw, None
        if raw is None:
            return
        try:
            raw.rollback()
            if self.db.is_sqlite:  # back to the engine's setting before the pool reuses it
                cur = raw.cursor()
                cur.execute(f"PRAGMA busy_timeout={int(self.db.sqlite_busy_timeout_ms)}")
                cur.close()
            raw.close()
        except Exception:
            with contextlib.suppress(Exception):
                raw.invalidate()


@dataclass(frozen=True)
class IndexedCopy:
    """The copy of a SOP instance the index holds (what a new copy is compared with)."""

    path: str
    transfer_syntax: str
    size_bytes: int


def indexed_copy(session: Session, sop_uid: str) -> IndexedCopy | None:
    """The indexed copy of ``sop_uid``, or None if the index does not hold it.

    Read by the listener only when the instance's file is already in the spool (a
    resend), to tell a plain resend from different content under the same UID.
    """
    row = session.execute(
        select(Instance.path, Instance.transfer_syntax, Instance.size_bytes).where(Instance.sop_uid == sop_uid)
    ).first()
    return None if row is None else IndexedCopy(str(row[0]), str(row[1]), int(row[2]))


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


def indexed_instances(session: Session, sop_uids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (SOP Class UID, spool path) of those of ``sop_uids`` that are
    indexed: what a Storage Commitment answer (PS3.4 J.3) may call committed."""
    return {
        str(sop): (str(sop_class), str(path))
        for sop, sop_class, path in session.execute(
            select(Instance.sop_uid, Instance.sop_class_uid, Instance.path).where(Instance.sop_uid.in_(list(sop_uids)))
        )
    }
