"""Phantom -> StudyRecord: ground truth consistent with the label maps, HCL-AL answers, determinism."""

from __future__ import annotations

import numpy as np

from library import load_library
from training.data.phantom import NEAREST_HCLAL, HclalTruthTable, phantom_record
from training.phantom.anatomy import STRUCTURE_SITES, build_anatomy


def test_every_lesion_host_has_hclal_answers_in_the_crosswalk() -> None:
    table = HclalTruthTable()
    finals = {e.final for e in load_library().hclal.entries}  # type: ignore[union-attr]
    assert all(f in finals for fs in NEAREST_HCLAL.values() for f in fs)
    anatomy = build_anatomy(np.random.default_rng(0))
    hosts = [s.site_id for s in anatomy.structures if s.lesion_weight > 0 and s.site_id]
    missing = [h for h in hosts if table.truth(h) is None]
    assert not missing
    assert set(NEAREST_HCLAL) <= set(STRUCTURE_SITES.values())
    # an exact crosswalk name wins over the nearest-name table
    assert table.truth("liver_s7").finals == ("Liver S7",)  # type: ignore[union-attr]
    assert table.truth("rib_left_3").pairs == (("Rib L3", "Rib"),)  # type: ignore[union-attr]


def test_record_truth_matches_the_label_map_and_is_deterministic() -> None:
    a = phantom_record(7, "tiny")
    b = phantom_record(7, "tiny")
    assert np.array_equal(a.labels.array, b.labels.array) and a.lesions == b.lesions
    assert a.ct is not None and a.labels.array.shape == a.suv.array.shape
    for les in a.lesions:
        assert (a.labels.array == les.label).any()
        assert les.hclal_locations and les.coarse_keys and les.sites


def test_balanced_placement_uses_eligible_sites() -> None:
    rec = phantom_record(11, "tiny", placement="balanced", n_lesions=4)
    assert len(rec.lesions) == 4 and rec.source.endswith("placement=balanced,n=4")
    assert all(les.hclal_locations for les in rec.lesions)
