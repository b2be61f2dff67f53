"""Validators every written DICOM object goes through in tests (PS3.3 IOD rules checked by dciodvfy and highdicom)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import dciodvfy_path


def assert_dciodvfy_clean(path: Path | str) -> str:
    """Run dciodvfy; fail on any 'Error' line. Returns the (warning-only) output."""
    proc = subprocess.run([dciodvfy_path(), str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert not errors and proc.returncode == 0, f"dciodvfy reported errors for {path}:\n{out}"
    return out
