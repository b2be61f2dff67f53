"""Group commit for the C-STORE index: one writer thread, one transaction per batch.

Why: on the C-STORE path the durable steps are the file fsync, the directory fsync
and the index commit (a WAL fsync on SQLite with ``synchronous=FULL``, a WAL flush on
PostgreSQL). Done per instance and per association they serialise on the database's
single writer and cost one directory fsync and one commit each. Here the association
threads fsync their own files in parallel (the GIL is released during fsync), then
hand the record to one writer thread, which takes everything queued at that moment,
fsyncs each distinct spool directory once, indexes every record in one transaction
and commits once. Each association thread waits for *its own* record's commit before
it answers, so the contract of ``node.listener.handlers`` is unchanged:

    Success only after file fsync + link/rename + directory fsync + committed index row.

Failure handling (every waiting C-STORE gets an answer, nothing is half-indexed):

* a record refused by the repository (``InputError``, e.g. ``uid_conflict``) is rolled
  back to its own savepoint; the other records of the batch commit;
* any other failure (directory fsync, a database error, the commit itself) rolls the
  whole transaction back and fails every record of the batch with that exception;
* if the writer thread ends (``close``, or a defect), records still queued and any
  later ``record`` call fail with :class:`IndexWriterStopped` instead of waiting.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from node.db.base import Database
from node.db.ingest import BatchRecorder, InstanceRecord, KnownIds, RecordOutcome

LOGGER = logging.getLogger(__name__)

#: Study/series id pairs remembered after commit (a few hundred bytes each).
KNOWN_IDS_CAPACITY = 4096


class IndexWriterStopped(RuntimeError):
    """The writer is not running; the record was not indexed."""


class IndexWriterTimeout(RuntimeError):
    """The record's commit was not confirmed in time (the database may be locked)."""


class DirectorySyncError(OSError):
    """A spool directory could not be fsync-ed; the batch was not indexed."""


@dataclass(eq=False)
class _Job:
    record: InstanceRecord
    received_at: datetime
    relpath_to_sync: str | None
    done: threading.Event = field(default_factory=threading.Event)
    outcome: RecordOutcome | None = None
    error: BaseException | None = None


_STOP = object()


class IndexWriter:
    """The listener's single index writer (see the module docstring).

    ``sync_parent(relpath)`` makes a spool file's directory entry durable
    (``Spool.sync_parent``); it is called once per distinct directory per batch, before
    the commit. ``max_batch`` bounds one transaction. ``wait_timeout_s`` bounds how long
    an association thread waits for its commit (a database locked for longer becomes a
    failure status, not a hung association).
    """

    def __init__(
        self,
        db: Database,
        *,
        sync_parent: Callable[[str], None] | None = None,
        max_batch: int = 64,
        wait_timeout_s: float = 120.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.db = db
        self._sync_parent = sync_parent
        self.max_batch = max_batch
        self.wait_timeout_s = wait_timeout_s
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._known: OrderedDict[tuple[str, str], KnownIds] = OrderedDict()
        self._recorder = BatchRecorder(db)  # used by the writer thread only
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self.batches = 0  # committed transactions (observability and tests)
        self.records = 0  # records committed in them
        self._thread.start()

    # -- association threads -----------------------------------------------------------
    def record(
        self, record: InstanceRecord, received_at: datetime, *, relpath_to_sync: str | None = None
    ) -> RecordOutcome:
        """Index ``record`` and return once its transaction committed (or raise why not).

        ``relpath_to_sync``: the spool file whose directory entry must be made durable
        before the commit (written with ``put_atomic(..., sync_dir=False)``).
        """
        if self._stopped.is_set():
            raise IndexWriterStopped("the index writer is stopped")
        job = _Job(record, received_at, relpath_to_sync)
        self._queue.put(job)
        if self._stopped.is_set():
            self._fail_queued(IndexWriterStopped("the index writer stopped"))
        if not job.done.wait(self.wait_timeout_s):
            raise IndexWriterTimeout(f"index commit not confirmed within {self.wait_timeout_s:g} s")
        if job.error is not None:
            raise job.error
        assert job.outcome is not None
        return job.outcome

    def close(self, timeout: float = 30.0) -> None:
        """Finish the records already queued, then stop the thread."""
        if not self._stopped.is_set():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Records queued for the writer thread and not yet in a transaction (approximate)."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        """Whether the writer thread still takes records (the listener refuses stores when not)."""
        return self._thread.is_alive() and not self._stopped.is_set()

    # -- writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch: list[_Job] = [first]  # type: ignore[list-item]
                stop_after = False
                while len(batch) < self.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop_after = True
                        break
                    batch.append(item)  # type: ignore[arg-type]
                self._commit(batch)
                if stop_after:
                    return
        except BaseException as exc:  # a defect here must not leave associations waiting
            LOGGER.exception("index writer crashed")
            self._stopped.set()
            self._fail_queued(IndexWriterStopped(f"the index writer crashed: {type(exc).__name__}: {exc}"))
            raise
        finally:
            self._stopped.set()
            self._fail_queued(IndexWriterStopped("the index writer stopped"))
            self._recorder.close()

    def _fail_queued(self, error: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                item.error = error
                item.done.set()

    def _commit(self, batch: list[_Job]) -> None:
        """Directory fsyncs, then one transaction for the batch; every job ends done."""
        try:
            self._sync_directories(batch)
            # One transaction (node.db.ingest.BatchRecorder); each record in its own
            # savepoint, so a refused one (InputError) is undone alone.
            known = [self._known.get((j.record.study_uid, j.record.series_uid)) for j in batch]
            results = self._recorder.record_batch(
                [(j.record, j.received_at, k) for j, k in zip(batch, known, strict=True)]
            )
            for job, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    job.error = result  # this record only (e.g. uid_conflict); the others committed
                else:
                    job.outcome = result
            self._remember(batch)
            self.batches += 1
            self.records += sum(1 for job in batch if job.error is None)
        except BaseException as exc:
            # Rolled back as a whole: nothing of this batch is indexed.
            LOGGER.error(
                "index transaction of %d record(s) failed: %s: %s", len(batch), type(exc).__name__, exc
            )
            for job in batch:
                job.outcome = None
                job.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for job in batch:
                job.done.set()

    def _sync_directories(self, batch: list[_Job]) -> None:
        if self._sync_parent is None:
            return
        seen: set[str] = set()
        for job in batch:
            rel = job.relpath_to_sync
            if rel is None:
                continue
            directory = rel.rpartition("/")[0]
            if directory not in seen:
                seen.add(directory)
                try:
                    self._sync_parent(rel)
                except OSError as exc:
                    raise DirectorySyncError(exc.errno, f"fsync of spool directory {directory} failed: {exc}") from exc

    def _remember(self, batch: list[_Job]) -> None:
        """Cache committed study/series ids (never those of a rolled-back transaction)."""
        for job in batch:
            out = job.outcome
            if job.error is None and out is not None and out.study_id is not None and out.series_id is not None:
                key = (job.record.study_uid, job.record.series_uid)
                self._known[key] = KnownIds(out.study_id, out.series_id)
                self._known.move_to_end(key)
        while len(self._known) > KNOWN_IDS_CAPACITY:
            self._known.popitem(last=False)
