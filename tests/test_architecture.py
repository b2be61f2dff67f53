"""The dependency direction is the architecture (style.md section 5); this keeps it true.

library   -> nothing of ours (no torch, no DICOM I/O)
pipelines -> library (no Celery, SQLAlchemy, settings, network)
node      -> pipelines, library (never training)
training  -> pipelines, library (never node)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN: dict[str, set[str]] = {
    "library": {"pipelines", "node", "training", "torch", "pydicom.filereader", "highdicom", "pynetdicom",
                "sqlalchemy", "celery"},
    "pipelines": {"node", "training", "celery", "sqlalchemy", "alembic", "pynetdicom", "kombu", "redis"},
    "node": {"training"},
    "training": {"node", "celery", "sqlalchemy", "pynetdicom"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violations(package: str) -> list[str]:
    bad: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            for forbidden in FORBIDDEN[package]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package: str) -> None:
    assert _violations(package) == []


def test_sqlalchemy_only_in_node_db() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "node").rglob("*.py")
        if "db" not in p.relative_to(ROOT).parts[:2]
        and any(n == "sqlalchemy" or n.startswith("sqlalchemy.") for n in _imports(p))
    ]
    assert offenders == []
