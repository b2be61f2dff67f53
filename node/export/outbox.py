"""The export outbox: send due reports, retry with bounded backoff, then fail visibly.

Exports are rows in the results database (``node.db.repo``): ``due_exports`` claims the
ones whose time has come (a lease, so two exporters never send the same report to the
same place at once), each is sent with :func:`node.export.scu.send_instance`, and
``record_export_attempt`` stores the outcome:

* delivered (0x0000 or a storage warning) → ``done``;
* transient failure (no connection, rejected/aborted association, no response, peer out
  of resources) → ``pending`` again after ``base · 2^(attempts-1)`` seconds, capped; after
  ``max_attempts`` → ``failed`` with the peer's status or error (docs/design.md F5, F6: bounded,
  never a retry storm);
* permanent failure (peer refuses the object with a failure status, accepts no context,
  the destination is unknown, the SR file is missing) → ``failed`` at once.

``locus exports retry`` puts failed exports back to pending for a new round.

Return to sender: the destination name :data:`RETURN_TO_SENDER` means "the AE that sent
the study": its calling AE title (from the indexed instances) is looked up among the
allowed callers that have a host and port, then among the destinations by AE title.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from node.db import repo
from node.db.base import Database
from node.export.scu import ExportRefused, Peer, PeerTls, SendResult, send_instance
from pipelines.errors import TransientError

if TYPE_CHECKING:
    from node.settings import LocusSettings

LOGGER = logging.getLogger(__name__)

#: Destination name meaning "the calling AE that sent the study".
RETURN_TO_SENDER = "@sender"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff (attempts are counted per round)."""

    max_attempts: int = 5
    backoff_base_s: float = 30.0
    backoff_cap_s: float = 900.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_base_s <= 0 or self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("need max_attempts >= 1 and 0 < backoff_base_s <= backoff_cap_s")

    def delay_s(self, attempts_done: int) -> float:
        """Wait after ``attempts_done`` failed attempts: base, 2·base, 4·base, … ≤ cap."""
        return float(min(self.backoff_cap_s, self.backoff_base_s * 2 ** max(0, attempts_done - 1)))

    def next_attempt_at(self, attempts_done: int, now: datetime) -> datetime | None:
        """When to try again; None once ``max_attempts`` failures are spent."""
        if attempts_done >= self.max_attempts:
            return None
        return now + timedelta(seconds=self.delay_s(attempts_done))


class UnresolvedDestination(ExportRefused):
    """No peer is configured for an export's destination name."""

    code = "destination_unknown"


@dataclass(frozen=True)
class DestinationResolver:
    """Maps destination names to peers, including :data:`RETURN_TO_SENDER`."""

    destinations: Mapping[str, Peer]
    #: calling AE title → its own SCP (from the allow-list entries with host and port)
    senders: Mapping[str, Peer] = field(default_factory=dict)

    def resolve(self, name: str, calling_aes: Sequence[str] = ()) -> Peer:
        """The peer for a destination name; return-to-sender picks the first calling AE with a host and port."""
        if name != RETURN_TO_SENDER:
            peer = self.destinations.get(name)
            if peer is None:
                raise UnresolvedDestination(f"no export destination named {name!r} is configured")
            return peer
        by_ae = {p.ae_title: p for p in self.destinations.values()}
        for ae in calling_aes:
            peer = self.senders.get(ae) or by_ae.get(ae)
            if peer is not None:
                return peer
        raise UnresolvedDestination(
            "return to sender: none of the calling AE titles "
            f"{list(calling_aes)} has a configured host and port"
        )

    @classmethod
    def from_settings(cls, settings: LocusSettings) -> DestinationResolver:
        """The resolver of the configured export destinations."""
        dests = {
            d.name: Peer(ae_title=d.ae_title, host=d.host, port=d.port, name=d.name, tls=PeerTls.of(d))
            for d in settings.export.destinations
        }
        senders = {
            c.ae_title: Peer(ae_title=c.ae_title, host=c.host, port=c.port, name=RETURN_TO_SENDER)
            for c in settings.dicom.allowed_callers
            if c.host and c.port
        }
        return cls(dests, senders)


@dataclass(frozen=True)
class ExportOutcome:
    """What happened to one claimed export in this pass."""

    export_id: int
    destination: str
    sr_sop_uid: str
    ok: bool
    status: int | None
    error: str | None
    next_attempt_at: datetime | None

    @property
    def failed(self) -> bool:
        """True when the export is now in the terminal ``failed`` state."""
        return not self.ok and self.next_attempt_at is None


Sender = Callable[[Path, Peer], SendResult]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def process_due_exports(
    db: Database,
    *,
    resolver: DestinationResolver,
    policy: RetryPolicy,
    reports_root: Path,
    calling_ae_title: str = "LOCUS",
    timeout: float = 30.0,
    limit: int = 100,
    clock: Callable[[], datetime] = _utcnow,
    send: Sender | None = None,
) -> list[ExportOutcome]:
    """Send every export that is due now; return one outcome per claimed export.

    ``send`` defaults to a C-STORE with :func:`send_instance`; it exists so the CLI and
    tests can pass a differently configured sender, not to fake the network.
    """
    sender: Sender = send or (
        lambda path, peer: send_instance(path, peer, calling_ae_title=calling_ae_title, timeout=timeout)
    )
    with db.session() as session:
        rows = repo.due_exports(session, clock(), limit=limit, lease_s=max(300.0, 4 * timeout))
    outcomes = []
    for row in rows:
        outcomes.append(_send_one(db, row, resolver, policy, reports_root, sender, clock))
    return outcomes


def _send_one(
    db: Database,
    row: repo.ExportRow,
    resolver: DestinationResolver,
    policy: RetryPolicy,
    reports_root: Path,
    sender: Sender,
    clock: Callable[[], datetime],
) -> ExportOutcome:
    status: int | None = None
    error: str | None = None
    ok = False
    transient = False
    try:
        calling: list[str] = []
        if row.destination == RETURN_TO_SENDER:
            with db.session(readonly=True) as session:
                calling = repo.study_calling_aes(session, row.study_uid)
        peer = resolver.resolve(row.destination, calling)
        path = Path(row.sr_path)
        path = path if path.is_absolute() else reports_root / path
        if not path.is_file():
            raise ExportRefused(f"report file {path} does not exist", code="report_missing")
        result = sender(path, peer)
        ok, status = True, result.status
        if result.warning:
            error = f"delivered with warning 0x{result.status:04X} {result.status_name}"
    except TransientError as exc:
        transient, error = True, f"{exc.code}: {exc.reason}"
    except ExportRefused as exc:
        status, error = exc.status, f"{exc.code}: {exc.reason}"
    except Exception as exc:  # never leave a claimed row in 'sending' without a record
        LOGGER.exception("export %d failed unexpectedly", row.export_id)
        transient, error = True, f"unexpected: {type(exc).__name__}: {exc}"
    now = clock()
    next_at = policy.next_attempt_at(row.attempts + 1, now) if transient else None
    with db.session() as session:
        repo.record_export_attempt(
            session, row.export_id, ok=ok, status=status, error=error, next_attempt_at=next_at, now=now
        )
    if ok:
        LOGGER.info("export %d of %s to %s delivered", row.export_id, row.sr_sop_uid, row.destination)
    elif next_at is None:
        LOGGER.error("export %d of %s to %s failed for good: %s", row.export_id, row.sr_sop_uid, row.destination, error)
    else:
        LOGGER.warning(
            "export %d of %s to %s failed (attempt %d), retry at %s: %s",
            row.export_id, row.sr_sop_uid, row.destination, row.attempts + 1, next_at.isoformat(), error,
        )
    return ExportOutcome(row.export_id, row.destination, row.sr_sop_uid, ok, status, error, None if ok else next_at)


def process_due_exports_from_settings(settings: LocusSettings, db: Database) -> list[ExportOutcome]:
    """The outbox pass as configured (used by the periodic task and ``locus exports retry``)."""
    export = settings.export
    return process_due_exports(
        db,
        resolver=DestinationResolver.from_settings(settings),
        policy=RetryPolicy(export.max_attempts, export.backoff_base_s, export.backoff_cap_s),
        reports_root=settings.storage.reports_dir,
        calling_ae_title=export.calling_ae_title,
        timeout=export.timeout_s,
    )


def destinations_for_report(settings: LocusSettings) -> list[str]:
    """Destination names a new report is queued for (configured ones + return to sender)."""
    names: Iterable[str] = (d.name for d in settings.export.destinations)
    out = list(names)
    if settings.export.return_to_sender:
        out.append(RETURN_TO_SENDER)
    return out
