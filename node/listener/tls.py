"""DICOM over TLS: the listener's handshake and the exporter's client context.

PS3.15 Annex B.9 (BCP 195 TLS Secure Transport Connection Profile): TLS 1.2 or 1.3,
server authenticated by its certificate; with a client CA configured, the client must
present a certificate issued by it (mutual authentication, B.9 "the peer shall be
authenticated"). The association itself (A-ASSOCIATE and the AE allow-list,
node.listener.ae) runs unchanged inside the TLS connection. Cipher suites are
OpenSSL's defaults for TLS 1.2+ in Python's ``ssl`` module (no RC4, 3DES or export
suites), which match the BCP 195 recommendations.

Why the handshake is done here and not by pynetdicom: pynetdicom 3.0.4's server wraps
each accepted socket in ``get_request``, i.e. on the one accepting thread, so one client
that connects and never finishes its handshake stops every other connection until the
socket times out. :class:`TlsAcceptor` runs the handshake on the connection's own thread
(node.listener.transport.LocusRequestHandler), bounded by the ACSE timeout (the ARTIM
timer's value, PS3.8 §9.1.5); a failed or abandoned handshake creates no association and
so holds no association slot.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

LOGGER = logging.getLogger(__name__)

#: Oldest protocol version accepted or offered (PS3.15 B.9: TLS 1.2 or later).
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2

TlsFailureHook = Callable[[str, str], None]
"""Callback ``(reason, peer_host)`` for a handshake the peer started and that failed."""


def server_context(
    certificate: str | os.PathLike[str],
    private_key: str | os.PathLike[str],
    client_ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """The listener's TLS context; ``client_ca`` set = clients must present a certificate
    that chains to it (expired or untrusted ones fail the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_TLS_VERSION
    ctx.load_cert_chain(os.fspath(certificate), os.fspath(private_key))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=os.fspath(client_ca))
    return ctx


def client_context(
    ca: str | os.PathLike[str] | None = None,
    certificate: str | os.PathLike[str] | None = None,
    private_key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """An exporter's TLS context: the peer's certificate is verified (against ``ca``, or
    the system's trust store) including its host name or IP address; ``certificate``
    and ``private_key`` are sent when the peer asks for a client certificate."""
    ctx = ssl.create_default_context(cafile=os.fspath(ca) if ca is not None else None)
    ctx.minimum_version = MINIMUM_TLS_VERSION
    if certificate is not None:
        ctx.load_cert_chain(os.fspath(certificate), os.fspath(private_key) if private_key else None)
    return ctx


#: Errors of a peer that connected and left without a TLS ClientHello (port scanners,
#: TCP health checks) or whose handshake timed out: logged, not audited.
_QUIET_ERRORS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, TimeoutError)


@dataclass
class TlsAcceptor:
    """Server-side handshakes on the connection threads of one TLS listener."""

    context: ssl.SSLContext
    timeout: float | None
    on_failure: TlsFailureHook | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    in_progress: int = 0  # handshakes under way (counted as pending connections)

    def handshake(self, conn: socket.socket, peer_host: str) -> ssl.SSLSocket | None:
        """The connection wrapped in TLS, or None (connection closed) if the handshake
        failed or timed out."""
        with self._lock:
            self.in_progress += 1
        tls: ssl.SSLSocket | None = None
        try:
            conn.settimeout(self.timeout)
            tls = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            tls.do_handshake()
            tls.settimeout(None)  # as pynetdicom's accepted sockets: blocking
            return tls
        except (OSError, ValueError) as exc:
            self._failed(exc, peer_host)
            with contextlib.suppress(OSError):
                (tls or conn).close()
            return None
        finally:
            with self._lock:
                self.in_progress -= 1

    def _failed(self, exc: BaseException, peer_host: str) -> None:
        if isinstance(exc, _QUIET_ERRORS) or getattr(exc, "errno", None) in (errno.ECONNRESET, errno.EPIPE):
            LOGGER.info("TLS connection from %s closed before its handshake completed: %s", peer_host, exc)
            return
        verify = getattr(exc, "verify_message", None)  # e.g. "certificate has expired"
        code = getattr(exc, "reason", None)  # OpenSSL's, e.g. PEER_DID_NOT_RETURN_A_CERTIFICATE
        reason = (
            f"certificate verify failed: {verify}" if verify
            else code.lower().replace("_", " ") if isinstance(code, str) else str(exc)
        )
        LOGGER.warning("TLS handshake from %s failed: %s", peer_host, reason)
        if self.on_failure is not None:
            try:
                self.on_failure(f"TLS handshake failed: {reason}", peer_host)
            except Exception:  # the refusal stands even if the audit row cannot be written
                LOGGER.exception("could not record the failed TLS handshake")
