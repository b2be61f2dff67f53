"""Build the listener's Application Entity and decide who may associate with it.

Presentation contexts (PS3.8 §9.3.2.2): every storage SOP class in pynetdicom's
``AllStoragePresentationContexts`` (170, which unlike ``StoragePresentationContexts``
includes Label Map Segmentation Storage 1.2.840.10008.5.1.4.1.1.66.7) plus Verification.
Each accepts the uncompressed transfer syntaxes and the common compressed ones
(docs/design.md F8: senders that offer only JPEG-LS / JPEG 2000 / JPEG lossless must not be
refused). Objects are stored as received, so no codec is needed to accept them.

Who may connect (PS3.8 §7.1.1.3 A-ASSOCIATE-RJ): the called AE title must be ours
(unless ``require_called_ae_title`` is off) and the calling AE title must be on the
allow-list, optionally from given hosts. A refusal is answered as "rejected-permanent,
service-user, calling (or called) AE title not recognized", logged with its reason and
passed to an audit callback (the listener records it in the database).

How many at once: ``maximum_associations`` counts *requested* associations (an
A-ASSOCIATE-RQ received, not yet ended). A TCP connection that has not sent its request
(or a TLS handshake in progress) holds no slot: it is bounded by the ARTIM timer (PS3.8
§9.1.5) and by the listener's cap on pending connections (node.listener.server). Over
the limit the answer is "rejected-transient, service-provider (presentation), local
limit exceeded" (PS3.8 §9.3.4), audited like the other refusals.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pydicom import uid as _uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.listener.commitment import STORAGE_COMMITMENT_PUSH_MODEL

LOGGER = logging.getLogger(__name__)

#: Uncompressed first: when a sender proposes several, pynetdicom takes the sender's
#: order, so this list only decides *what* is acceptable, not the preference.
UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian,
)

#: PS3.5 Annex A.4 encapsulated syntaxes seen from modalities and PACS.
COMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    _uid.JPEGBaseline8Bit,  # 1.2.840.10008.1.2.4.50 (lossy)
    _uid.JPEGExtended12Bit,  # .51 (lossy)
    _uid.JPEGLossless,  # .57
    _uid.JPEGLosslessSV1,  # .70
    _uid.JPEGLSLossless,  # .80
    _uid.JPEGLSNearLossless,  # .81
    _uid.JPEG2000Lossless,  # .90
    _uid.JPEG2000,  # .91 (lossy or lossless)
    _uid.HTJ2KLossless,  # .201
    _uid.HTJ2KLosslessRPCL,  # .202
    _uid.HTJ2K,  # .203
    _uid.RLELossless,  # 1.2.840.10008.1.2.5
)

ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    UNCOMPRESSED_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES
)

# A-ASSOCIATE-RJ fields (PS3.8 §9.3.4): result, source, reason/diag.
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAG_CALLING_AE_NOT_RECOGNIZED = 0x03
DIAG_CALLED_AE_NOT_RECOGNIZED = 0x07
REJECT_TRANSIENT = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
DIAG_LOCAL_LIMIT_EXCEEDED = 0x02


#: Added to pynetdicom's own ``maximum_associations`` so that its check (which also
#: counts connections that have not sent a request yet) never answers before Locus's.
PYNETDICOM_LIMIT_HEADROOM = 100_000


@dataclass(frozen=True)
class AllowedCaller:
    """One allow-list entry: a calling AE title, optionally restricted to hosts.

    ``hosts`` holds IP addresses, CIDR networks or host names (resolved once when the
    policy is built); empty means any host.
    """

    ae_title: str
    hosts: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowedCaller:
        """Parse ``"AE"`` or ``"AE@host[,host...]"`` (hosts: IP, CIDR or name)."""
        ae, _, hosts = text.strip().partition("@")
        ae = ae.strip()
        if not ae or len(ae) > 16:
            raise ValueError(f"invalid calling AE title in allow-list entry {text!r}")
        return cls(ae, tuple(h.strip() for h in hosts.split(",") if h.strip()))


@dataclass(frozen=True)
class Refusal:
    """Why an association request was refused (for the log, the audit row and the RJ)."""

    code: str
    reason: str
    diagnostic: int


_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _resolve(host: str) -> list[_Net]:
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        LOGGER.warning("allow-list host %r does not resolve (%s); it matches nothing", host, exc)
        return []
    return sorted(
        {ipaddress.ip_network(info[4][0], strict=False) for info in infos}, key=str
    )


@dataclass
class CallerPolicy:
    """Association acceptance rules: our called AE title and the calling-AE allow-list.

    An empty allow-list accepts any calling AE (logged as a warning at start-up); the
    called AE title is checked unless ``require_called`` is False (a node reached under
    several titles, e.g. behind a router that rewrites them).
    """

    called_ae_title: str
    allowed: Sequence[AllowedCaller] = ()
    require_called: bool = True
    # AE title -> one entry per allow-list line: None = any host, else the networks.
    _networks: dict[str, list[list[_Net] | None]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        for entry in self.allowed:
            nets = [net for host in entry.hosts for net in _resolve(host)] if entry.hosts else None
            # Hosts that all fail to resolve leave an empty list: the entry matches nothing.
            self._networks.setdefault(entry.ae_title, []).append(nets)

    @property
    def open(self) -> bool:
        """Whether every calling AE is accepted (no allow-list configured)."""
        return not self.allowed

    def check(self, calling_ae: str, called_ae: str, peer_host: str) -> Refusal | None:
        """Return the reason to refuse this request, or None to accept it."""
        calling = calling_ae.strip()
        if self.require_called and called_ae.strip() != self.called_ae_title.strip():
            return Refusal(
                "called_ae_not_recognized",
                f"called AE title {called_ae.strip()!r} is not this node's "
                f"({self.called_ae_title!r})",
                DIAG_CALLED_AE_NOT_RECOGNIZED,
            )
        if self.open:
            return None
        entries = self._networks.get(calling)
        if entries is None:
            return Refusal(
                "calling_ae_not_allowed",
                f"calling AE title {calling!r} is not on the allow-list",
                DIAG_CALLING_AE_NOT_RECOGNIZED,
            )
        try:
            addr = ipaddress.ip_address(peer_host)
        except ValueError:
            addr = None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for nets in entries:
            if nets is None:
                return None  # entry without host restriction
            if addr is not None and any(addr in net for net in nets):
                return None
        return Refusal(
            "calling_host_not_allowed",
            f"calling AE title {calling!r} is not allowed from host {peer_host}",
            DIAG_CALLING_AE_NOT_RECOGNIZED,
        )


AuditRefusal = Callable[[Refusal, str, str], None]
"""Callback ``(refusal, calling_ae, peer_host)`` used to record a refused association."""


def requested_associations(assoc: Association) -> int:
    """Acceptor associations of ``assoc``'s AE, other than ``assoc``, that hold a slot:
    their A-ASSOCIATE-RQ has arrived and they have not been refused or ended."""
    return sum(
        1
        for other in assoc.ae.active_associations
        if other is not assoc
        and other.is_acceptor
        and other.requestor.primitive is not None
        and not (other.is_rejected or other.is_aborted or other.is_released or other._kill)
    )


def make_request_handler(
    policy: CallerPolicy,
    audit: AuditRefusal | None = None,
    *,
    maximum_associations: int | None = None,
) -> Callable[[evt.Event], None]:
    """An ``EVT_REQUESTED`` handler that rejects callers the policy refuses, and
    requests beyond ``maximum_associations`` (module docstring; None = no limit).

    pynetdicom runs it after receiving the A-ASSOCIATE-RQ and skips its own negotiation
    when the handler has rejected the association (association.py ``run_reactor``).
    Concurrent requests at the limit each see the other (its primitive is set before
    this handler runs), so the limit is never exceeded; at worst both are refused.
    """

    def on_requested(event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        assert primitive is not None  # set from the A-ASSOCIATE-RQ before EVT_REQUESTED
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        peer = str(assoc.requestor.address)
        refusal = policy.check(calling, called, peer)
        result, source = REJECT_PERMANENT, SOURCE_SERVICE_USER
        if refusal is None and maximum_associations is not None:
            busy = requested_associations(assoc)
            if busy >= maximum_associations:
                refusal = Refusal(
                    "association_limit",
                    f"{busy} associations already open (maximum_associations = {maximum_associations})",
                    DIAG_LOCAL_LIMIT_EXCEEDED,
                )
                result, source = REJECT_TRANSIENT, SOURCE_PROVIDER_PRESENTATION
        if refusal is None:
            return
        LOGGER.warning(
            "association refused: %s (calling=%s called=%s peer=%s)",
            refusal.reason, calling, called, peer,
        )
        if audit is not None:
            try:
                audit(refusal, calling, peer)
            except Exception:  # the refusal stands even if the audit row cannot be written
                LOGGER.exception("could not record the refused association")
        assoc.acse.send_reject(result, source, refusal.diagnostic)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    return on_requested


def build_ae(
    ae_title: str,
    *,
    maximum_associations: int = 8,
    acse_timeout: float = 30,
    dimse_timeout: float = 60,
    network_timeout: float = 60,
    maximum_pdu_size: int = 0,
    transfer_syntaxes: Iterable[str] = ACCEPTED_TRANSFER_SYNTAXES,
) -> AE:
    """The listener's AE with every storage context and Verification (PS3.8 §9.3.2.2, Annex D.1).

    ``maximum_pdu_size=0`` (unlimited) roughly halves receive time versus pynetdicom's
    16382 default (§7.3). Calling/called AE checks and the association limit are done
    by :func:`make_request_handler` so every refusal is audited, hence
    ``require_called_aet`` stays False here and pynetdicom's own limit (which counts
    connections still waiting for their request) is set out of the way: threads are
    bounded by ``maximum_associations`` plus the listener's pending-connection cap.
    """
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = maximum_associations + PYNETDICOM_LIMIT_HEADROOM
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.maximum_pdu_size = maximum_pdu_size
    syntaxes = list(dict.fromkeys(transfer_syntaxes))
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None  # pynetdicom's storage contexts all name one
        ae.add_supported_context(cx.abstract_syntax, syntaxes)
    ae.add_supported_context(Verification, list(UNCOMPRESSED_TRANSFER_SYNTAXES))
    # Storage Commitment Push Model SCP (PS3.4 Annex J; node.listener.commitment).
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, [_uid.ExplicitVRLittleEndian, _uid.ImplicitVRLittleEndian])
    return ae
