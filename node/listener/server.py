"""Start and stop the DICOM listener (non-blocking; one thread per association).

``start_listener`` takes either a :class:`ListenerConfig` of plain values (tests, the
benchmark) or the node's ``LocusSettings`` (the ``locus serve`` entrypoint), plus the
results database and the spool, and returns a running :class:`ListenerServer`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from node.db import repo
from node.db.base import Database
from node.listener.ae import (
    ACCEPTED_TRANSFER_SYNTAXES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    AllowedCaller,
    CallerPolicy,
    Refusal,
    build_ae,
    make_request_handler,
)
from node.listener.commitment import handle_n_action
from node.listener.handlers import StoreContext, StoredHook, handle_echo, handle_store
from node.listener.index_writer import IndexWriter
from node.listener.processes import resolve_listener_processes
from node.listener.tls import TlsAcceptor, server_context
from node.listener.transport import LocusRequestHandler, SharedSyntaxContext, check_pynetdicom_version
from node.storage import Spool

if TYPE_CHECKING:
    from node.listener.processes import ListenerChildren
    from node.settings import LocusSettings

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListenerConfig:
    """Plain listener settings (mirrors ``LocusSettings.dicom``)."""

    ae_title: str = "LOCUS"
    host: str = "0.0.0.0"
    port: int = 11112  # 0 = any free port (see ListenerServer.port)
    allowed_callers: Sequence[AllowedCaller] = ()
    maximum_associations: int = 8
    acse_timeout: float = 30
    dimse_timeout: float = 60
    network_timeout: float = 60
    maximum_pdu_size: int = 0
    accept_compressed: bool = True
    # Group commit of the index (node.listener.index_writer): one writer thread batches
    # directory fsyncs and index transactions across associations. False = one
    # transaction per C-STORE on the association's thread (kept for comparison).
    group_commit: bool = True
    # Listener processes behind this port (node.listener.processes): 1 = this process
    # only; n > 1 adds n - 1 child processes that get every n-th connection (one more
    # core each).
    processes: int = 1
    # Association loops woken by their queues instead of pynetdicom's 1 ms polling
    # (node.listener.transport, node.listener.acceptor). False = pynetdicom's loops.
    event_driven: bool = True
    # C-STORE policies (node.listener.handlers.StoreContext): size limit, what a known
    # SOP Instance UID with different content does, and the node's UID root (own objects).
    max_instance_bytes: int | None = None
    duplicate_policy: str = "keep_first"
    own_uid_root: str | None = None
    # False = accept associations addressed to any called AE title (node.listener.ae).
    require_called_ae_title: bool = True
    # Connections that have not sent their A-ASSOCIATE-RQ yet (or are in their TLS
    # handshake) beyond this many are closed at once: they hold no association slot,
    # but each holds threads until it closes or its ARTIM timer expires.
    max_pending_connections: int = 64
    # The plain TCP port; False = only the TLS port listens (tls_port required).
    plain_enabled: bool = True
    # DICOM TLS (node.listener.tls, PS3.15 B.9): a second port, served by this process.
    tls_port: int | None = None  # 0 = any free port (see ListenerServer.tls_port)
    tls_certificate: str | None = None  # PEM certificate (chain) of this node
    tls_private_key: str | None = None  # PEM private key, unencrypted
    tls_client_ca: str | None = None  # set = clients must present a certificate from this CA

    @classmethod
    def from_settings(cls, settings: LocusSettings) -> ListenerConfig:
        """The listener's configuration from the node settings."""
        d = settings.dicom
        return cls(
            ae_title=d.ae_title,
            host=d.host,
            port=d.port,
            allowed_callers=tuple(
                AllowedCaller(c.ae_title, (c.host,) if c.host else ()) for c in d.allowed_callers
            ),
            maximum_associations=d.max_associations,
            acse_timeout=d.acse_timeout_s,
            dimse_timeout=d.dimse_timeout_s,
            network_timeout=d.network_timeout_s,
            maximum_pdu_size=d.max_pdu,
            accept_compressed=d.accept_compressed,
            processes=resolve_listener_processes(d.listener_processes),
            event_driven=d.event_driven_associations,
            max_instance_bytes=d.max_instance_bytes,
            duplicate_policy=d.duplicate_policy,
            own_uid_root=settings.analysis.uid_root,
            require_called_ae_title=d.require_called_ae_title,
            plain_enabled=d.plain_port_enabled,
            tls_port=d.tls_port,
            tls_certificate=_path(d.tls_certificate),
            tls_private_key=_path(d.tls_private_key),
            tls_client_ca=_path(d.tls_client_ca),
        )


def _path(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass
class ListenerServer:
    """A running listener; ``shutdown()`` stops accepting and closes associations.

    ``server`` is the plain port's server, or the TLS one when the plain port is off.
    """

    server: ThreadedAssociationServer
    config: ListenerConfig
    context: StoreContext
    policy: CallerPolicy = field(repr=False)
    children: ListenerChildren | None = field(default=None, repr=False)
    tls_server: ThreadedAssociationServer | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """The address the listener is bound to."""
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was configured)."""
        return int(self.server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port, or None without TLS."""
        return None if self.tls_server is None else int(self.tls_server.server_address[1])

    @property
    def ae_title(self) -> str:
        """The AE title the listener answers to."""
        return self.config.ae_title

    def shutdown(self) -> None:
        """Stop accepting, stop the listener processes and close every server socket."""
        if self.children is not None:
            self.children.stop()
        self.server.shutdown()
        if self.tls_server is not None and self.tls_server is not self.server:
            self.tls_server.shutdown()
        if self.context.writer is not None:
            self.context.writer.close()
        LOGGER.info("DICOM listener %s on port %d stopped", self.config.ae_title, self.port)

    def __enter__(self) -> ListenerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _audit_refusal(db: Database) -> Any:
    def audit(refusal: Refusal, calling: str, peer: str) -> None:
        with db.session() as session:
            repo.record_rejection(
                session,
                code=refusal.code,
                reason=refusal.reason,
                calling_ae=calling,
                peer_host=peer,
                sop_uid=None,
                now=datetime.now(UTC),
            )

    return audit


def _audit_tls_failure(db: Database) -> Any:
    """Audit hook for a TLS handshake a peer started and that failed (node.listener.tls)."""
    audit = _audit_refusal(db)

    def on_failure(reason: str, peer: str) -> None:
        audit(Refusal("tls_handshake_failed", reason, 0), "", peer)

    return on_failure


def pending_connections(ae: AE) -> int:
    """Acceptor threads of ``ae`` still waiting for their A-ASSOCIATE-RQ."""
    return sum(
        1
        for assoc in ae.active_associations
        if assoc.is_acceptor and assoc.requestor.primitive is None and not assoc._kill
    )


class _LocusServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; with listener processes, it hands them their turns.

    It also closes connections beyond ``locus_max_pending`` that have not yet asked for
    an association (node.listener.ae: they hold no slot, so this bounds their threads).
    """

    locus_children: ListenerChildren | None = None  # set once the children run
    locus_event_driven: bool = True  # read by LocusRequestHandler
    locus_tls: TlsAcceptor | None = None  # read by LocusRequestHandler
    locus_max_pending: int = 64
    _locus_warned_at: float = 0.0

    def process_request(self, request: Any, client_address: Any) -> None:
        children = self.locus_children
        if children is not None and children.hand_off(request):
            request.close()  # the child holds its own descriptor of the connection
            return
        pending = pending_connections(self.ae) + (self.locus_tls.in_progress if self.locus_tls else 0)
        if pending >= self.locus_max_pending:
            now = time.monotonic()
            if now - self._locus_warned_at > 10:  # a flood must not flood the log as well
                self._locus_warned_at = now
                LOGGER.warning(
                    "%d connections have not asked for an association yet; closing new ones "
                    "(from %s) until they do or time out", pending, client_address[0],
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)


def _serve(
    ae: AE, cfg: ListenerConfig, handlers: list[Any], port: int, tls: TlsAcceptor | None = None
) -> _LocusServer:
    """What ``AE.start_server(block=False)`` does, with Locus's receive path
    (node.listener.transport), its hand-off to listener processes and its TLS."""
    check_pynetdicom_version(cfg.event_driven)
    server = cast(_LocusServer, ae.make_server(
        (cfg.host, port), evt_handlers=handlers, server_class=_LocusServer,
        request_handler=LocusRequestHandler,
        contexts=[SharedSyntaxContext.of(cx) for cx in ae.supported_contexts],
    ))  # server_class=_LocusServer
    server.locus_event_driven = cfg.event_driven
    server.locus_max_pending = cfg.max_pending_connections
    server.locus_tls = tls
    ae._servers.append(server)  # as start_server does, so AE.shutdown() stops it too
    name = f"AcceptorServer@{port}{'-tls' if tls else ''}"
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return server


def start_listener(
    config: ListenerConfig | LocusSettings,
    db: Database,
    spool: Spool,
    *,
    on_stored: StoredHook | None = None,
) -> ListenerServer:
    """Bind the SCP and return immediately; associations run on their own threads."""
    cfg = config if isinstance(config, ListenerConfig) else ListenerConfig.from_settings(config)
    ae = build_ae(
        cfg.ae_title,
        maximum_associations=cfg.maximum_associations,
        acse_timeout=cfg.acse_timeout,
        dimse_timeout=cfg.dimse_timeout,
        network_timeout=cfg.network_timeout,
        maximum_pdu_size=cfg.maximum_pdu_size,
        transfer_syntaxes=(
            ACCEPTED_TRANSFER_SYNTAXES if cfg.accept_compressed else UNCOMPRESSED_TRANSFER_SYNTAXES
        ),
    )
    if cfg.processes > 1 and on_stored is not None:
        raise ValueError("an on_stored hook cannot run in other listener processes: use processes=1")
    if not cfg.plain_enabled and cfg.tls_port is None:
        raise ValueError("the plain port is disabled and no TLS port is configured")
    tls: TlsAcceptor | None = None
    if cfg.tls_port is not None:
        if not (cfg.tls_certificate and cfg.tls_private_key):
            raise ValueError("a TLS port needs tls_certificate and tls_private_key")
        tls = TlsAcceptor(
            server_context(cfg.tls_certificate, cfg.tls_private_key, cfg.tls_client_ca),
            timeout=cfg.acse_timeout,
            on_failure=_audit_tls_failure(db),
        )
    policy = CallerPolicy(
        cfg.ae_title, tuple(cfg.allowed_callers), require_called=cfg.require_called_ae_title
    )
    if policy.open:
        LOGGER.warning("no calling-AE allow-list configured: any caller may store to %s", cfg.ae_title)
    writer = IndexWriter(db, sync_parent=spool.sync_parent) if cfg.group_commit else None
    ctx = StoreContext(
        spool=spool, db=db, on_stored=on_stored, writer=writer, max_instance_bytes=cfg.max_instance_bytes,
        duplicate_policy=cfg.duplicate_policy, own_uid_root=cfg.own_uid_root,
    )
    handlers = [
        (evt.EVT_REQUESTED, make_request_handler(
            policy, _audit_refusal(db), maximum_associations=cfg.maximum_associations
        )),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_N_ACTION, handle_n_action, [ctx]),  # Storage Commitment (node.listener.commitment)
    ]
    plain: _LocusServer | None = None
    tls_server: _LocusServer | None = None
    try:
        if cfg.plain_enabled:
            plain = _serve(ae, cfg, handlers, cfg.port)
        if tls is not None and cfg.tls_port is not None:
            tls_server = _serve(ae, cfg, handlers, cfg.tls_port, tls)
    except BaseException:  # e.g. the port is taken: do not leave the writer thread behind
        if plain is not None:
            plain.shutdown()
        if writer is not None:
            writer.close()
        raise
    server = plain or tls_server
    assert server is not None  # checked above: one of the two is configured
    running = ListenerServer(
        server=server, config=cfg, context=ctx, policy=policy, tls_server=tls_server
    )
    if cfg.processes > 1 and plain is not None:
        from node.listener.processes import start_children

        try:
            running.children = start_children(
                # Children get connections handed over only: an unannounced loopback port.
                # TLS connections stay in this process (its TLS server hands none off).
                replace(cfg, host="127.0.0.1", port=0, processes=1, plain_enabled=True, tls_port=None),
                cfg.processes - 1,
                database_url=db.url.render_as_string(hide_password=False),
                sqlite_busy_timeout_ms=db.sqlite_busy_timeout_ms,
                spool_root=str(spool.root),  # type: ignore[attr-defined]
                watermark=spool.watermark,  # type: ignore[attr-defined]
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            )
        except BaseException:
            running.shutdown()
            raise
        server.locus_children = running.children
    LOGGER.info(
        "DICOM listener %s on %s: %s (spool %r, %d allowed callers)",
        cfg.ae_title, running.host,
        ", ".join(
            ([f"plain port {plain.server_address[1]}"] if plain is not None else [])
            + ([f"TLS port {running.tls_port}"] if tls_server is not None else [])
        ),
        spool, len(policy.allowed),
    )
    return running
