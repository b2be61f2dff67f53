"""C-STORE SCU: send one report (or any instance) to a DICOM peer.

Only the presentation contexts the object needs are proposed — its SOP class with its
own transfer syntax, plus Explicit/Implicit VR Little Endian when the object is
uncompressed — because strict PACS reject associations that propose every storage class
(docs/design.md F8). Outcomes (PS3.4 Annex B.2.3, PS3.7 Annex C):

* 0x0000 and the warnings 0xB000, 0xB006, 0xB007: delivered → :class:`SendResult`.
* No connection, association rejected or aborted, no response, or a peer status of
  "out of resources" (A7xx) / "resource limitation" (0x0213): :class:`TransientError`
  with the reason; the outbox retries with backoff.
* Any other failure status (A9xx, Cxxx, 0x0122 SOP class not supported, ...) or a peer
  that accepts none of the proposed contexts: :class:`ExportRefused`, which carries the
  status; retrying the same bytes would fail the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from node.listener.status import describe, is_delivered, is_transient_failure
from node.listener.tls import client_context
from pipelines.errors import LocusError, TransientError

LOGGER = logging.getLogger(__name__)


class ExportRefused(LocusError):
    """The peer refused the object for a reason retrying will not change."""

    code = "export_refused"

    def __init__(self, reason: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(reason, code=code)
        self.status = status


@dataclass(frozen=True)
class PeerTls:
    """DICOM TLS to a peer (PS3.15 B.9; node.listener.tls.client_context): the peer's
    certificate is checked against ``ca`` (None = system trust store) and must name the
    peer's host; ``certificate``/``private_key`` answer a request for a client certificate."""

    ca: str | None = None
    certificate: str | None = None
    private_key: str | None = None

    @classmethod
    def of(cls, destination: Any) -> PeerTls | None:
        """From an ``export.destinations`` entry (node.settings.ExportDestination)."""
        if not destination.tls:
            return None
        def text(p: object) -> str | None:
            return None if p is None else str(p)
        return cls(text(destination.tls_ca), text(destination.tls_certificate), text(destination.tls_private_key))


@dataclass(frozen=True)
class Peer:
    """A C-STORE SCP to send to."""

    ae_title: str
    host: str
    port: int
    name: str = ""
    tls: PeerTls | None = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


@dataclass(frozen=True)
class SendResult:
    """A delivered C-STORE: the peer's status (0x0000 or a warning) and its meaning."""

    status: int
    status_name: str
    sop_instance_uid: str
    error_comment: str | None = None

    @property
    def warning(self) -> bool:
        """Whether the peer accepted with a warning status rather than plain success (PS3.4 B.2.3)."""
        return self.status != 0x0000


def _identify(source: Path | Dataset) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Transfer Syntax UID) of what is to be sent."""
    if isinstance(source, Dataset):
        ts = getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", None)
        return str(source.SOPClassUID), str(source.SOPInstanceUID), str(ts or ExplicitVRLittleEndian)
    ds = dcmread(os.fspath(source), stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)


def proposed_contexts(sop_class: str, transfer_syntax: str) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose for one object (abstract syntax, syntaxes)."""
    uncompressed: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    if transfer_syntax in uncompressed:
        first = [transfer_syntax] + [t for t in uncompressed if t != transfer_syntax]
        return [(sop_class, first)]
    if UID(transfer_syntax).is_compressed:
        return [(sop_class, [transfer_syntax])]
    # Deflated or big endian: offer it and the little endian pair (pynetdicom re-encodes).
    return [(sop_class, [transfer_syntax]), (sop_class, uncompressed)]


def _reject_reason(primitive: A_ASSOCIATE | None) -> str:
    if primitive is None:
        return "association rejected"
    return (
        f"association rejected ({primitive.result_str}, {primitive.source_str}: "
        f"{primitive.reason_str})"
    )


def _new_ae(calling_ae_title: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def _associate(ae: AE, peer: Peer, max_pdu: int) -> Association:
    """Open an association or raise TransientError saying why none was established."""
    seen: dict[str, Any] = {"connected": False, "reject": None}

    def on_open(event: evt.Event) -> None:
        seen["connected"] = True

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0x00):
            seen["reject"] = primitive

    tls_args = None
    if peer.tls is not None:
        # pynetdicom wraps the socket and does the handshake (server name = host) before
        # the A-ASSOCIATE-RQ; a failed handshake reads as "cannot connect" below.
        tls_args = (client_context(peer.tls.ca, peer.tls.certificate, peer.tls.private_key), peer.host)
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        max_pdu=max_pdu,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse)],
        tls_args=tls_args,
    )
    if assoc.is_established:
        return assoc
    where = f"{peer} ({peer.name})" if peer.name else str(peer)
    if assoc.is_rejected:
        raise TransientError(f"{where}: {_reject_reason(seen['reject'])}", code="association_rejected")
    if not seen["connected"]:
        how = " or complete the TLS handshake (see the log)" if peer.tls is not None else ""
        raise TransientError(f"{where}: cannot connect{how}", code="peer_unreachable")
    if not assoc.accepted_contexts and assoc.rejected_contexts:
        raise ExportRefused(
            f"{where} accepted none of the proposed presentation contexts",
            code="context_not_accepted",
        )
    raise TransientError(f"{where}: association aborted during negotiation", code="association_aborted")


def send_instance(
    source: str | os.PathLike[str] | Dataset,
    peer: Peer,
    *,
    calling_ae_title: str = "LOCUS",
    timeout: float = 30.0,
    max_pdu: int = 0,
) -> SendResult:
    """Send one instance to ``peer`` over a fresh association and release it."""
    src: Path | Dataset = source if isinstance(source, Dataset) else Path(source)
    sop_class, sop_uid, transfer_syntax = _identify(src)

    ae = _new_ae(calling_ae_title, timeout)
    for abstract, syntaxes in proposed_contexts(sop_class, transfer_syntax):
        ae.add_requested_context(abstract, syntaxes)
    assoc = _associate(ae, peer, max_pdu)
    where = f"{peer} ({peer.name})" if peer.name else str(peer)

    try:
        try:
            status_ds = assoc.send_c_store(src)
        except ValueError as exc:  # no accepted context fits the object
            raise ExportRefused(f"{where}: {exc}", code="context_not_accepted") from exc
        if not status_ds or "Status" not in status_ds:
            raise TransientError(
                f"{where}: no C-STORE response (timeout or connection lost)", code="no_response"
            )
        status = int(status_ds.Status)
        comment = str(status_ds.get("ErrorComment", "")) or None
    finally:
        if assoc.is_established:
            assoc.release()

    name = describe(status)
    if is_delivered(status):
        LOGGER.info("sent %s to %s: 0x%04X %s", sop_uid, where, status, name)
        return SendResult(status, name, sop_uid, comment)
    detail = f"{where} answered 0x{status:04X} {name}" + (f": {comment}" if comment else "")
    if is_transient_failure(status):
        raise TransientError(detail, code="peer_out_of_resources")
    raise ExportRefused(detail, status=status, code=f"peer_status_{status:04x}")


def echo(peer: Peer, *, calling_ae_title: str = "LOCUS", timeout: float = 10.0) -> int:
    """C-ECHO ``peer``; return the Verification status (raises TransientError if unreachable)."""
    ae = _new_ae(calling_ae_title, timeout)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification SOP Class (PS3.4 Annex A)
    assoc = _associate(ae, peer, 0)
    try:
        status_ds = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if not status_ds or "Status" not in status_ds:
        raise TransientError(f"{peer}: no C-ECHO response", code="no_response")
    return int(status_ds.Status)
