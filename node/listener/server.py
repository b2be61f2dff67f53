"""Start and stop the DICOM listener (non-blocking; one thread per association).

``start_listener`` takes either a :class:`ListenerConfig` of plain values (tests, the
benchmark) or the node's ``LocusSettings`` (the ``locus serve`` entrypoint), plus the
results database and the spool, and returns a running :class:`ListenerServer`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
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
from node.storage import Spool

if TYPE_CHECKING:
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
        )


@dataclass
class ListenerServer:
    """A running listener; ``shutdown()`` stops accepting and closes associations."""

    server: ThreadedAssociationServer
    config: ListenerConfig
    context: StoreContext
    policy: CallerPolicy = field(repr=False)

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
        self.server.shutdown()
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
    policy = CallerPolicy(cfg.ae_title, tuple(cfg.allowed_callers))
    if policy.open:
        LOGGER.warning("no calling-AE allow-list configured: any caller may store to %s", cfg.ae_title)
    ctx = StoreContext(spool=spool, db=db, on_stored=on_stored)
    handlers = [
        (evt.EVT_REQUESTED, make_request_handler(policy, _audit_refusal(db))),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
    ]
    server = ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=handlers)
    assert server is not None  # block=False always returns the server
    running = ListenerServer(server=server, config=cfg, context=ctx, policy=policy)
    LOGGER.info(
        "DICOM listener %s on %s:%d (spool %r, %d allowed callers)",
        cfg.ae_title, running.host, running.port, spool, len(policy.allowed),
    )
    return running
