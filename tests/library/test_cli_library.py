"""``locus library check`` / ``show`` / ``report`` through click."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from library.anatomy import load_library
from node.cli_library import library


def test_check_ok() -> None:
    res = CliRunner().invoke(library, ["check"])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output and "387 final strings" in res.output


def test_check_broken_exits_1(library_copy: Path) -> None:
    path = library_copy / "sites" / "outside.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["sites"][0]["laterality"] = "left"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = CliRunner().invoke(library, ["check", "--path", str(library_copy), "--json"])
    assert res.exit_code == 1
    out = json.loads(res.output)
    assert out["ok"] is False
    assert out["problems"] == [{
        "where": "sites/outside.yaml: sites[0] 'outside_body'",
        "message": "laterality is left but the name 'Outside the body' does not say 'left'",
    }]


def test_show_summary_and_site() -> None:
    runner = CliRunner()
    res = runner.invoke(library, ["show", "--json"])
    assert res.exit_code == 0
    summary = json.loads(res.output)
    assert summary["counts"]["sites"] == len(load_library().sites)
    assert summary["content_hash"] == load_library().content_hash

    res = runner.invoke(library, ["show", "Liver S7"])  # by HCL-AL final string
    assert res.exit_code == 0 and "liver_s7" in res.output and "277961009" in res.output

    res = runner.invoke(library, ["show", "rib_left_12", "--json"])
    data = json.loads(res.output)
    assert data["finding_site"]["laterality"]["meaning"] == "Left"
    assert data["path"] == ["thoracic_cage", "ribs_left"] and data["hclal_finals"] == ["Rib L12"]

    res = runner.invoke(library, ["show", "liver_s77"])
    assert res.exit_code != 0 and "did you mean" in res.output


def test_report_command_writes_file(tmp_path: Path) -> None:
    out = tmp_path / "approx.md"
    res = CliRunner().invoke(library, ["report", "--output", str(out)])
    assert res.exit_code == 0
    assert "vertebra_l6" in out.read_text()
