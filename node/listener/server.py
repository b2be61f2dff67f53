"""Start and stop the DICOM listener (non-blocking; one thread per association).

``start_listener`` takes either a :class:`ListenerConfig` of plain values (tests, the
benchmark) or the node's ``LocusSettings`` (the ``locus serve`` entrypoint), plus the
results database and the spool, and returns a running :class:`ListenerServer`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

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
from node.listener.handlers import StoreContext, StoredHook, handle_echo, handle_store
from node.listener.index_writer import IndexWriter
from node.listener.processes import resolve_listener_processes
from node.listener.transport import LocusRequestHandler, SharedSyntaxContext
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

    @classmethod
    def from_settings(cls, settings: LocusSettings) -> ListenerConfig:
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
        )


@dataclass
class ListenerServer:
    """A running listener; ``shutdown()`` stops accepting and closes associations."""

    server: ThreadedAssociationServer
    config: ListenerConfig
    context: StoreContext
    policy: CallerPolicy = field(repr=False)
    children: ListenerChildren | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def ae_title(self) -> str:
        return self.config.ae_title

    def shutdown(self) -> None:
        if self.children is not None:
            self.children.stop()
        self.server.shutdown()
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


class _LocusServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; with listener processes, it hands them their turns."""

    locus_children: ListenerChildren | None = None  # set once the children run
    locus_event_driven: bool = True  # read by LocusRequestHandler

    def process_request(self, request: Any, client_address: Any) -> None:
        children = self.locus_children
        if children is not None and children.hand_off(request):
            request.close()  # the child holds its own descriptor of the connection
            return
        super().process_request(request, client_address)


def _serve(ae: AE, cfg: ListenerConfig, handlers: list[Any]) -> _LocusServer:
    """What ``AE.start_server(block=False)`` does, with Locus's receive path
    (node.listener.transport) and its hand-off to listener processes."""
    server = ae.make_server(
        (cfg.host, cfg.port), evt_handlers=handlers, server_class=_LocusServer,
        request_handler=LocusRequestHandler,
        contexts=[SharedSyntaxContext.of(cx) for cx in ae.supported_contexts],
    )
    server.locus_event_driven = cfg.event_driven
    ae._servers.append(server)  # as start_server does, so AE.shutdown() stops it too
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{cfg.port}", daemon=True)
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
    policy = CallerPolicy(cfg.ae_title, tuple(cfg.allowed_callers))
    if policy.open:
        LOGGER.warning("no calling-AE allow-list configured: any caller may store to %s", cfg.ae_title)
    writer = IndexWriter(db, sync_parent=spool.sync_parent) if cfg.group_commit else None
    ctx = StoreContext(
        spool=spool, db=db, on_stored=on_stored, writer=writer, max_instance_bytes=cfg.max_instance_bytes,
        duplicate_policy=cfg.duplicate_policy, own_uid_root=cfg.own_uid_root,
    )
    handlers = [
        (evt.EVT_REQUESTED, make_request_handler(policy, _audit_refusal(db))),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
    ]
    try:
        server = _serve(ae, cfg, handlers)
    except BaseException:  # e.g. the port is taken: do not leave the writer thread behind
        if writer is not None:
            writer.close()
        raise
    running = ListenerServer(server=server, config=cfg, context=ctx, policy=policy)
    if cfg.processes > 1:
        from node.listener.processes import start_children

        try:
            running.children = start_children(
                # Children get connections handed over only: an unannounced loopback port.
                replace(cfg, host="127.0.0.1", port=0, processes=1),
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
        "DICOM listener %s on %s:%d (spool %r, %d allowed callers)",
        cfg.ae_title, running.host, running.port, spool, len(policy.allowed),
    )
    return running
