"""The heartbeat that keeps a claimed analysis' lease alive while its worker works.

A claim (``repo.claim_analysis``) gives the worker a lease of ``analysis.lease_s``; this
thread renews it every ``analysis.lease_renew_s``.  If the process dies (kill -9, OOM,
host lost) the renewals stop, the lease expires, and the sweeper reclaims the version
(``repo.reclaim_expired_leases``) whatever the broker does with the unacknowledged
message.  If a renewal finds the lease gone (the sweeper reclaimed it while this worker
was stalled, e.g. a database outage longer than the lease), :attr:`LeaseKeeper.lost` is
set and the worker's store is refused anyway (fencing in ``repo.store_analysis_result``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from types import TracebackType

from node.db import repo
from node.db.base import Database

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renew one analysis lease in a daemon thread for the duration of a ``with`` block."""

    def __init__(self, db: Database, study_version_id: int, owner: str, lease_s: float, renew_s: float) -> None:
        self.db = db
        self.study_version_id = study_version_id
        self.owner = owner
        self.lease_s = lease_s
        self.renew_s = renew_s
        self.lost = threading.Event()
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{study_version_id}", daemon=True
        )

    def _run(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                with self.db.session() as s:
                    held = repo.renew_lease(
                        s, self.study_version_id, self.owner, dt.datetime.now(dt.UTC), self.lease_s
                    )
            except Exception:
                log.warning("could not renew the lease of study version %s; retrying in %.0f s",
                            self.study_version_id, self.renew_s, exc_info=True)  # fmt: skip
                continue
            if not held:
                if self._stop.is_set():  # the job stored or failed meanwhile: nothing lost
                    return
                log.warning("lost the lease of study version %s (reclaimed); its result will be discarded",
                            self.study_version_id)  # fmt: skip
                self.lost.set()
                return
            self.renewals += 1

    def stop(self) -> None:
        """Stop renewing (the job has recorded its outcome and released the lease)."""
        self._stop.set()

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.renew_s))
