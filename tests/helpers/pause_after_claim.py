"""A pause point inside the real analysis job, injected by tests only (never shipped).

The "worker killed mid-analysis" tests need a worker that has *claimed* a study version
and is inside the job, so it can be killed with SIGKILL at exactly that point, with no
fake analysis. :func:`install` wraps ``node.jobs._analyse_claimed`` (the step right after
the claim, inside the lease heartbeat) so that, when the environment variable
:data:`PAUSE_AFTER_CLAIM_ENV` names a directory, it writes a marker file there
(``claimed-<version id>-<pid>``) and waits until a file named ``release`` appears (or
:data:`MAX_PAUSE_S` passes) before analysing. In-process tests call :func:`install` with
pytest's ``monkeypatch``; a ``locus worker`` subprocess is started through
``python -m tests.helpers.paused_worker``, which installs it before Celery starts.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)

PAUSE_AFTER_CLAIM_ENV = "LOCUS_TEST_PAUSE_AFTER_CLAIM"
MAX_PAUSE_S = 600.0


def pause_after_claim(study_version_id: int) -> None:
    """Block after the claim while :data:`PAUSE_AFTER_CLAIM_ENV` is set (see the module docstring)."""
    directory = os.environ.get(PAUSE_AFTER_CLAIM_ENV)
    if not directory:
        return
    folder = Path(directory)
    (folder / f"claimed-{study_version_id}-{os.getpid()}").write_text(f"{study_version_id}\n")
    log.warning("test pause: study version %s claimed by pid %d; waiting for %s/release",
                study_version_id, os.getpid(), folder)
    deadline = time.monotonic() + MAX_PAUSE_S
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _paused(analyse_claimed: Any) -> Any:
    @functools.wraps(analyse_claimed)
    def wrapper(ctx: Any, version: Any, *args: Any, **kwargs: Any) -> Any:
        pause_after_claim(int(version.id))
        return analyse_claimed(ctx, version, *args, **kwargs)

    return wrapper


def install(monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Wrap the job's post-claim step with the pause (undone by ``monkeypatch`` when given)."""
    from node import jobs

    if monkeypatch is not None:
        monkeypatch.setattr(jobs, "_analyse_claimed", _paused(jobs._analyse_claimed))
    else:  # a worker process started for one test: nothing to undo
        jobs._analyse_claimed = _paused(jobs._analyse_claimed)
