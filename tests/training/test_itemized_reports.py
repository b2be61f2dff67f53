"""Itemized phantom reports (training.phantom.reports): items follow the ground truth, wording varies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from library import load_library
from training.data.phantom import lesion_free, phantom_record, phantom_records
from training.phantom import make_phantom
from training.phantom.lesions import LesionTruth
from training.phantom.reports import (
    ItemizedReport,
    itemize,
    load_templates,
    phantom_report,
    sample_items,
)

LIB = load_library()


def _lesion(label: int, site_id: str, kind: str = "soft_tissue", suv: float = 6.0, r: float = 10.0) -> LesionTruth:
    return LesionTruth(label=label, structure=site_id, site_id=site_id, center_mm=(0.0, 0.0, 0.0), radii_mm=(r, r, r),
                       axes=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), box_min_mm=(-r, -r, -r),
                       box_max_mm=(r, r, r), suv=suv, hu=40.0, kind=kind, volume_ml=1.0, tracking_uid="2.25.1",
                       tracking_id=f"Lesion {label}")  # fmt: skip


def _coarse(site_id: str) -> str:
    return next(p.id for p in LIB.parents(site_id) if p.level == "coarse")


@pytest.fixture(scope="module")
def tiny_phantom():  # type: ignore[no-untyped-def]
    return make_phantom(3, "tiny")


def test_items_match_ground_truth_lesions_and_sites(tiny_phantom) -> None:  # type: ignore[no-untyped-def]
    report = phantom_report(tiny_phantom, grouping="lesion")
    assert not report.normal
    assert [it.lesion_labels for it in report.items] == [(les.label,) for les in tiny_phantom.lesions]
    for item, les in zip(report.items, tiny_phantom.lesions, strict=True):
        site = LIB.site(les.site_id)
        assert item.kind == "lesion"
        assert item.site_ids == (les.site_id,)
        assert item.group_id == _coarse(les.site_id)
        assert site.description in item.text  # the library's words, not the phantom's structure names
        assert item.text in item.phrasings


def test_auto_grouping_merges_only_site_groups_with_several_lesions() -> None:
    lesions = [_lesion(1, "liver_s7", suv=5.0, r=8.0), _lesion(2, "vertebra_l1", kind="lytic"),
               _lesion(3, "liver_s2", suv=9.5, r=12.0)]  # fmt: skip
    report = itemize(lesions, seed=1)
    assert [it.lesion_labels for it in report.items] == [(1, 3), (2,)]
    liver, bone = report.items
    assert liver.kind == "group" and liver.group_id == "liver" and liver.site_ids == ("liver_s7", "liver_s2")
    assert all(LIB.site("liver").description in p for p in liver.phrasings)
    assert any("9.5" in p for p in liver.phrasings)  # SUVmax is the group's maximum
    assert any("24 mm" in p for p in liver.phrasings)  # the largest long axis, 2 x 12 mm
    assert bone.kind == "lesion" and any("lytic" in p for p in bone.phrasings)
    per_lesion = itemize(lesions, seed=1, grouping="lesion")
    assert [it.lesion_labels for it in per_lesion.items] == [(1,), (2,), (3,)]
    per_group = itemize(lesions, seed=1, grouping="group")
    assert [it.lesion_labels for it in per_group.items] == [(1, 3), (2,)]
    assert per_group.items[1].kind == "lesion"  # a group of one lesion is described by its own site
    with pytest.raises(ValueError, match="grouping"):
        itemize(lesions, seed=1, grouping="organ")


def test_every_lesion_is_in_exactly_one_item_on_real_phantoms() -> None:
    for seed in (5, 6):
        ph = make_phantom(seed, "tiny", n_lesions=4)
        for grouping in ("auto", "lesion", "group"):
            report = phantom_report(ph, grouping=grouping)
            labels = [lab for it in report.items for lab in it.lesion_labels]
            assert sorted(labels) == sorted(les.label for les in ph.lesions)
            for it in report.items:
                truth_sites = {les.site_id for les in ph.lesions if les.label in it.lesion_labels}
                assert set(it.site_ids) == truth_sites
                assert {_coarse(s) for s in it.site_ids} == {it.group_id}


def test_phrasings_vary_within_items_and_across_seeds() -> None:
    lesions = [_lesion(1, "celiac_lymph_nodes"), _lesion(2, "liver_s7")]
    for it in itemize(lesions, seed=0).items:
        assert len(set(it.phrasings)) >= 4
    chosen = {tuple(itemize(lesions, seed=s).texts()) for s in range(12)}
    assert len(chosen) >= 4
    node = itemize(lesions, seed=0).items[0]
    assert any("lymph node" in p.lower() or "nodal" in p.lower() for p in node.phrasings)


def test_same_seed_same_report(tiny_phantom) -> None:  # type: ignore[no-untyped-def]
    assert phantom_report(tiny_phantom) == phantom_report(tiny_phantom)
    assert itemize(tiny_phantom.lesions, 11) == itemize(tiny_phantom.lesions, 11)


def test_lesion_free_phantoms_get_the_normal_item() -> None:
    ph = make_phantom(4, "tiny", n_lesions=0)
    assert ph.lesions == () and not ph.pet_lesions.array.any()
    report = phantom_report(ph)
    assert report.normal and len(report.items) == 1
    item = report.items[0]
    assert item.kind == "normal" and item.lesion_labels == () and item.site_ids == () and item.group_id is None
    assert item.text in load_templates().normal and item.phrasings == load_templates().normal
    assert any("no fdg-avid lesion" in p.lower() for p in item.phrasings)
    rec = phantom_record(4, "tiny", n_lesions=0)
    assert rec.lesions == [] and rec.report is not None and rec.report.normal
    # a study with lesions is never "normal"
    assert not phantom_record(4, "tiny", n_lesions=1).report.normal  # type: ignore[union-attr]


def test_lesion_free_fraction_is_deterministic_and_takes_effect() -> None:
    draws = [lesion_free(s, 0.3) for s in range(400)]
    assert draws == [lesion_free(s, 0.3) for s in range(400)]
    assert 0.2 < np.mean(draws) < 0.4
    assert not any(lesion_free(s, 0.0) for s in range(50)) and all(lesion_free(s, 1.0) for s in range(50))
    with pytest.raises(ValueError):
        lesion_free(0, 1.5)
    seeds = [s for s in range(40) if lesion_free(s, 0.5)][:1] + [s for s in range(40) if not lesion_free(s, 0.5)][:1]
    recs = list(phantom_records(seeds, "tiny", n_lesions=2, lesion_free_fraction=0.5))
    assert [r.report.normal for r in recs] == [True, False]  # type: ignore[union-attr]
    assert [len(r.lesions) for r in recs] == [0, 2]


def test_sample_items_pads_truncates_and_rewords() -> None:
    report = itemize([_lesion(i, s) for i, s in enumerate(("liver_s7", "vertebra_l1", "celiac_lymph_nodes"), 1)],
                     seed=2, grouping="lesion")  # fmt: skip
    texts, mask, index = sample_items(report, 5, np.random.default_rng(0))
    assert mask == [1, 1, 1, 0, 0] and texts[3:] == ["Placeholder", "Placeholder"] and index[3:] == [-1, -1]
    assert sorted(index[:3]) == [0, 1, 2]
    for t, i in zip(texts[:3], index[:3], strict=True):
        assert t == t.lower() and t in [p.lower() for p in report.items[i].phrasings]
    texts2, mask2, _ = sample_items(report, 2, np.random.default_rng(0))
    assert mask2 == [1, 1] and len(texts2) == 2


def test_template_file_is_validated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    doc = {"name": "t", "version": "0", "normal": ["No lesion."], "lesion": {"default": ["Lesion {nowhere}."]},
           "group": ["{count} lesions."]}  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown fields"):
        load_templates(bad)
    doc["lesion"] = {"bone": ["Lesion {where}."]}
    bad2 = tmp_path / "bad2.json"
    bad2.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="default"):
        load_templates(bad2)
    assert isinstance(dataclasses.replace(itemize([], 0)), ItemizedReport)
