"""The CLEAR lesion-location mapping: every library site maps or is explicitly unmapped; spot checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from library.anatomy import load_library
from library.clear_locations import CLEAR_LABELS, MAP_FILE, check_map, load_location_map
from library.errors import LibraryError


@pytest.fixture(scope="module")
def cmap():  # type: ignore[no-untyped-def]
    return load_location_map()


def test_every_library_site_maps_or_is_explicitly_unmapped(cmap) -> None:  # type: ignore[no-untyped-def]
    lib = load_library()
    mapped = {s.id: cmap.label_of(s.id) for s in lib.sites}  # raises if any site has no rule
    assert len(mapped) == len(lib.sites)
    used = {v for v in mapped.values() if v is not None}
    assert used == set(CLEAR_LABELS)  # every label is reachable
    assert cmap.labels == CLEAR_LABELS and cmap.version == "1.0.0"


@pytest.mark.parametrize(
    ("site", "label"),
    [("liver_s4", "liver"), ("rib_left_3", "bone"), ("vertebra_l2", "bone"), ("kidney_right", "kidney"),
     ("mediastinal_station_7", "mediastinum"), ("heart", "mediastinum"), ("lung_right_lower_superior", "lung"),
     ("pleura_left", "lung"), ("costophrenic_angle_left", "lung"), ("bladder", "pelvis"), ("spleen", "abdomen"),
     ("adrenal_gland_left", "abdomen"), ("axillary_lymph_nodes_right", "soft tissue"), ("femur_left", "bone"),
     ("thigh_muscle_left", "soft tissue"), ("vertebra_t4_paravertebral", "soft tissue"), ("sternum", "bone"),
     ("ilium_right", "bone"), ("para_iliac_bone_left", "soft tissue"), ("outside_body", None), ("brain", None),
     ("spinal_cord", None), ("skull", "bone"), ("clavicle_left", "bone"), ("neck_level_ii_left", "soft tissue")],
)  # fmt: skip
def test_spot_checks(cmap, site: str, label: str | None) -> None:  # type: ignore[no-untyped-def]
    assert cmap.label_of(site) == label


def test_multi_hot_in_clear_order(cmap) -> None:  # type: ignore[no-untyped-def]
    assert cmap.multi_hot(["liver_s2", "rib_left_1", "outside_body", "liver_s7"]) == [1, 0, 0, 1, 0, 0, 0, 0]
    assert cmap.multi_hot([]) == [0] * 8
    assert cmap.stamp()["content_hash"] == cmap.content_hash and len(cmap.content_hash) == 64


def test_incomplete_or_wrong_maps_are_refused(tmp_path: Path) -> None:
    lib = load_library()
    doc = yaml.safe_load(MAP_FILE.read_text(encoding="utf-8"))
    del doc["rules"]["lung_left"]  # the chest region has no rule of its own
    problems = check_map(doc, lib)
    assert any("'pleura_left' is neither mapped" in p for p in problems)
    doc = yaml.safe_load(MAP_FILE.read_text(encoding="utf-8"))
    doc["rules"]["no_such_node"] = "bone"
    doc["rules"]["liver"] = "hepar"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(LibraryError) as exc:
        load_location_map(bad)
    assert exc.value.code == "clear_location_map_invalid"
    assert "no_such_node" in exc.value.message and "hepar" in exc.value.message
    with pytest.raises(LibraryError):
        load_location_map(tmp_path / "missing.yaml")
