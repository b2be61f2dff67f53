"""``python -m tests.helpers.paused_worker worker ...``: ``locus`` with the test pause installed.

The worker-kill test starts its first worker through this launcher instead of the
``locus`` script, so the pause after the claim (tests/helpers/pause_after_claim.py) is
in the worker process while no production module carries it.
"""

from __future__ import annotations

from tests.helpers import pause_after_claim

if __name__ == "__main__":
    pause_after_claim.install()
    from node.cli import main

    main(prog_name="locus")
