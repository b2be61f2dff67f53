"""Storage Commitment Push Model SCP (PS3.4 Annex J).

A sender asks, with an N-ACTION-RQ (Action Type ID 1, Request Storage Commitment;
PS3.4 J.3.2) naming a Transaction UID and the SOP instances it sent, whether Locus has
taken responsibility for them. Locus answers the N-ACTION at once (0x0000, request
accepted) and then sends the result as an N-EVENT-REPORT-RQ (PS3.4 J.3.3) **on the same
association**: Event Type ID 1 when every instance is committed, 2 when some failed,
with the committed ones in Referenced SOP Sequence and the others in Failed SOP Sequence
with a Failure Reason (PS3.4 Table J.3-2 / C.14.1.1.3: 0x0112 no such object instance,
0x0119 class-instance conflict, 0x0110 processing failure).

Committed means what Success to a C-STORE means here (node.listener.handlers): the file
is fsync-ed in the spool *and* indexed; the answer is read from the index, and the
file must still be in the spool. Reporting on a new association initiated by Locus
(PS3.4 J.3.3 allows either) is not implemented: a sender that releases the association
before the report arrives does not get it (it asks again; the request is idempotent).

Why a thread for the report: pynetdicom runs the N-ACTION handler on the association's
reactor thread and sends the N-ACTION-RSP only when it returns, so the report is sent
from a helper thread, started once that response is queued
(``ListenerDimse.after_response``, node.listener.store_response), that takes the
reactor's pause (``Association.send_n_event_report``) to send and await the report.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from node.db import repo
from node.storage import is_valid_uid

if TYPE_CHECKING:
    from node.listener.handlers import StoreContext

LOGGER = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
#: Well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

ACTION_REQUEST_COMMITMENT = 1
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES_EXIST = 2

# N-ACTION statuses (PS3.7 Annex C) and Failure Reasons (PS3.4 C.14.1.1.3).
STATUS_SUCCESS = 0x0000
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_MISSING_ATTRIBUTE = 0x0120
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_PROCESSING_FAILURE = 0x0110
FAILURE_PROCESSING = 0x0110
FAILURE_NO_SUCH_INSTANCE = 0x0112
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119


@dataclass(frozen=True)
class CommitmentResult:
    """The outcome of one request: committed (class, instance) and failed (class, instance, reason)."""

    transaction_uid: str
    committed: tuple[tuple[str, str], ...]
    failed: tuple[tuple[str, str, int], ...]

    def event_information(self) -> Dataset:
        """The N-EVENT-REPORT's Event Information (PS3.4 Table J.3-2)."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        if self.committed:
            ds.ReferencedSOPSequence = Sequence([_item(c, i) for c, i in self.committed])
        if self.failed:
            items = []
            for c, i, reason in self.failed:
                item = _item(c, i)
                item.FailureReason = reason
                items.append(item)
            ds.FailedSOPSequence = Sequence(items)
        return ds

    @property
    def event_type(self) -> int:
        """The N-EVENT-REPORT Event Type ID for this result (PS3.4 J.3.3)."""
        return EVENT_FAILURES_EXIST if self.failed else EVENT_ALL_COMMITTED


def _item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def check_commitment(
    ctx: StoreContext, transaction_uid: str, references: Iterable[tuple[str, str]]
) -> CommitmentResult:
    """Which of ``references`` (SOP Class UID, SOP Instance UID) are committed."""
    refs = list(references)
    uids = [i for _, i in refs if is_valid_uid(i)]
    rows: dict[str, tuple[str, str]] = {}
    if uids:
        with ctx.db.session(readonly=True) as session:
            rows = repo.indexed_instances(session, uids)
    committed: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    for sop_class, sop_uid in refs:
        row = rows.get(sop_uid)
        if row is None:
            failed.append((sop_class, sop_uid, FAILURE_NO_SUCH_INSTANCE))
        elif row[0] != sop_class:
            failed.append((sop_class, sop_uid, FAILURE_CLASS_INSTANCE_CONFLICT))
        elif not ctx.spool.exists(row[1]):  # indexed but gone from the spool: not safe
            failed.append((sop_class, sop_uid, FAILURE_PROCESSING))
        else:
            committed.append((sop_class, sop_uid))
    return CommitmentResult(transaction_uid, tuple(committed), tuple(failed))


def _references(request: Dataset) -> list[tuple[str, str]] | None:
    seq = request.get("ReferencedSOPSequence")
    if not seq:
        return None
    refs = []
    for item in seq:
        refs.append((str(item.get("ReferencedSOPClassUID", "")).strip(),
                     str(item.get("ReferencedSOPInstanceUID", "")).strip()))
    return refs


def handle_n_action(event: Any, ctx: StoreContext) -> tuple[int, Dataset | None]:
    """``EVT_N_ACTION`` handler: accept a Storage Commitment request and report it."""
    request = event.request
    if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT_PUSH_MODEL:
        return STATUS_NO_SUCH_ACTION, None  # no other SOP class is negotiated for N-ACTION
    if request.ActionTypeID != ACTION_REQUEST_COMMITMENT:
        return STATUS_NO_SUCH_ACTION, None
    try:
        info = event.action_information
    except Exception:  # undecodable Action Information
        LOGGER.warning("storage commitment request with undecodable Action Information")
        return STATUS_INVALID_ARGUMENT, None
    transaction = str(info.get("TransactionUID", "")).strip()
    refs = _references(info)
    if not transaction or refs is None:
        return STATUS_MISSING_ATTRIBUTE, None
    if not is_valid_uid(transaction):
        return STATUS_INVALID_ARGUMENT, None
    assoc = event.assoc
    calling = str(assoc.requestor.ae_title).strip()
    reporter = threading.Thread(
        target=_report, args=(assoc, ctx, transaction, refs, calling),
        name=f"commitment-{transaction[-12:]}", daemon=True,
    )
    after_response = getattr(assoc.dimse, "after_response", None)
    if after_response is None:  # not the listener's DIMSE provider (node.listener.transport)
        LOGGER.warning("storage commitment %s: cannot order the report after the response", transaction)
        return STATUS_PROCESSING_FAILURE, None
    # Start reporting only once the N-ACTION-RSP is queued, so the report follows it.
    after_response(int(request.MessageID), reporter.start)
    return STATUS_SUCCESS, None


def _report(assoc: Any, ctx: StoreContext, transaction: str, refs: list[tuple[str, str]], calling: str) -> None:
    try:
        result = check_commitment(ctx, transaction, refs)
    except Exception:  # database unavailable: every instance fails, the sender may ask again
        LOGGER.exception("storage commitment %s: index not readable", transaction)
        result = CommitmentResult(transaction, (), tuple((c, i, FAILURE_PROCESSING) for c, i in refs))
    LOGGER.info(
        "storage commitment %s from %s: %d committed, %d failed",
        transaction, calling, len(result.committed), len(result.failed),
    )
    if not assoc.is_established:
        LOGGER.warning("storage commitment %s: %s released the association before the report", transaction, calling)
        return
    try:
        status, _ = assoc.send_n_event_report(
            result.event_information(), result.event_type,
            STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE,
        )
    except Exception:  # association lost while reporting
        LOGGER.exception("storage commitment %s: report not delivered", transaction)
        return
    if not status or int(status.get("Status", 0xFFFF)) != 0x0000:
        LOGGER.warning("storage commitment %s: %s did not confirm the report (%s)", transaction, calling,
                       None if not status else hex(int(status.get("Status", 0xFFFF))))
