"""A test-only pause point inside the real analysis task. Inert in production.

The "worker killed mid-analysis" test (tests/integration/test_worker_kill.py) needs a
worker that has *claimed* a study version and is inside the task, so it can be killed
with SIGKILL at exactly that point, with no fake analysis. When the environment variable
:data:`PAUSE_AFTER_CLAIM_ENV` names a directory, :func:`pause_after_claim` writes a
marker file there (``claimed-<version id>-<pid>``) and then waits until a file named
``release`` appears in that directory (or :data:`MAX_PAUSE_S` passes). When the variable
is unset, which is the case for every deployed worker, the function returns at once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

PAUSE_AFTER_CLAIM_ENV = "LOCUS_TEST_PAUSE_AFTER_CLAIM"
MAX_PAUSE_S = 600.0


def pause_after_claim(study_version_id: int) -> None:
    """Block after the claim while the test hook is set (see the module docstring)."""
    directory = os.environ.get(PAUSE_AFTER_CLAIM_ENV)
    if not directory:
        return
    folder = Path(directory)
    marker = folder / f"claimed-{study_version_id}-{os.getpid()}"
    marker.write_text(f"{study_version_id}\n")
    log.warning(
        "TEST HOOK %s is set: pausing after claiming study version %s (pid %d)",
        PAUSE_AFTER_CLAIM_ENV, study_version_id, os.getpid(),
    )
    deadline = time.monotonic() + MAX_PAUSE_S
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
