"""C-STORE and C-ECHO handlers: store durably, index, answer. Nothing else.

pynetdicom runs a handler on the association's thread and the sender waits until it
returns (PS3.4 Annex B), so the C-STORE handler only validates, writes and indexes;
analysis is triggered elsewhere from the database (docs/design.md D2).

Order of operations for one C-STORE, and the answer at each failure (status.py):

1. Affected SOP Instance UID from the command set must be a valid UID → else 0xC213.
   The data set must not be larger than ``max_instance_bytes`` → else 0xA700, before
   anything is parsed or written.
2. The data set must be structurally complete (not truncated, really DICOM) and its
   indexed attributes decodable → else 0xC210 (about 0.5 ms for a 512×512 CT).
3. Study/Series/SOP Instance/SOP Class UIDs in the data set must be valid → else 0xC213;
   SOP Instance UID must equal the command's → else 0xC212; SOP Class UID must equal
   the command's → else 0xA900.
4. Write, unless this instance is already in the spool (a resend; its content is then
   compared with the indexed copy, and different content follows ``duplicate_policy``:
   ``keep_first`` writes nothing, ``replace`` writes ``<sop>.<digest>.dcm`` beside the
   first copy; either way a WARNING and a ``duplicate`` audit row): the spool must stay
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

Objects a Locus node produced (its SR forwarded back by a PACS) are indexed with origin
``own`` and never make a study version (``_is_own`` here, the reports table in
node.db.ingest): otherwise each returned SR would start a new analysis and a new SR.

Every refusal is logged with UIDs only (no patient data) and recorded through
``record_rejection`` so an operator can see why a sender's object is missing.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE

from node.db import repo
from node.db.base import Database
from node.listener.index_writer import DirectorySyncError, IndexWriter
from node.listener.parsing import IndexFields, MalformedDataSet, checked_index_fields
from node.listener.status import StoreStatus, status_dataset
from node.storage import Spool, SpoolFullError, is_valid_uid, relpath_for
from pipelines.errors import InputError

LOGGER = logging.getLogger(__name__)

StoredHook = Callable[["repo.InstanceRecord", Any], None]
"""Called after an instance is stored and indexed: ``(record, RecordOutcome)``. Must be fast."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


#: (Manufacturer, Manufacturer's Model Name) of the objects a Locus node writes: the SR's
#: General Equipment module (pipelines.analysis.DEFAULT_DEVICE; a test checks that they
#: agree). Written out, not imported, so listener processes stay free of the analysis stack.
LOCUS_DEVICES: tuple[tuple[str, str], ...] = (("Locus project", "Locus PET/CT node"),)

DUPLICATE_POLICIES = ("keep_first", "replace")


@dataclass
class StoreContext:
    """What the C-STORE handler needs, injected through pynetdicom's handler arguments."""

    spool: Spool
    db: Database
    on_stored: StoredHook | None = None
    clock: Callable[[], datetime] = field(default=_utcnow)
    # Group commit (node.listener.index_writer); None = one transaction per C-STORE.
    writer: IndexWriter | None = None
    # dicom.max_instance_bytes: larger data sets are refused (0xA700); None = no limit.
    max_instance_bytes: int | None = None
    # dicom.duplicate_policy for a known SOP Instance UID with different content.
    duplicate_policy: str = "keep_first"
    # analysis.uid_root: instances under it are the node's own (its SRs sent back).
    own_uid_root: str | None = None
    # Equipment of objects written by any Locus node (copies from another Locus).
    own_devices: tuple[tuple[str, str], ...] = LOCUS_DEVICES

    def __post_init__(self) -> None:
        if self.duplicate_policy not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate_policy must be one of {DUPLICATE_POLICIES}, got {self.duplicate_policy!r}")
        if self.max_instance_bytes is not None and self.max_instance_bytes < 1:
            raise ValueError("max_instance_bytes must be >= 1")


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


def _part10_bytes(
    event: evt.Event, sop_class_uid: str, sop_instance_uid: str, max_bytes: int | None
) -> tuple[bytes, bytes, str]:
    """(whole Part 10 file, data set bytes, transfer syntax) without decoding anything.

    The UIDs are the command's (already checked to be valid UIDs, so ASCII). A data set
    larger than ``max_bytes`` is refused here, before anything is parsed or written.
    """
    raw = event.encoded_dataset(include_meta=False)
    if max_bytes is not None and len(raw) > max_bytes:
        raise _Refused(
            StoreStatus.OUT_OF_RESOURCES, "instance_too_large",
            f"data set of {len(raw)} bytes exceeds dicom.max_instance_bytes = {max_bytes}",
        )
    transfer_syntax = str(event.context.transfer_syntax)
    return file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax) + raw, raw, transfer_syntax


def _is_own(fields: IndexFields, ctx: StoreContext) -> bool:
    """An object a Locus node produced: under this node's UID root, or with Locus's
    equipment identity (PS3.3 C.7.5.1 Manufacturer + Manufacturer's Model Name), e.g.
    another Locus's SR. This node's own SRs are also recognised by the index, through
    the reports table (node.db.ingest)."""
    root = ctx.own_uid_root
    if root and fields.sop_uid.startswith(root + "."):
        return True
    return (fields.manufacturer, fields.manufacturer_model_name) in ctx.own_devices


def _dataset_part(file_bytes: bytes) -> bytes:
    """The data set of a Part 10 file: after the preamble, "DICM" and the File Meta
    group, whose first element is its group length (PS3.10 §7.1, (0002,0000) UL)."""
    if len(file_bytes) >= 144 and file_bytes[128:136] == b"DICM\x02\x00\x00\x00":
        (group_length,) = struct.unpack_from("<L", file_bytes, 140)
        return file_bytes[144 + group_length :]
    return file_bytes


def same_content(indexed_file: bytes, indexed_ts: str, new_file: bytes, new_raw: bytes, new_ts: str) -> bool:
    """Whether a new copy of a SOP instance is the object already indexed.

    Same transfer syntax: the data set bytes must be equal. Another transfer syntax (a
    PACS may transcode when it forwards): the same object if every attribute outside
    Pixel Data decodes to the same value; the pixel encoding itself is not compared.
    """
    if new_ts == indexed_ts:
        return _dataset_part(indexed_file) == new_raw
    try:
        first = dcmread(BytesIO(indexed_file), stop_before_pixels=True)
        second = dcmread(BytesIO(new_file), stop_before_pixels=True)
        return bool(first == second)
    except Exception:
        return False


def _conflicting_copy(
    ctx: StoreContext, sop_uid: str, file_bytes: bytes, raw: bytes, transfer_syntax: str
) -> repo.IndexedCopy | None:
    """The indexed copy of a resent SOP instance if the new bytes are a different object.

    None for a plain resend (same content), or when the index does not hold the
    instance (it is then indexed as new). Only called when the instance's file is
    already in the spool, so a first receive costs nothing here.
    """
    try:
        with ctx.db.session() as session:
            indexed = repo.indexed_copy(session, sop_uid)
    except Exception as exc:
        LOGGER.exception("could not read the index for resent instance %s", sop_uid)
        raise _Refused(
            StoreStatus.INDEX_UNAVAILABLE, "index_failed", f"index not readable ({type(exc).__name__}); resend later"
        ) from exc
    if indexed is None:
        return None
    try:
        with ctx.spool.open(indexed.path) as fh:
            first = fh.read()
    except OSError as exc:
        # The indexed copy cannot be compared: keep today's resend behaviour, say so.
        LOGGER.error("indexed copy of %s unreadable (%s); treated as a resend", sop_uid, exc.strerror or exc)
        return None
    if same_content(first, indexed.transfer_syntax, file_bytes, raw, transfer_syntax):
        return None
    return indexed


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
    request = cast(C_STORE, event.request)  # evt.EVT_C_STORE carries a C-STORE request
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
        file_bytes, raw, transfer_syntax = _part10_bytes(event, command_class, command_sop, ctx.max_instance_bytes)

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
        duplicate: str | None = None
        variant: str | None = None
        conflicting = (
            _conflicting_copy(ctx, fields.sop_uid, file_bytes, raw, transfer_syntax) if existed else None
        )
        if conflicting is not None:
            # The same SOP Instance UID with other content: a sender error (PS3.3
            # C.12.1.1.1). keep_first writes nothing; replace writes the new copy beside
            # the first, named by its digest (a retry of it finds the same name).
            duplicate = ctx.duplicate_policy
            if duplicate == "replace":
                variant = hashlib.sha256(file_bytes).hexdigest()[:16]
                existed = ctx.spool.exists(
                    relpath_for(fields.study_uid, fields.series_uid, fields.sop_uid, variant)
                )
        try:
            if duplicate == "keep_first":
                assert conflicting is not None
                relpath = conflicting.path  # nothing written: the index keeps the first copy
            else:
                # With the group-commit writer, the directory fsync is done by the writer
                # (once per directory per batch) before it commits this record.
                relpath = ctx.spool.put_atomic(
                    fields.study_uid, fields.series_uid, fields.sop_uid, file_bytes,
                    sync_dir=ctx.writer is None, variant=variant,
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
            origin="own" if _is_own(fields, ctx) else "received",
            duplicate=duplicate,
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
    if outcome.duplicate is not None:
        LOGGER.warning(
            "SOP Instance UID received again with different content, policy %s: sop=%s series=%s study=%s "
            "calling=%s (received %d times)",
            outcome.duplicate, record.sop_uid, record.series_uid, record.study_uid, calling, outcome.receive_count,
        )
    elif not outcome.new:
        LOGGER.info(
            "duplicate instance %s from %s (received %d times)", record.sop_uid, calling, outcome.receive_count
        )
    if outcome.own and outcome.new:
        LOGGER.info(
            "own instance %s (a Locus result sent back) indexed; no new study version for %s",
            record.sop_uid, record.study_uid,
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
