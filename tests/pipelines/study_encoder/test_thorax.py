"""Chest field-of-view selection on synthetic torsos with known lung positions."""

from __future__ import annotations

import pytest

from pipelines.models.study_encoder.thorax import select_thorax
from tests.pipelines.study_encoder.phantoms import flipped_copy, torso


def test_chest_length_ct_keeps_published_centre_crop() -> None:
    sel = select_thorax(torso(60, 5.0, -150.0, (-60.0, 120.0)), "CHEST")
    assert sel.covers_chest and sel.mode == "published_centre"
    assert sel.centre_lps == (None, None, None)
    assert sel.lung_z_range_mm is not None
    assert sel.lung_z_range_mm[0] == pytest.approx(-60, abs=15) and sel.lung_z_range_mm[1] == pytest.approx(120, abs=15)
    assert sel.scan_z_extent_mm == pytest.approx(300)


def test_whole_body_ct_is_centred_on_the_lungs() -> None:
    ct = torso(200, 5.0, -800.0, (-100.0, 150.0))  # -800..195 mm scan, lungs well above its centre (-302 mm)
    sel = select_thorax(ct, "WHOLEBODY")
    assert sel.covers_chest and sel.mode == "lung_centred"
    cx, cy, cz = sel.centre_lps
    assert cz == pytest.approx(25.0, abs=10)
    assert cx == pytest.approx(0.0, abs=6) and cy == pytest.approx(-10.0, abs=6)
    assert "centred on the lungs" in sel.describe() and "BodyPartExamined=WHOLEBODY" in sel.describe()
    # storage order does not change the choice
    flipped = select_thorax(flipped_copy(ct), "WHOLEBODY")
    assert flipped.centre_lps == pytest.approx(sel.centre_lps, abs=5)


def test_ct_without_lungs_is_not_chest_even_if_tagged() -> None:
    sel = select_thorax(torso(40, 5.0, 0.0, None), "CHEST")
    assert not sel.covers_chest and sel.mode == "not_chest"
    assert "although BodyPartExamined is CHEST" in sel.reason


def test_lungs_override_a_wrong_tag() -> None:
    sel = select_thorax(torso(60, 5.0, -150.0, (-60.0, 120.0)), "PELVIS")
    assert sel.covers_chest
