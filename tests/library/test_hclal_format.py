"""HCL-AL two-file format: import, mapping to coded sites, export back identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.anatomy import load_library
from library.errors import LibraryError
from library.hclal_format import (
    HclAlVocabulary,
    dumps_json,
    import_hclal,
    read_hclal,
    write_hclal,
)

# A subset of HCL-AL's vocabulary tree (real site names, file order kept) ...
TREE = {
    "Chest": {
        "Mediastinum": {"Mediastinum 4R": "Mediastinum 4R", "Mediastinum 7": "Mediastinum 7", "Aorta": "Thoracic aorta"},
        "Left lung": {"Left upper lobe anterior segment": "Left upper lobe anterior segment"},
    },
    "Abdomen": {
        "Retroperitoneum": {"Aorta": "Abdominal aorta", "Left adrenal gland": "Left adrenal gland"},
        "Liver": {"Liver S1": "Liver S1", "Liver S7": "Liver S7", "Around the liver": "Around the liver"},
    },
    "Axial skeleton": {
        "Vertebra T5": {"Thoracic spine": "Vertebra T5", "Spinous process": "Spinous process of vertebra T5",
                        "Paravertebral thoracic": "Near vertebra T5"},
        "Vertebra L6": {"Lumbar spine": "Vertebra L6"},
        "Rib R5": {"Rib": "Rib R5"},
    },
}
# ... with description sentences written for this test (HCL-AL's own sentences are not used).
DESCRIPTIONS = {
    "Mediastinum": "test: mediastinal compartment", "Mediastinum 4R": "test: right lower paratracheal node",
    "Mediastinum 7": "test: node below the carina", "Aorta": "test: the aorta",
    "Left lung": "test: left lung", "Left upper lobe anterior segment": "test: anterior segment, left upper lobe",
    "Retroperitoneum": "test: behind the peritoneum", "Left adrenal gland": "test: left adrenal",
    "Liver": "test: the liver", "Liver S1": "test: caudate lobe", "Liver S7": "test: posterosuperior right liver",
    "Around the liver": "test: perihepatic", "Vertebra T5": "test: fifth thoracic level",
    "Thoracic spine": "test: a thoracic vertebra", "Spinous process": "test: a spinous process",
    "Paravertebral thoracic": "test: beside a thoracic vertebra", "Vertebra L6": "test: sixth lumbar level",
    "Lumbar spine": "test: a lumbar vertebra", "Rib R5": "test: right fifth rib", "Rib": "test: a rib",
    "Lung": "test: orphan entry kept on export",
}


def _write_pair(tmp_path: Path, tree=TREE, desc=DESCRIPTIONS, indent=2) -> tuple[Path, Path]:
    v, d = tmp_path / "anatomy_vocabulary_library.json", tmp_path / "augmented_location_descriptions.json"
    v.write_text(json.dumps(tree, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    d.write_text(json.dumps(desc, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return v, d


def test_round_trip_maps_to_coded_sites_and_exports_identical(tmp_path: Path) -> None:
    v, d = _write_pair(tmp_path)
    lib = load_library()
    mapping = import_hclal(v, d, lib)
    assert not mapping.unmapped_finals and not mapping.unmapped_coarse and not mapping.placement_warnings
    assert mapping.library_hash == lib.content_hash

    s7 = mapping.site_for_final("Liver S7")
    assert (s7.id, s7.code.value, s7.code.cid) == ("liver_s7", "277961009", 7170)
    rib = mapping.site_for_final("Rib R5").to_assignment()
    assert rib.laterality is not None and rib.laterality.meaning == "Right" and rib.approximate
    node_4r = mapping.site_for_final("Mediastinum 4R")
    assert node_4r.code.value == "127932007" and node_4r.laterality.value == "right"
    # the same fine word maps to different sites depending on its coarse parent
    assert mapping.site_for_final("Thoracic aorta").id == "thoracic_aorta"
    assert mapping.site_for_final("Abdominal aorta").id == "abdominal_aorta"
    l6 = mapping.site_for_final("Vertebra L6")
    assert l6.approximate and l6.modifiers[0].private
    # HCL-AL reports the coarse key for lesions > 100 mm: that maps too
    assert mapping.site_for_prediction("Liver").id == "liver"
    assert mapping.site_for_prediction("Vertebra T5").code.value == "56401006"

    vocab = mapping.vocabulary
    assert vocab.coarse_keys == ["Mediastinum", "Left lung", "Retroperitoneum", "Liver", "Vertebra T5",
                                 "Vertebra L6", "Rib R5"]
    assert vocab.final("Retroperitoneum", "Aorta") == "Abdominal aorta"
    assert vocab.orphan_descriptions == ["Lung"]

    out_v, out_d = tmp_path / "out_vocab.json", tmp_path / "out_desc.json"
    sha_v, sha_d = write_hclal(vocab, out_v, out_d)
    assert out_v.read_bytes() == v.read_bytes()
    assert out_d.read_bytes() == d.read_bytes()
    assert (sha_v, sha_d) == (vocab.vocabulary_sha256, vocab.descriptions_sha256)
    again = read_hclal(out_v, out_d)
    assert list(again.tree.items()) == list(TREE.items())  # order is semantic for HCL-AL
    assert list(again.descriptions.items()) == list(DESCRIPTIONS.items())


def test_other_whitespace_round_trips_content_and_order(tmp_path: Path) -> None:
    v, d = _write_pair(tmp_path, indent=3)  # upstream files use a different indentation
    vocab = read_hclal(v, d)
    out_v, out_d = tmp_path / "o1.json", tmp_path / "o2.json"
    write_hclal(vocab, out_v, out_d)
    assert out_v.read_text(encoding="utf-8") == dumps_json(TREE)
    assert json.loads(out_v.read_text(encoding="utf-8")) == TREE


def test_full_crosswalk_tree_has_hclal_counts() -> None:
    lib = load_library()
    tree = lib.hclal.tree()
    vocab = HclAlVocabulary(tree=tree, descriptions={})
    counts = vocab.counts()
    assert (counts["regions"], counts["coarse"], counts["pairs"], counts["finals"], counts["fine_words"]) == \
        (8, 124, 387, 387, 203)
    assert list(tree) == ["Head", "Neck", "Chest", "Abdomen", "Pelvis", "Axial skeleton", "Upper limb", "Lower limb"]
    assert tree["Axial skeleton"]["Vertebra L6"]["Paralumbar"] == "Near vertebra L6"


@pytest.mark.parametrize(
    ("tree", "desc", "message"),
    [
        (TREE, {k: v for k, v in DESCRIPTIONS.items() if k != "Rib"}, "no sentence for 1 vocabulary word(s), e.g. ['Rib']"),
        (TREE, {**DESCRIPTIONS, "Rib": "test: the liver"}, "sentence(s) ['test: the liver'] are used for several words"),
        ({"Abdomen": {"Liver": {"Liver S1": "Liver S1"}, "Spleen": {"Spleen": "Liver S1"}}},
         {"Liver": "a", "Liver S1": "b", "Spleen": "c"}, "final location string(s) ['Liver S1'] appear more than once"),
        ({"Abdomen": {"Liver": {"Liver S1": 3}}}, {"Liver": "a", "Liver S1": "b"}, "must be a final location string"),
    ],
)
def test_invalid_pairs_are_refused(tmp_path: Path, tree, desc, message) -> None:
    v, d = _write_pair(tmp_path, tree, desc)
    with pytest.raises(LibraryError) as exc:
        read_hclal(v, d)
    assert exc.value.code == "hclal_format"
    assert message in exc.value.message


def test_unmapped_final_strings(tmp_path: Path) -> None:
    tree = {"Abdomen": {"Liver": {"Liver S1": "Liver S1", "Liver S9": "Liver S9"}}}
    v, d = _write_pair(tmp_path, tree, {"Liver": "a", "Liver S1": "b", "Liver S9": "c"})
    lib = load_library()
    with pytest.raises(LibraryError) as exc:
        import_hclal(v, d, lib)
    assert exc.value.code == "hclal_unmapped" and "Liver S9" in exc.value.message
    mapping = import_hclal(v, d, lib, allow_unmapped=True)
    assert mapping.unmapped_finals == ("Liver S9",)
    assert mapping.site_for_final("Liver S9") is None


def test_moved_final_string_is_reported(tmp_path: Path) -> None:
    tree = {"Abdomen": {"Liver": {"Segment seven": "Liver S7"}}}
    v, d = _write_pair(tmp_path, tree, {"Liver": "a", "Segment seven": "b"})
    mapping = import_hclal(v, d, load_library())
    assert mapping.site_for_final("Liver S7").id == "liver_s7"
    assert mapping.placement_warnings and "'Segment seven'" in mapping.placement_warnings[0]
