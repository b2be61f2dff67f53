"""The README's command table is run, not just read: every command it lists exists, and the
examples that need no network or database run as written (placeholders filled with files)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from node.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def readme_commands() -> list[str]:
    """The ``locus ...`` usages of the README's command table, as written (markdown escapes removed)."""
    rows = re.findall(r"^\| `(locus [^`]+)` \|", README.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return [r.replace("\\|", "|") for r in rows]


def without_optional(usage: str) -> str:
    """Drop ``[...]`` parts (nested brackets included): the minimal form of a usage."""
    while True:
        stripped = re.sub(r"\s*\[[^\[\]]*\]", "", usage)
        if stripped == usage:
            return usage.strip()
        usage = stripped


def command_paths(usage: str) -> list[list[str]]:
    """The subcommand paths a usage names (``results studies|lesions|show`` is three)."""
    words: list[str] = []
    for token in without_optional(usage).split()[1:]:
        if token.startswith("-") or token.isupper() or "." in token or token.endswith("..."):
            break
        words.append(token)
    paths: list[list[str]] = [[]]
    for w in words:
        paths = [[*p, alt] for p in paths for alt in w.split("|")]
    return paths


def test_readme_lists_commands() -> None:
    usages = readme_commands()
    assert any(u.startswith("locus localize --ct CT --suv SUV --mask MASK") for u in usages), usages
    assert len(usages) >= 15


@pytest.mark.parametrize("usage", readme_commands())
def test_every_readme_command_exists(usage: str) -> None:
    for path in command_paths(usage):
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, f"{usage}: `locus {' '.join(path)} --help` -> {result.output}"


@pytest.fixture
def ct_suv_mask(tmp_path: Path) -> dict[str, Path]:
    """A small CT (HU), SUV and two-lesion label image on one 4 mm grid."""
    import SimpleITK as sitk

    shape = (40, 48, 48)  # z, y, x
    zz, yy, xx = np.indices(shape)
    ct = np.full(shape, -50.0, np.float32)
    suv = np.full(shape, 1.0, np.float32)
    mask = np.zeros(shape, np.int16)
    for label, (z, y, x) in enumerate(((12, 20, 18), (28, 26, 30)), start=1):
        ball = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= 9
        mask[ball] = label
        suv[ball] = 6.0 + label
        ct[ball] = 40.0
    paths = {}
    for name, arr in (("CT", ct), ("SUV", suv), ("MASK", mask)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((4.0, 4.0, 4.0))
        img.SetOrigin((-96.0, -96.0, -700.0))
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    return paths


def test_readme_localize_example_runs_with_the_shipped_localizer(ct_suv_mask: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from node.cli_demo import demo_localizer_dir

    assert demo_localizer_dir() is not None, "node/demo_localizer is part of the repository"
    monkeypatch.setenv("LOCUS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LOCUS_MODELS__LOCALIZER_CHECKPOINT", raising=False)
    monkeypatch.delenv("LOCUS_CONFIG", raising=False)
    (usage,) = [u for u in readme_commands() if u.startswith("locus localize")]
    argv = [str(ct_suv_mask.get(tok, tok)) for tok in without_optional(usage).split()[1:]]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert "localizer: demo weights in" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 2 and all(r["pred"] for r in rows)


def test_localize_needs_all_four_files_or_none(ct_suv_mask: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["localize", "--ct", str(ct_suv_mask["CT"]), "--suv", str(ct_suv_mask["SUV"]),
                                       "--mask", str(ct_suv_mask["MASK"]), "--coarse", str(ct_suv_mask["CT"])])
    assert result.exit_code == 2
    assert "missing --fine, --vocabulary, --descriptions" in result.output


def test_readme_offline_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCUS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LOCUS_DATABASE__URL", raising=False)
    monkeypatch.delenv("LOCUS_CONFIG", raising=False)
    usages = {without_optional(u) for u in readme_commands()}
    for minimal in ("locus db upgrade", "locus library check|show"):
        assert minimal in usages, minimal
    for argv in (["db", "upgrade"], ["library", "check"], ["library", "show"]):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, f"locus {' '.join(argv)}: {result.output}"
