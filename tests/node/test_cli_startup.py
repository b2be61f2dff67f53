"""``locus --help`` and ``--version`` import no command module (timing: tests/benchmarks/bench_cli_startup.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from node.cli import LAZY_COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "pynetdicom", "sqlalchemy", "numpy", "pydicom", "node.cli_results", "node.db")


def _modules_after(args: list[str]) -> tuple[str, list[str]]:
    """Run ``locus ARGS`` in a fresh interpreter; return its stdout and the heavy modules it imported."""
    code = (
        "import sys, json\n"
        "from node.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=ROOT).stdout
    *text, last = out.strip().splitlines()
    return "\n".join(text), json.loads(last)


def test_root_help_lists_every_command_without_importing_them() -> None:
    text, loaded = _modules_after(["--help"])
    assert loaded == []
    for name in (*LAZY_COMMANDS, "serve", "worker", "analyse", "train"):
        assert f"  {name} " in text, name


def test_version_is_the_installed_distribution_and_imports_nothing() -> None:
    from importlib.metadata import version

    text, loaded = _modules_after(["--version"])
    assert text.strip() == f"locus {version('locus')}"
    assert loaded == []


def test_lazy_short_help_matches_each_commands_own() -> None:
    group = main
    ctx = group.make_context("locus", ["--help"], resilient_parsing=True)
    for name, (_target, text) in LAZY_COMMANDS.items():
        command = group.get_command(ctx, name)
        assert command is not None, name
        assert command.get_short_help_str(1000) == text, name


def test_lazy_command_runs_and_results_similar_is_attached() -> None:
    result = CliRunner().invoke(main, ["results", "--help"])
    assert result.exit_code == 0, result.output
    assert "similar" in result.output and "studies" in result.output


def test_unknown_command_is_refused() -> None:
    result = CliRunner().invoke(main, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output
