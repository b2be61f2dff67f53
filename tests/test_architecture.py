"""The dependency direction is the architecture (docs/design.md D1); this keeps it true.

library   -> nothing of ours (no torch, no DICOM I/O)
pipelines -> library (no Celery, SQLAlchemy, settings, network)
node      -> pipelines, library (never training)
training  -> pipelines, library (never node)
"""

from __future__ import annotations

import ast
import re
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


def _undocumented(path: Path, rel: str) -> list[str]:
    """Public classes, functions and methods of one module that have no docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    missing: list[str] = []

    def walk(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            decorators = {d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "") for d in node.decorator_list}
            if not isinstance(node, ast.ClassDef) and decorators & {"setter", "deleter", "overload"}:
                continue  # documented on the getter / the implementation
            if ast.get_docstring(node) is None:
                missing.append(f"{rel}:{node.lineno} {prefix}{node.name}")
            if isinstance(node, ast.ClassDef):
                walk(node.body, f"{prefix}{node.name}.")

    walk(tree.body, "")
    return missing


def _public_modules(package: str) -> list[Path]:
    return [p for p in sorted((ROOT / package).rglob("*.py"))
            if not any(part.startswith("_") and part != "__init__.py" for part in p.relative_to(ROOT).parts)
            and "migrations" not in p.parts]


@pytest.mark.parametrize("package", ["node", "pipelines"])
def test_public_api_has_docstrings(package: str) -> None:
    """Every public function, method and class of node/ and pipelines/ says why it exists (house style)."""
    missing = [m for p in _public_modules(package) for m in _undocumented(p, str(p.relative_to(ROOT)))]
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)


def test_docstring_check_sees_a_missing_docstring(tmp_path: Path) -> None:
    """The walker above finds undocumented public names and ignores private ones."""
    mod = tmp_path / "m.py"
    mod.write_text('def f():\n    pass\n\n\ndef _g():\n    pass\n\n\nclass C:\n    """Doc."""\n\n'
                   "    def m(self):\n        pass\n\n    def _p(self):\n        pass\n", encoding="utf-8")
    assert _undocumented(mod, "m.py") == ["m.py:1 f", "m.py:12 C.m"]


def test_production_code_carries_no_test_hooks() -> None:
    """Tests inject behaviour through fixtures and test-only launchers, never through shipped code."""
    offenders = [
        str(p.relative_to(ROOT))
        for package in ("node", "pipelines", "library", "training")
        for p in sorted((ROOT / package).rglob("*.py"))
        if "LOCUS_TEST_" in p.read_text(encoding="utf-8") or any(n.split(".")[0] == "tests" for n in _imports(p))
    ]
    assert offenders == []


NOTES_OUTSIDE_THE_REPOSITORY = re.compile(r"\b(peers|dicom-guide|style|[a-z0-9-]+-compat)\.md\b")


def test_code_cites_the_standard_or_papers_not_outside_notes() -> None:
    """Comments and docstrings cite PS3.x, the public papers or docs/ - never design notes outside the repository."""
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for package in ("node", "pipelines", "library", "training", "tests")
        for p in sorted((ROOT / package).rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if NOTES_OUTSIDE_THE_REPOSITORY.search(line) and p != Path(__file__).resolve()
    ]
    assert offenders == []
