"""DIMSE status codes the Locus listener answers, and how the exporter reads a peer's.

Storage Service Class statuses are defined in PS3.4 Annex B.2.3 (C-STORE) and the
general ones in PS3.7 Annex C; Verification (C-ECHO) in PS3.4 Annex A. PS3.4 Annex B
reserves ranges (A7xx "Refused: Out of Resources", A9xx "Error: Data Set does not match
SOP Class", Cxxx "Error: Cannot understand") and leaves the low byte to the
implementation; Locus uses distinct low bytes so a sender's log (and ours) tells the
causes apart. Every failure answer also carries an Error Comment (0000,0902, PS3.7
§9.1.1.1.10) with the reason in words.

PS3.4 Annex GG (Non-Patient Object Storage) uses the same status families for
non-patient objects; Locus does not store those, but the exporter classifies their
statuses with the same table.
"""

from __future__ import annotations

from enum import IntEnum

from pydicom.dataset import Dataset


class StoreStatus(IntEnum):
    """C-STORE response statuses sent by the Locus SCP (PS3.4 Annex B.2.3)."""

    #: Success: the file is fsync-ed in the spool *and* indexed in the database.
    SUCCESS = 0x0000
    #: Refused: Out of Resources — spool above its free-space watermark, or the write
    #: itself failed (ENOSPC, EIO). Nothing was stored; the sender should retry later.
    OUT_OF_RESOURCES = 0xA700
    #: Refused: Out of Resources (Locus low byte 0x01) — the file was written but the
    #: database index could not be updated. The file stays in the spool (the next resend
    #: is then indexed idempotently); Success is never answered for an unindexed file.
    INDEX_UNAVAILABLE = 0xA701
    #: Error: Data Set does not match SOP Class — the command's Affected SOP Class UID
    #: differs from the data set's SOP Class UID.
    SOP_CLASS_MISMATCH = 0xA900
    #: Error: Cannot understand — not DICOM, truncated, or undecodable.
    CANNOT_UNDERSTAND = 0xC210
    #: Error: Cannot understand — unexpected exception in the handler (pynetdicom uses
    #: this value itself when a handler raises).
    PROCESSING_FAILURE = 0xC211
    #: Error: Cannot understand — Affected SOP Instance UID in the command set differs
    #: from SOP Instance UID in the data set.
    SOP_INSTANCE_MISMATCH = 0xC212
    #: Error: Cannot understand — a required UID (study, series, SOP instance or class)
    #: is missing, empty or not a valid UID (PS3.5 §9.1), so it cannot be filed.
    INVALID_UID = 0xC213
    #: Error: Cannot understand — the SOP Instance (or Series) UID is already filed under
    #: another series (or study): a sender bug that must not merge studies.
    UID_CONFLICT = 0xC214


class EchoStatus(IntEnum):
    """C-ECHO response statuses (PS3.4 Annex A.4; PS3.7 Annex C)."""

    SUCCESS = 0x0000


#: Warning statuses a Storage SCP may answer while still storing the object
#: (PS3.4 Annex B.2.3): coercion of data elements, elements discarded, data set does not
#: match SOP class. An export that receives one of these is delivered.
STORE_WARNINGS: frozenset[int] = frozenset({0xB000, 0xB006, 0xB007})


def status_dataset(status: int, comment: str = "") -> Dataset:
    """A C-STORE/C-ECHO response status with an Error Comment (max 64 chars, LO)."""
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        # Error Comment is LO (64 chars max) and must not carry PHI: callers pass UIDs
        # and reasons only.
        ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


def is_delivered(status: int) -> bool:
    """True if a peer's C-STORE status means the object was stored (success or warning)."""
    return status == 0x0000 or status in STORE_WARNINGS


def is_transient_failure(status: int) -> bool:
    """True for peer statuses worth retrying later.

    A7xx (out of resources, PS3.4 B.2.3) and 0x0213 (resource limitation, PS3.7 C)
    describe the peer's temporary state; A9xx / Cxxx and the other PS3.7 failures
    describe the object and would fail again unchanged.
    """
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


def describe(status: int) -> str:
    """Human-readable name of a C-STORE status (Locus codes first, then PS3.4 families)."""
    try:
        return StoreStatus(status).name.lower()
    except ValueError:
        pass
    if status in STORE_WARNINGS:
        return {0xB000: "coercion_of_data_elements", 0xB006: "element_discarded",
                0xB007: "data_set_does_not_match_sop_class"}[status]
    if 0xA700 <= status <= 0xA7FF:
        return "refused_out_of_resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data_set_does_not_match_sop_class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot_understand"
    if status == 0x0122:
        return "sop_class_not_supported"
    if status == 0x0124:
        return "not_authorised"
    if status == 0x0213:
        return "resource_limitation"
    if status == 0x0110:
        return "processing_failure"
    return "failure"
