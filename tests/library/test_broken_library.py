"""A deliberately broken library fails the validator with precise, located messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from library.anatomy import load_library
from library.check import check_library
from library.errors import LibraryError


def _edit(path: Path, fn) -> None:
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def _site(doc: dict, site_id: str) -> dict:
    return next(s for s in doc["sites"] if s["id"] == site_id)


def _messages(root: Path) -> list[str]:
    report = check_library(root)
    assert not report.ok
    return [str(p) for p in report.problems]


def test_many_defects_reported_at_once(library_copy: Path) -> None:
    abdomen = library_copy / "sites" / "abdomen.yaml"

    def break_abdomen(doc: dict) -> None:
        _site(doc, "liver_s7")["code"]["value"] = "277961999"  # does not exist
        _site(doc, "liver_s6")["code"]["cid"] = 7603  # wrong context group
        _site(doc, "liver_s5")["code"]["meaning"] = "Segment five"  # wrong meaning
        _site(doc, "spleen")["descriptions"] = ["in the gallbladder"]  # duplicates the gallbladder
        _site(doc, "kidney_left")["laterality"] = "right"  # name says left
        _site(doc, "stomach")["modifiers"] = [{"scheme": "99LOCUS", "value": "X", "meaning": "Unflagged"}]
        _site(doc, "cecum")["approximate"] = True  # no reason given
        doc["sites"].append(dict(_site(doc, "appendix")))  # duplicate id

    _edit(abdomen, break_abdomen)
    msgs = _messages(library_copy)
    expected = [
        "sites/abdomen.yaml: sites[", "'liver_s7': code: code SCT 277961999 ('Couinaud hepatic segment VII') "
        "does not resolve in pydicom's code dictionaries",
    ]
    assert any(expected[0] in m and expected[1] in m for m in msgs), msgs
    assert any("'liver_s6': code: code SCT 277960005 ('Couinaud hepatic segment VI') is not a member of CID 7603" in m
               for m in msgs), msgs
    assert any("'liver_s5': code: code SCT 277959000 has meaning 'Couinaud hepatic segment V' in CID 7170, "
               "not 'Segment five'" in m for m in msgs), msgs
    assert any("'gallbladder': description 'in the gallbladder' duplicates one of 'spleen'" in m for m in msgs), msgs
    assert any("'kidney_left': laterality is right but the name 'Left kidney' does not say 'right'" in m for m in msgs)
    assert any("'kidney_left': laterality is right but the name 'Left kidney' says 'left'" in m for m in msgs)
    assert any("'stomach': modifiers[0]: 99LOCUS code 'X' must be flagged 'private: true'" in m for m in msgs), msgs
    assert any("'stomach': uses a private 99LOCUS code but is not marked 'approximate: true'" in m for m in msgs)
    assert any("'cecum': is approximate but gives no 'approximation' reason" in m for m in msgs), msgs
    assert any("duplicate id 'appendix' (first defined in sites/abdomen.yaml: sites[" in m for m in msgs), msgs
    # the loader refuses the same library
    with pytest.raises(LibraryError) as exc:
        load_library(library_copy)
    assert exc.value.code == "library_format"


def test_cycle_and_unreachable_nodes(library_copy: Path) -> None:
    spine = library_copy / "sites" / "spine.yaml"

    def break_spine(doc: dict) -> None:
        # two coarse nodes pointing at each other: a cycle that never reaches the region
        a, b = doc["coarse"][0], doc["coarse"][1]
        a["parent"], b["parent"] = b["id"], a["id"]
        _site(doc, "sacrum")["parent"] = "no_such_coarse"

    _edit(spine, break_spine)
    msgs = _messages(library_copy)
    assert any("'vertebral_level_c1': hierarchy cycle vertebral_level_c1 -> vertebral_level_c2 -> "
               "vertebral_level_c1" in m for m in msgs), msgs
    assert any("'vertebral_level_c1': a coarse must sit under a region, but parent 'vertebral_level_c2' is a coarse"
               in m for m in msgs), msgs
    assert any("'sacrum': parent 'no_such_coarse' does not exist" in m for m in msgs), msgs
    assert any("'sacrum': not reachable from any region (chain sacrum stops at missing 'no_such_coarse')" in m
               for m in msgs), msgs
    assert any("'vertebra_c1': hierarchy cycle" in m for m in msgs), msgs  # sites under the cycle too


def test_shape_errors_and_crosswalk(library_copy: Path) -> None:
    head = library_copy / "sites" / "head.yaml"

    def break_head(doc: dict) -> None:
        _site(doc, "skull")["laterality"] = "both"
        del _site(doc, "brain")["code"]["meaning"]
        _site(doc, "mandible")["code"]["private"] = True
        _site(doc, "maxilla")["descriptions"] = ["in " + "the maxilla " * 30]

    _edit(head, break_head)

    def break_crosswalk(doc: dict) -> None:
        doc["regions"][0]["coarse"][1]["fine"][0]["site"] = "liver"  # a coarse node, not a site
        doc["regions"][0]["coarse"][1]["fine"][1]["site"] = "mastoid_process_right"  # "Left mastoid process"

    _edit(library_copy / "hclal_crosswalk.yaml", break_crosswalk)
    msgs = _messages(library_copy)
    assert any("'skull': 'laterality' must be one of left/right/bilateral/none, got 'both'" in m for m in msgs), msgs
    assert any("'brain': code: 'meaning' must be a non-empty string" in m for m in msgs), msgs
    assert any("'mandible': code: 'private: true' is only allowed for 99LOCUS codes, not SCT" in m for m in msgs)
    assert any("'maxilla': description" in m and "more than 40 words" in m for m in msgs), msgs
    assert any("hclal_crosswalk.yaml: HCL-AL final 'Skull' maps to 'liver', a coarse, not a site" in m for m in msgs)
    assert any("HCL-AL final 'Left mastoid process' is left-sided but maps to 'mastoid_process_right'" in m
               for m in msgs), msgs


def test_missing_file_is_reported(library_copy: Path) -> None:
    (library_copy / "sites" / "neck.yaml").unlink()
    msgs = _messages(library_copy)
    assert len(msgs) == 1 and "anatomy library file missing" in msgs[0] and "neck.yaml" in msgs[0]
