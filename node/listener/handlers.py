"""C-STORE and C-ECHO handlers: store durably, index, answer. Nothing else.

pynetdicom runs a handler on the association's thread and the sender waits until it
returns (dicom-guide.md §7.2), so the C-STORE handler only validates, writes and indexes;
analysis is triggered elsewhere from the database (style.md lesson 2).

Order of operations for one C-STORE, and the answer at each failure (status.py):

1. Affected SOP Instance UID from the command set must be a valid UID → else 0xC213.
2. The data set must be structurally complete (not truncated, really DICOM) and its
   indexed attributes decodable → else 0xC210 (about 0.5 ms for a 512×512 CT).
3. Study/Series/SOP Instance/SOP Class UIDs in the data set must be valid → else 0xC213;
   SOP Instance UID must equal the command's → else 0xC212; SOP Class UID must equal
   the command's → else 0xA900.
4. Write, unless this instance is already in the spool (a resend): the spool must stay
   above its free-space watermark with this object → else 0xA700; temp file, fsync,
   atomic link/rename, fsync directory (node.storage) → on OSError 0xA700. Either way
   nothing is left half-stored.
5. Index in the database (idempotent on SOP Instance UID; a resend is counted) → on any
   database error 0xA701: the file stays in the spool, the reason is logged (and recorded
   if the database can still take a rejection row), and the sender is told to retry.
   With the group-commit writer (``StoreContext.writer``, what ``start_listener`` uses)
   steps 4's directory fsync and 5 run on the writer thread, batched with other
   associations' records; this thread waits for its own record's commit, and a failed
   directory fsync answers 0xA700, a failed transaction 0xA701 (index_writer.py).
   **Success is never answered for an instance that is not indexed.** A UID conflict
   (the SOP or series UID is already filed under another series or study) → 0xC214 and
   the new copy is removed.
6. 0x0000.

Every refusal is logged with UIDs only (no patient data) and recorded through
``record_rejection`` so an operator can see why a sender's object is missing.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt

from node.db import repo
from node.db.base import Database
from node.listener.index_writer import DirectorySyncError, IndexWriter
from node.listener.parsing import MalformedDataSet, checked_index_fields
from node.listener.status import StoreStatus, status_dataset
from node.storage import Spool, SpoolFullError, is_valid_uid, relpath_for
from pipelines.errors import InputError

LOGGER = logging.getLogger(__name__)

StoredHook = Callable[["repo.InstanceRecord", Any], None]
"""Called after an instance is stored and indexed: ``(record, RecordOutcome)``. Must be fast."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class StoreContext:
    """What the C-STORE handler needs, injected through pynetdicom's handler arguments."""

    spool: Spool
    db: Database
    on_stored: StoredHook | None = None
    clock: Callable[[], datetime] = field(default=_utcnow)
    # Group commit (node.listener.index_writer); None = one transaction per C-STORE.
    writer: IndexWriter | None = None


class _Refused(Exception):
    def __init__(self, status: StoreStatus, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


def _peer(event: evt.Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)


def _element(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, Explicit VR Little Endian (PS3.5 §7.1.2)."""
    if vr == b"OB":  # 2 reserved bytes and a 32-bit length (PS3.5 Table 7.1-1)
        return struct.pack("<HH", 0x0002, tag_elem) + b"OB\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", 0x0002, tag_elem) + vr + struct.pack("<H", len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw  # even length (PS3.5 §7.1.1): UI with NUL, SH with space


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (PS3.10 §7.1) of a received object.

    The same elements and values as pynetdicom's ``Event.file_meta`` (its implementation
    class UID and version name) encoded directly: building and validating a pydicom
    FileMetaDataset per C-STORE cost more CPU than the rest of this handler's parsing.
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    return b"\x00" * 128 + b"DICM" + _element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _part10_bytes(event: evt.Event, sop_class_uid: str, sop_instance_uid: str) -> tuple[bytes, bytes, str]:
    """(whole Part 10 file, data set bytes, transfer syntax) without decoding anything.

    The UIDs are the command's (already checked to be valid UIDs, so ASCII).
    """
    raw = event.encoded_dataset(include_meta=False)
    transfer_syntax = str(event.context.transfer_syntax)
    return file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax) + raw, raw, transfer_syntax


def _record_refusal(ctx: StoreContext, refused: _Refused, calling: str, host: str, sop: str | None) -> None:
    LOGGER.warning(
        "C-STORE refused 0x%04X %s: %s (calling=%s peer=%s sop=%s)",
        int(refused.status), refused.code, refused.reason, calling, host, sop,
    )
    try:
        with ctx.db.session() as session:
            repo.record_rejection(
                session,
                code=refused.code,
                reason=refused.reason,
                calling_ae=calling,
                peer_host=host,
                sop_uid=sop if sop and is_valid_uid(sop) else None,
                now=ctx.clock(),
            )
    except Exception:
        LOGGER.exception("could not record the C-STORE refusal (sop=%s)", sop)


def store_instance(event: evt.Event, ctx: StoreContext) -> Dataset:
    """The C-STORE handler body; see the module docstring for the order and statuses."""
    calling, host = _peer(event)
    request = event.request
    command_sop = str(request.AffectedSOPInstanceUID or "").strip()
    command_class = str(request.AffectedSOPClassUID or "").strip()
    try:
        if not is_valid_uid(command_sop):
            raise _Refused(
                StoreStatus.INVALID_UID, "invalid_uid",
                "Affected SOP Instance UID in the command is not a valid UID",
            )
        if not is_valid_uid(command_class):
            raise _Refused(
                StoreStatus.INVALID_UID, "invalid_uid",
                "Affected SOP Class UID in the command is not a valid UID",
            )
        file_bytes, raw, transfer_syntax = _part10_bytes(event, command_class, command_sop)

        try:
            fields = checked_index_fields(raw, transfer_syntax, file_bytes)
        except MalformedDataSet as exc:
            raise _Refused(StoreStatus.CANNOT_UNDERSTAND, "malformed_dataset", str(exc)) from exc

        for what, value in (
            ("SOPInstanceUID", fields.sop_uid),
            ("SOPClassUID", fields.sop_class_uid),
            ("StudyInstanceUID", fields.study_uid),
            ("SeriesInstanceUID", fields.series_uid),
        ):
            if not is_valid_uid(value):
                raise _Refused(
                    StoreStatus.INVALID_UID, "invalid_uid",
                    f"{what} in the data set is {'empty' if not value else 'not a valid UID'}",
                )
        if fields.sop_uid != command_sop:
            raise _Refused(
                StoreStatus.SOP_INSTANCE_MISMATCH, "sop_instance_mismatch",
                "SOPInstanceUID in the data set differs from the command's",
            )
        if fields.sop_class_uid != command_class:
            raise _Refused(
                StoreStatus.SOP_CLASS_MISMATCH, "sop_class_mismatch",
                f"SOPClassUID {fields.sop_class_uid} differs from the command's {command_class}",
            )

        received_at = ctx.clock()
        existed = ctx.spool.exists(relpath_for(fields.study_uid, fields.series_uid, fields.sop_uid))
        try:
            # With the group-commit writer, the directory fsync is done by the writer
            # (once per directory per batch) before it commits this record.
            relpath = ctx.spool.put_atomic(
                fields.study_uid, fields.series_uid, fields.sop_uid, file_bytes,
                sync_dir=ctx.writer is None,
            )
        except SpoolFullError as exc:
            raise _Refused(StoreStatus.OUT_OF_RESOURCES, "disk_watermark", exc.reason) from exc
        except OSError as exc:
            raise _Refused(
                StoreStatus.OUT_OF_RESOURCES, "write_failed", f"spool write failed: {exc.strerror or exc}"
            ) from exc

        record = repo.InstanceRecord(
            study_uid=fields.study_uid,
            series_uid=fields.series_uid,
            sop_uid=fields.sop_uid,
            sop_class_uid=fields.sop_class_uid,
            modality=fields.modality,
            transfer_syntax=transfer_syntax,
            path=relpath,
            size_bytes=len(file_bytes),
            calling_ae=calling,
            frame_of_reference_uid=fields.frame_of_reference_uid,
            number_of_slices=fields.number_of_slices,
            instance_number=fields.instance_number,
            referenced_instances=fields.referenced_instances,
        )
        try:
            if ctx.writer is not None:
                outcome = ctx.writer.record(record, received_at, relpath_to_sync=None if existed else relpath)
            else:
                with ctx.db.session() as session:
                    outcome = repo.record_instance(session, record, received_at)
        except InputError as exc:
            # e.g. uid_conflict: this SOP/series UID is already filed under another
            # series/study. A sender bug that must not merge studies: drop our new copy.
            if not existed:
                ctx.spool.remove(relpath)
            raise _Refused(StoreStatus.UID_CONFLICT, exc.code, exc.reason) from exc
        except DirectorySyncError as exc:
            # The writer's directory fsync failed: the new name may not survive a crash.
            LOGGER.error("instance written to %s but its directory could not be synced: %s", relpath, exc)
            raise _Refused(
                StoreStatus.OUT_OF_RESOURCES, "write_failed", f"spool sync failed: {exc.strerror or exc}"
            ) from exc
        except Exception as exc:
            LOGGER.exception("instance written to %s but not indexed", relpath)
            raise _Refused(
                StoreStatus.INDEX_UNAVAILABLE, "index_failed",
                f"stored but not indexed ({type(exc).__name__}); resend later",
            ) from exc
    except _Refused as refused:
        _record_refusal(ctx, refused, calling, host, command_sop)
        return status_dataset(refused.status, refused.reason)

    if not outcome.new and outcome.path and outcome.path != relpath and not existed:
        ctx.spool.remove(relpath)  # the index keeps the first copy (repo.RecordOutcome.path)
    if not outcome.new:
        LOGGER.info(
            "duplicate instance %s from %s (received %d times)", record.sop_uid, calling, outcome.receive_count
        )
    if ctx.on_stored is not None:
        try:
            ctx.on_stored(record, outcome)
        except Exception:  # the instance is safe; a hook failure must not fail the store
            LOGGER.exception("on_stored hook failed for %s", record.sop_uid)
    return status_dataset(StoreStatus.SUCCESS)


def handle_store(event: evt.Event, ctx: StoreContext) -> Dataset:
    """``EVT_C_STORE`` handler bound as ``(evt.EVT_C_STORE, handle_store, [ctx])``."""
    return store_instance(event, ctx)


def handle_echo(event: evt.Event) -> int:
    """``EVT_C_ECHO`` handler: Verification always succeeds while the listener runs."""
    LOGGER.debug("C-ECHO from %s", _peer(event)[0])
    return 0x0000
