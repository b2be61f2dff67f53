"""``locus serve``: the listener, the completion sweeper, the export doorbell, and
(for single-machine use) an in-process Celery worker, in one process.

Threads:

* the pynetdicom SCP (one thread per association) only stores and indexes;
* the **sweeper** runs the completion rules every ``sweep_interval_s``, enqueues every
  study version that became ready (exactly once: the version row is created under a
  unique constraint, and ``pending`` versions left by a crash are found again),
  reclaims analyses whose lease expired (a dead worker) and enqueues them again, and
  rings the export queue for exports that are due (the safety net behind the
  per-export countdown messages);
* the **worker** (unless disabled) consumes the ``gpu`` and ``io`` queues with a
  thread pool; a separate ``locus worker --queues gpu`` process can take the analyses
  instead, reading the same spool path.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from node import completion
from node.db import repo
from node.jobs import utcnow
from node.listener.server import ListenerServer, start_listener
from node.settings import LocusSettings
from node.tasks.celery_app import ANALYSE_TASK, EXPORT_TASK, GPU_QUEUE, IO_QUEUE, configure_app
from node.tasks.context import WorkerContext, build_context, install_context

log = logging.getLogger(__name__)


def prepare(settings: LocusSettings) -> WorkerContext:
    """Create directories, migrate the embedded database, install the worker context."""
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    settings.storage.reports_dir.mkdir(parents=True, exist_ok=True)
    ctx = build_context(settings)  # migrates the embedded SQLite database automatically
    removed = ctx.spool.sweep_partials()
    if removed:
        log.warning("removed %d partial spool files left by an interrupted write", removed)
    install_context(ctx)
    configure_app(settings.broker)
    return ctx


def sweep_once(ctx: WorkerContext, *, ring_exports: bool = True) -> list[int]:
    """One completion sweep (+ an export doorbell); returns the versions enqueued."""
    from node.tasks.celery_app import app

    now = utcnow()
    with ctx.db.session() as s:
        completion.sweep(s, now, ctx.settings.completion)
    with ctx.db.session() as s:
        to_queue = repo.versions_to_enqueue(s)
    for vid in to_queue:
        app.send_task(ANALYSE_TASK, args=(vid,), queue=GPU_QUEUE)
    if to_queue:
        with ctx.db.session() as s:
            repo.mark_queued(s, to_queue, utcnow())
    requeue_stale(ctx, now)
    reclaim_expired(ctx, utcnow())
    if ring_exports:
        app.send_task(EXPORT_TASK, queue=IO_QUEUE)
    return to_queue


def requeue_stale(ctx: WorkerContext, now: datetime.datetime) -> list[int]:
    """Enqueue again the versions queued longer than ``completion.requeue_stale_s``.

    The database is the source of truth and the broker only the doorbell: a message
    lost with the broker's data would leave a version ``queued`` forever. A second
    message for a version that is in fact still queued in the broker is harmless: the
    first delivery claims it, later ones find it analysed and skip it.
    """
    from node.tasks.celery_app import app

    bound = now - datetime.timedelta(seconds=ctx.settings.completion.requeue_stale_s)
    with ctx.db.session(readonly=True) as s:
        stale = repo.stale_queued_versions(s, bound)
    if not stale:
        return []
    for vid in stale:
        app.send_task(ANALYSE_TASK, args=(vid,), queue=GPU_QUEUE)
    with ctx.db.session() as s:
        repo.mark_requeued_stale(s, stale, bound, now)
    log.warning("re-enqueued %d study version(s) queued for over %.0f s: %s",
                len(stale), ctx.settings.completion.requeue_stale_s, stale)
    return stale


def reclaim_expired(ctx: WorkerContext, now: datetime.datetime) -> list[int]:
    """Take back the analyses whose lease expired (their worker died) and enqueue them again.

    This, not the broker, guarantees that a claimed analysis ends: kombu's SQLAlchemy
    transport never returns a message fetched by a killed worker, Redis returns it only
    after ``broker.visibility_timeout_s``. Each reclaim is audited ``lease_expired``; after
    ``analysis.max_attempts`` claims the version fails with ``attempts_exhausted``.
    Returns the versions enqueued again.
    """
    from node.tasks.celery_app import app

    with ctx.db.session() as s:
        reclaimed = repo.reclaim_expired_leases(s, now, max_attempts=ctx.settings.analysis.max_attempts)
    requeued = [r.study_version_id for r in reclaimed if r.requeued]
    for r in reclaimed:
        log.warning("analysis lease expired: study_uid=%s version=%d attempt=%d -> %s", r.study_uid, r.version,
                    r.attempts, "queued again" if r.requeued else "failed (attempts exhausted)")  # fmt: skip
    for vid in requeued:
        app.send_task(ANALYSE_TASK, args=(vid,), queue=GPU_QUEUE)
    return requeued


@dataclass
class RunningNode:
    """A node started in this process (listener plus optional workers), so it can be stopped as one."""
    ctx: WorkerContext
    listener: ListenerServer
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    worker: Any = None

    def stop(self) -> None:
        """Stop the listener first (no new instances), then the workers."""
        self.stop_event.set()
        self.listener.shutdown()
        if self.worker is not None:
            try:
                self.worker.stop(in_sighandler=False)
            except Exception:
                log.debug("worker stop raised", exc_info=True)
        for t in self.threads:
            t.join(timeout=10)


#: While the sweep keeps failing with the same error, how often to say so (seconds).
SWEEP_REPEAT_REPORT_S = 60.0


def _sweeper(node: RunningNode) -> None:
    interval = node.ctx.settings.completion.sweep_interval_s
    export_every = max(5.0, interval)  # the outbox pass is the safety net behind per-report doorbells
    last_ring = 0.0
    failing: tuple[str, str] | None = None  # the error being repeated, logged with its traceback once
    repeats, last_report = 0, 0.0
    while not node.stop_event.wait(interval):
        try:
            ring = time.monotonic() - last_ring >= export_every
            sweep_once(node.ctx, ring_exports=ring)
            if ring:
                last_ring = time.monotonic()
            if failing is not None:
                log.warning("sweep works again after %d failed attempts (%s)", repeats + 1, failing[0])
                failing, repeats = None, 0
        except Exception as exc:
            key = (type(exc).__name__, str(exc)[:300])
            if key != failing:  # a new error: its traceback, once
                log.exception("sweep failed; retrying every %.1fs", interval)
                failing, repeats, last_report = key, 0, time.monotonic()
            else:  # the same error again: one line a minute, not a traceback a second
                repeats += 1
                if time.monotonic() - last_report >= SWEEP_REPEAT_REPORT_S:
                    log.error("sweep still failing (%d more times): %s: %s", repeats, *key)
                    last_report = time.monotonic()


def start_worker_thread(queues: list[str], concurrency: int = 1) -> tuple[Any, threading.Thread]:
    """A Celery worker consuming ``queues`` inside this process (thread pool)."""
    from node.tasks.celery_app import app

    worker = app.WorkController(
        concurrency=concurrency,
        pool_cls="threads",
        queues=queues,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel=logging.getLevelName(logging.getLogger().level),
        hostname=f"locus-inprocess@{int(time.time())}",
    )
    thread = threading.Thread(target=worker.start, name="celery-worker", daemon=True)
    thread.start()
    return worker, thread


def start_node(settings: LocusSettings, *, analysis_worker: bool = True, io_worker: bool = True) -> RunningNode:
    """Start listener and workers in one process (``locus serve``, demo and tests)."""
    ctx = prepare(settings)
    listener = start_listener(settings, ctx.db, ctx.spool)
    node = RunningNode(ctx=ctx, listener=listener)
    queues = ([GPU_QUEUE] if analysis_worker else []) + ([IO_QUEUE] if io_worker else [])
    if analysis_worker:  # models load now, in the background, not on the first study
        from node.models import start_preload

        start_preload(ctx)
    if queues:
        node.worker, wthread = start_worker_thread(queues, concurrency=1 + int(io_worker and analysis_worker))
        node.threads.append(wthread)
    sweeper = threading.Thread(target=_sweeper, args=(node,), name="completion-sweeper", daemon=True)
    sweeper.start()
    node.threads.append(sweeper)
    log.info("Locus node %s listening on %s:%d (queues: %s)", settings.dicom.ae_title, listener.host,
             listener.port, ",".join(queues) or "none")
    return node
