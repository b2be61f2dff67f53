"""What the Celery tasks do: analyse one study version; send one export.

Both jobs are idempotent and keyed by database rows, so a redelivered message (late
acknowledgement after a killed worker) finishes the work once:

* :func:`run_analysis` claims the study version under a renewed lease (a version
  already analysed, or held by a live worker, is skipped), runs :func:`pipelines.analysis.analyse_study` on the spooled instances,
  writes the SR atomically under the reports directory (its UIDs are deterministic, so a
  re-run writes the identical object), stores findings + lesions + report and the
  exports due in one transaction (only while it still holds the lease: fencing), then
  rings the export queue.
* :func:`run_export` sends one SR to one destination through the outbox, which records
  every attempt; a failed attempt schedules the next one with exponential backoff until
  the configured bound, then the export ends ``failed`` with the peer's status.

Every failure ends in a recorded state with a reason (``analyses.reason_code``), never a
silent drop.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING

from pydicom.uid import UID

from node.db import repo
from node.lease import LeaseKeeper
from node.logging import log_context
from node.storage import write_file_atomic
from pipelines.analysis import analyse_study
from pipelines.errors import LocusError, TransientError

if TYPE_CHECKING:
    from node.tasks.context import WorkerContext

log = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = UID("1.2.840.10008.5.1.4.1.1.88.34")


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC (the database stores UTC)."""
    return dt.datetime.now(dt.UTC)


def _dataset_bytes(ds: object) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


def export_destinations(ctx: WorkerContext) -> list[str]:
    """Destination names a new report is queued for (configured ones + return to sender)."""
    from node.export.outbox import destinations_for_report

    return destinations_for_report(ctx.settings)


def run_analysis(ctx: WorkerContext, study_version_id: int) -> str:
    """Analyse one study version; returns 'analysed', 'failed', 'skipped' or 'lost'.

    The claim gives this worker a lease that a :class:`~node.lease.LeaseKeeper` renews
    while the job runs; every path after the claim ends in a recorded state: stored
    (``analysed``), ``failed`` with the reason (any exception, including writing the SR,
    storing and creating the exports), or handed back (a transient error: ``queued``
    again, or ``failed`` once ``analysis.max_attempts`` claims are spent).  If this
    process dies instead, the lease expires and the sweeper reclaims the version.
    """
    cfg = ctx.settings.analysis
    owner = repo.new_lease_owner()
    with ctx.db.session() as s:
        if not repo.claim_analysis(s, study_version_id, utcnow(), owner=owner, lease_s=cfg.lease_s):
            log.info("study version %s already handled or held by another worker; nothing to do", study_version_id)
            return "skipped"
        version = repo.get_version(s, study_version_id)
        instances = repo.instances_for_version(s, study_version_id)
        previous = repo.previous_report(s, version.study_uid, version.version)

    with (
        log_context(study_uid=version.study_uid, version=version.version),
        LeaseKeeper(ctx.db, study_version_id, owner, cfg.lease_s, cfg.lease_renew_s) as lease,
    ):
        try:
            return _analyse_claimed(ctx, version, instances, previous, owner, lease)
        except repo.LeaseLost as exc:
            log.warning("result discarded: %s", exc)
            return "lost"
        except TransientError as exc:
            lease.stop()
            with ctx.db.session() as s:
                requeued = repo.release_analysis(s, study_version_id, owner, exc.code, exc.reason, utcnow(),
                                                 max_attempts=cfg.max_attempts)  # fmt: skip
            if requeued is False:
                log.warning("analysis failed: attempts exhausted after a transient error (%s)", exc.code)
                return "failed"
            raise  # the task retries with a backoff; the version waits `queued`
        except LocusError as exc:
            log.warning("analysis refused (%s): %s", exc.code, exc.reason)
            return _record_failure(ctx, study_version_id, owner, lease, exc.code, exc.reason)
        except Exception as exc:  # a defect of ours, or the disk/database: recorded, not retried forever
            log.exception("analysis crashed")
            return _record_failure(ctx, study_version_id, owner, lease, "internal_error",
                                   f"{type(exc).__name__}: {exc}")  # fmt: skip


def _record_failure(
    ctx: WorkerContext, study_version_id: int, owner: str, lease: LeaseKeeper, code: str, reason: str
) -> str:
    """Fail the version if this worker still holds it.  If even that cannot be recorded
    (database down), the lease is left to expire and the sweeper reclaims the version."""
    lease.stop()
    with ctx.db.session() as s:
        if repo.fail_analysis(s, study_version_id, code, reason, utcnow(), lease_owner=owner):
            return "failed"
    log.warning("failure not recorded: the lease of study version %s is no longer ours", study_version_id)
    return "lost"


def _analyse_claimed(
    ctx: WorkerContext,
    version: repo.VersionInfo,
    instances: list[repo.VersionInstance],
    previous: repo.ReportRow | None,
    owner: str,
    lease: LeaseKeeper,
) -> str:
    """The analysis proper, under the caller's lease; raises on any failure."""
    study_version_id = version.id
    predecessor = None
    if previous is not None:
        predecessor = (COMPREHENSIVE_3D_SR, previous.sr_sop_uid, previous.series_uid, version.study_uid)
    paths = [ctx.spool.path(i.path) for i in instances]
    # Models load inside the caller's try: a missing or mismatched checkpoint fails the version
    # with the model's reason (ModelError code) instead of leaving it "analysing".
    from node.analysis_options import build_analysis_options

    options = build_analysis_options(
        ctx,
        study_version=version.version,
        predecessor=predecessor,
        # Pinned to the version's completion time so a re-run re-creates the same bytes.
        content_datetime=version.ready_at.replace(tzinfo=None),
    )
    result = analyse_study(paths, options)
    # A worker that lost its lease writes nothing (best effort here; the store itself is fenced).
    with ctx.db.session(readonly=True) as s:
        held = not lease.lost.is_set() and repo.holds_lease(s, study_version_id, owner)
    if not held:
        raise repo.LeaseLost(f"study version {study_version_id}: lease reclaimed during the analysis")

    report = None
    if result.sr_dataset is not None:
        sr = result.sr_dataset
        rel = f"{version.study_uid}/{sr.SOPInstanceUID}.dcm"
        # Deterministic UIDs and bytes: a reclaimed attempt rewrites the identical file.
        write_file_atomic(ctx.settings.storage.reports_dir / rel, _dataset_bytes(sr))
        report = {
            "sr_sop_uid": str(sr.SOPInstanceUID),
            "series_uid": str(sr.SeriesInstanceUID),
            "path": rel,
            "predecessor": previous.sr_sop_uid if previous is not None else None,
        }
    payload = result.to_json()
    encoding = result.study_encoding
    if encoding is not None and payload.get("study_encoding"):
        # The vector lives in study_embeddings (float32); the result JSON keeps its identity only.
        payload["study_encoding"].pop("embedding", None)
        payload["study_encoding"]["embedding_dim"] = len(encoding.embedding)
    export_ids: list[int] = []
    with ctx.db.session() as s:
        # Fenced: raises LeaseLost (nothing stored) unless this worker still holds the lease.
        stored = repo.store_analysis_result(
            s, study_version_id, payload, payload["lesions"], report, utcnow(), timings=result.timings_s,
            lease_owner=owner,
        )  # fmt: skip
        if encoding is not None:  # same transaction as the findings: all or nothing
            repo.store_embedding(s, study_version_id, model_id=encoding.model.model_id,
                                 vector=encoding.embedding,
                                 preprocessing_version=encoding.preprocessing_version, now=utcnow())  # fmt: skip
        if stored.report_id is not None:
            for dest in export_destinations(ctx):
                export_ids.append(repo.create_export(s, stored.report_id, dest, now=utcnow()))
    lease.stop()
    log.info("analysed: %d lesions, report %s, %d exports", len(result.lesions),
             report["sr_sop_uid"] if report else None, len(export_ids))  # fmt: skip
    try:
        _ring_exports(export_ids)
    except Exception:
        log.warning("could not ring the export queue; the next sweep will", exc_info=True)
    return "analysed"


def _ring_exports(export_ids: list[int]) -> None:
    """Ask the io queue for an outbox pass now (the sweeper rings it periodically too)."""
    if export_ids:
        from node.tasks.tasks import export_pass

        export_pass.apply_async()


def run_export_pass(ctx: WorkerContext) -> tuple[int, float | None]:
    """Send every due export once; returns (exports tried, seconds until the next retry is due)."""
    from node.export.outbox import process_due_exports_from_settings

    outcomes = process_due_exports_from_settings(ctx.settings, ctx.db)
    retry_times = [o.next_attempt_at for o in outcomes if o.next_attempt_at is not None]
    wait = None
    if retry_times:
        wait = max(0.0, (min(retry_times) - utcnow()).total_seconds())
    return len(outcomes), wait
