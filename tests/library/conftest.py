"""Fixtures for the anatomy library tests: a writable copy of the shipped library."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from library.anatomy import DATA_DIR


@pytest.fixture
def library_copy(tmp_path: Path) -> Path:
    """A copy of library/data that a test may break."""
    dest = tmp_path / "data"
    shutil.copytree(DATA_DIR, dest)
    return dest
