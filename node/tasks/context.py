"""Per-process worker context: settings, database, spool and lazily loaded models.

Models are cached per process.  A worker loads the configured ones when it starts, not on
its first task: Celery's ``worker_process_init`` (prefork children) must return within
seconds, far too short for a checkpoint, so it starts :func:`node.models.start_preload`
in a thread, and a task arriving meanwhile waits on the cache's lock.  ``locus serve``
(in-process worker) and ``locus worker`` with the solo pool start the same preload.  The
context is built once per process from the environment (``LOCUS_*``), or installed
explicitly by ``locus serve`` for its in-process worker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from celery.signals import worker_process_init

from node.db import open_database
from node.db.base import Database
from node.settings import LocusSettings
from node.storage import LocalSpool


@dataclass
class WorkerContext:
    """What a worker process shares between tasks: settings, database, spool and model cache."""
    settings: LocusSettings
    db: Database
    spool: LocalSpool
    _models: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def model(self, key: str, loader: Any) -> Any:
        """Return the cached model for ``key``, loading it once with ``loader()``."""
        with self._lock:
            if key not in self._models:
                self._models[key] = loader()
            return self._models[key]


_context: WorkerContext | None = None
_context_lock = threading.Lock()


def build_context(settings: LocusSettings) -> WorkerContext:
    """The worker context for ``settings``, creating the data directories."""
    settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    return WorkerContext(
        settings=settings,
        db=open_database(settings.database),
        spool=LocalSpool.from_settings(settings.storage),
    )


def install_context(ctx: WorkerContext) -> None:
    """Use ``ctx`` for this process's tasks (an in-process worker shares the node's context)."""
    global _context
    with _context_lock:
        _context = ctx


def get_context() -> WorkerContext:
    """This process's worker context, built from the environment's settings on first use."""
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(LocusSettings.load())
        return _context


@worker_process_init.connect
def _preload_in_child(**_: Any) -> None:
    """Prefork child started: load the configured models in the background (see module docstring)."""
    from node.models import start_preload

    start_preload(get_context())
