"""Per-process worker context: settings, database, spool and lazily loaded models.

Celery's ``worker_process_init`` must finish within seconds, far too short to load a
checkpoint, so models are loaded on first use and cached per process keyed by their
weights hash (style.md lesson 6). The context is built once per process from the
environment (``LOCUS_*``), or installed explicitly by ``locus serve`` for its
in-process worker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from node.db import open_database
from node.db.base import Database
from node.settings import LocusSettings
from node.storage import LocalSpool


@dataclass
class WorkerContext:
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
    settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    return WorkerContext(
        settings=settings,
        db=open_database(settings.database),
        spool=LocalSpool.from_settings(settings.storage),
    )


def install_context(ctx: WorkerContext) -> None:
    global _context
    with _context_lock:
        _context = ctx


def get_context() -> WorkerContext:
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(LocusSettings())
        return _context
