"""Celery tasks: thin adapters from a message (an identifier) to the job functions.

The real work lives in :mod:`node.jobs`; a task only resolves the per-process context,
calls the job, and turns a transient failure into a retry. Both tasks are idempotent:
the database decides whether there is anything left to do.
"""

from __future__ import annotations

import logging

from node.tasks.celery_app import ANALYSE_TASK, EXPORT_TASK, app
from node.tasks.context import get_context

log = logging.getLogger(__name__)


@app.task(name=ANALYSE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=5)
def analyse(self, study_version_id: int) -> str:
    """Celery task: analyse one study version; transient failures retry with back-off."""
    from node import jobs
    from pipelines.errors import TransientError

    ctx = get_context()
    try:
        return jobs.run_analysis(ctx, int(study_version_id))
    except TransientError as exc:
        delay = min(300, 10 * 2 ** self.request.retries)
        log.warning("analysis of version %s deferred %ss: %s", study_version_id, delay, exc)
        raise self.retry(exc=exc, countdown=delay) from exc


@app.task(name=EXPORT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def export_pass(self) -> int:
    """One outbox pass: every due export is claimed (with a lease), sent and recorded."""
    from node import jobs

    ctx = get_context()
    tried, retry_in = jobs.run_export_pass(ctx)
    if retry_in is not None:
        # The attempt and its next time are recorded in the database; this is the doorbell.
        self.apply_async(countdown=retry_in + 0.5)
    return tried
