"""The shipped anatomy library validates and covers the scope the localizer needs."""

from __future__ import annotations

import re

import pytest

from library.anatomy import LATERALITY_CODES, Laterality, load_library
from library.check import check_library
from library.errors import LibraryError


@pytest.fixture(scope="module")
def lib():
    return load_library()


def test_validator_passes_on_shipped_library() -> None:
    report = check_library()
    assert report.ok, "\n".join(str(p) for p in report.problems)
    assert report.stats["sites"] >= 400
    assert report.hclal_stats == {"regions": 8, "coarse": 124, "finals": 387}


def test_scope(lib) -> None:
    ids = set(lib.nodes)
    assert len(lib.sites) >= 400
    for seg, n in (("c", 7), ("t", 12), ("l", 6)):
        for i in range(1, n + 1):
            assert f"vertebra_{seg}{i}" in ids
    # C1-L5 carry the exact CID 7603 vertebra code; L6 is a private, approximate variant
    assert lib.site("vertebra_l5").code.cid == 7603 and not lib.site("vertebra_l5").approximate
    l6 = lib.site("vertebra_l6")
    assert l6.approximate and any(m.private for m in l6.modifiers)
    for side in ("left", "right"):
        for i in range(1, 13):
            rib = lib.site(f"rib_{side}_{i}")
            assert rib.laterality is Laterality(side)
    for i in range(1, 9):
        assert lib.site(f"liver_s{i}").code.cid == 7170
    stations = {s.name for s in lib.children("mediastinal_lymph_nodes")}
    for st in ("1R", "1L", "2R", "2L", "3A", "3P", "4R", "4L", "5", "6", "7", "8", "9", "10R", "11L"):
        assert any(f"(station {st})" in n for n in stations), st
    assert len(lib.sites_under("lung_left")) >= 8 and len(lib.sites_under("lung_right")) >= 10
    assert {r.id for r in lib.regions} >= {"head", "neck", "chest", "abdomen", "pelvis", "spine", "upper_limb",
                                          "lower_limb", "outside"}
    assert lib.site("outside_body").level == "site"


def test_every_site_is_complete(lib) -> None:
    for s in lib.sites:
        assert s.code.scheme in ("SCT", "DCM", "99LOCUS") and s.code.value
        assert s.code.private or s.code.cid is not None
        assert s.description.startswith(("in ", "at ", "on ", "along ", "beneath ", "between ", "beyond ",
                                         "free ", "outside "))
        if s.approximate:
            assert s.approximation


def test_hierarchy_queries(lib) -> None:
    s7 = lib.site("liver_s7")
    assert [p.id for p in lib.parents("liver_s7")] == ["liver", "abdomen"]
    assert lib.region_of("liver_s7").id == "abdomen"
    assert s7 in lib.children("liver")
    assert all(c.level == "coarse" for c in lib.children("abdomen"))
    assert lib.by_description(s7.description) is s7
    with pytest.raises(LibraryError) as exc:
        lib.site("liver_s9")
    assert exc.value.code == "unknown_site"


def test_to_assignment_shape(lib) -> None:
    coding = lib.site("thyroid_lobe_left").to_assignment()
    assert coding.laterality == LATERALITY_CODES[Laterality.LEFT]
    assert coding.as_dict() == {
        "site_id": "thyroid_lobe_left",
        "name": "Left lobe of thyroid",
        "code": {"value": "79163004", "scheme": "SCT", "meaning": "Left lobe of thyroid"},
        "laterality": {"value": "7771000", "scheme": "SCT", "meaning": "Left"},
        "modifiers": [],
        "approximate": False,
    }
    t5 = lib.hclal_site("Spinous process of vertebra T5").to_assignment()
    assert [m.value for m in t5.modifiers] == ["56401006"]  # the vertebral level as modifier


def test_crosswalk_maps_every_hclal_final_with_consistent_side(lib) -> None:
    assert lib.hclal is not None
    assert len(lib.hclal.entries) == 387 and len(lib.hclal.coarse_nodes) == 124
    for e in lib.hclal.entries:
        site = lib.hclal_site(e.final)
        m = re.match(r"Rib ([LR])(\d+)$", e.final)
        if m:
            assert site.id == f"rib_{'left' if m.group(1) == 'L' else 'right'}_{m.group(2)}"
    assert lib.hclal_site("Mediastinum 4R").laterality is Laterality.RIGHT
    assert lib.hclal_coarse_node("Vertebra T5").id == "vertebral_level_t5"
    assert lib.hclal_coarse_node("Rib L3").id == "rib_left_3"


def test_load_is_cached_and_hash_is_hex(lib) -> None:
    assert load_library() is lib
    assert re.fullmatch(r"[0-9a-f]{64}", lib.content_hash)
