"""Chest-CT preprocessing on synthetic volumes with known geometry (orientation, crop position)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.dicom.volume import Volume
from pipelines.errors import GeometryError
from pipelines.models.study_encoder import preprocess as pp
from tests.pipelines.study_encoder.phantoms import axial_affine, flipped_copy, torso

SMALL = pp.ChestCtParams(size_zyx=(16, 48, 48))


def test_published_constants() -> None:
    assert pp.CHEST_CT.spacing_zyx == (3.0, 1.0, 1.0)
    assert pp.CHEST_CT.window == (-1150.0, 350.0)
    assert pp.CHEST_CT.size_zyx == (112, 336, 336)
    assert pp.CHEST_CT.mean == pytest.approx(0.449, abs=1e-6)
    assert pp.CHEST_CT.std == pytest.approx(0.226, abs=1e-6)


def test_window_maps_hu_to_unit_interval() -> None:
    x = torch.tensor([-2000.0, -1150.0, -400.0, 350.0, 3000.0])
    assert pp.window(x).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_resample_size_follows_int_rule() -> None:
    arr = np.zeros((101, 50, 70), np.float32)
    out = pp.resample(arr, (1.25, 0.7, 0.7))
    assert tuple(out.shape) == (int(101 * 1.25 / 3), int(50 * 0.7), int(70 * 0.7))


def test_canonical_orientation_is_storage_independent() -> None:
    v = torso(20, 5.0, 0.0, (20.0, 80.0), n=40)
    a = pp.canonicalize(v)
    b = pp.canonicalize(flipped_copy(v))
    np.testing.assert_array_equal(a.array, b.array)
    assert a.origin_lps == pytest.approx(b.origin_lps)
    assert b.axes == "[z,y,x]=[-k,+j,-i]"


def test_canonical_axes_for_sagittal_storage() -> None:
    # array[k, j, i] with i → +y (posterior), j → −z (inferior), k → +x (left): a sagittal stack
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(6, 7, 8)).astype(np.float32)
    aff = np.zeros((4, 4))
    aff[:3, 0] = (0, 2.0, 0)
    aff[:3, 1] = (0, 0, -3.0)
    aff[:3, 2] = (1.5, 0, 0)
    aff[:3, 3] = (10, 20, 30)
    aff[3, 3] = 1
    ct = pp.canonicalize(Volume(arr, aff))
    assert ct.spacing_zyx == (3.0, 2.0, 1.5)
    # canonical [z, y, x]: z ascending = j descending; y = i; x = k
    np.testing.assert_array_equal(ct.array, np.transpose(arr, (1, 2, 0))[::-1])
    assert ct.origin_lps == pytest.approx((10, 20, 30 - 3.0 * 6))


def test_sheared_volume_is_refused() -> None:
    aff = axial_affine((1, 1, 2), (0, 0, 0))
    aff[1, 2] = 0.5  # gantry tilt: slice step has a y component
    with pytest.raises(GeometryError) as err:
        pp.canonicalize(Volume(np.zeros((4, 4, 4), np.float32), aff))
    assert err.value.code == "sheared_geometry"


def test_small_volume_is_padded_symmetrically_with_zero_after_window() -> None:
    # 10 slices x 3 mm, 40 x 40 at 1 mm, constant 350 HU (window 1.0)
    v = Volume(np.full((10, 40, 40), 350.0, np.float32), axial_affine((1, 1, 3), (0, 0, 0)))
    out = pp.preprocess_chest_ct(v, params=SMALL).tensor[0, 0, 0]
    one, zero = (1 - SMALL.mean) / SMALL.std, (0 - SMALL.mean) / SMALL.std
    assert out.shape == (16, 48, 48)
    occupied = torch.isclose(out, torch.tensor(one))
    zs, ys, _xs = (torch.nonzero(occupied.any(dim=d)).flatten() for d in ((1, 2), (0, 2), (0, 1)))
    assert (zs.min().item(), zs.max().item()) == (3, 12)  # pad 6 → 3 before, 3 after
    assert (ys.min().item(), ys.max().item()) == (4, 43)  # pad 8 → 4 before
    assert torch.isclose(out[0, 0, 0], torch.tensor(zero))


def test_centre_crop_position_matches_upstream_rule() -> None:
    # a bright marker slab at known z; 60 slices of 3 mm → centre crop starts at (60-16)//2 = 22
    arr = np.full((60, 48, 48), -1000.0, np.float32)
    arr[22] = 350.0
    arr[37] = 350.0
    v = Volume(arr, axial_affine((1, 1, 3), (0, 0, -90.0)))
    prep = pp.preprocess_chest_ct(v, params=SMALL)
    out = prep.tensor[0, 0, 0]
    bright = torch.nonzero(out.mean(dim=(1, 2)) > 0).flatten().tolist()
    assert bright == [0, 15]
    assert prep.crop_lps_min[2] == pytest.approx(-90.0 + 22 * 3)
    assert prep.crop_lps_max[2] == pytest.approx(-90.0 + 37 * 3)


def test_crop_centred_on_point() -> None:
    arr = np.full((60, 48, 48), -1000.0, np.float32)
    arr[45] = 350.0
    v = Volume(arr, axial_affine((1, 1, 3), (0, 0, 0.0)))
    prep = pp.preprocess_chest_ct(v, centre_lps=(None, None, 45 * 3.0), params=SMALL)
    out = prep.tensor[0, 0, 0]
    bright = torch.nonzero(out.mean(dim=(1, 2)) > 0).flatten().tolist()
    assert bright == [7]  # crop 38..53: the point sits within half a voxel of the crop centre (7.5)
    assert prep.description["crop_mode"] == ["centred_on_point", "centre", "centre"]


def test_flipped_storage_gives_identical_model_input() -> None:
    v = torso(40, 5.0, 0.0, (40.0, 150.0), n=24, dxy=4.0)
    a = pp.preprocess_chest_ct(v, params=SMALL).tensor
    b = pp.preprocess_chest_ct(flipped_copy(v), params=SMALL).tensor
    torch.testing.assert_close(a, b)
