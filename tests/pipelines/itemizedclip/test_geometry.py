"""Token order and the map → patient (LPS) round trip (ItemizedCLIP, arXiv 2512.11141).

A marker voxel at a known patient position goes through the real chest-CT preprocessing; the
token that received it gets a synthetic map peak; the map, reshaped and placed by
:class:`~pipelines.models.itemizedclip.geometry.TokenGrid`, must put its peak on that patient
voxel — for an identity-oriented series, the same anatomy stored flipped, a resampled series,
a padded axis and a crop centred on a point.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.dicom.volume import Volume
from pipelines.models.itemizedclip import encoder as ie
from pipelines.models.itemizedclip.geometry import TokenGrid
from pipelines.models.study_encoder import preprocess
from tests.pipelines.itemizedclip.conftest import TINY_MODEL, TINY_SPEC
from tests.pipelines.study_encoder.phantoms import axial_affine, flipped_copy

PARAMS = preprocess.ChestCtParams(size_zyx=TINY_SPEC.img_size)  # 24 × 48 × 64 crop at (3, 1, 1) mm
PATCH = TINY_SPEC.patch_size


def _volume(shape_kji: tuple[int, int, int], spacing_ijk: tuple[float, float, float], marker_ijk: tuple[int, int, int],
            origin: tuple[float, float, float] = (-40.0, -30.0, 100.0)) -> tuple[Volume, np.ndarray]:  # fmt: skip
    arr = np.full(shape_kji, -1000.0, dtype=np.float32)
    i, j, k = marker_ijk
    arr[k, j, i] = 2000.0
    vol = Volume(arr, axial_affine(spacing_ijk, origin), frame_of_reference_uid="1.2.3", series_instance_uid="1.2.4",
                 modality="CT")  # fmt: skip
    return vol, vol.index_to_lps(np.array(marker_ijk))[0]


def _round_trip(vol: Volume, marker_lps: np.ndarray, centre_lps=(None, None, None)):  # type: ignore[no-untyped-def]
    prepared = preprocess.preprocess_chest_ct(vol, centre_lps=centre_lps, params=PARAMS)
    crop = prepared.tensor[0, 0, 0].numpy()
    zyx = np.unravel_index(int(np.argmax(crop)), crop.shape)  # where the marker landed in the model input
    token = tuple(int(c) // p for c, p in zip(zyx, PATCH, strict=True))
    grid = TokenGrid.from_prepared(prepared, PATCH, vol.frame_of_reference_uid)
    token_map = np.zeros(grid.grid, dtype=np.float32)
    token_map[token] = 1.0
    flat = token_map.reshape(-1)  # the model's token order: i = d·(h·w) + h·w_n + w
    assert grid.reshape(flat)[token] == 1.0
    return prepared, grid, token, zyx, token_map


@pytest.mark.parametrize("flipped", [False, True], ids=["identity", "flipped"])
def test_peak_lands_on_the_patient_voxel(flipped: bool) -> None:
    # 20 slices of 3 mm (< 24: z is padded), 70 × 90 at 1 mm (cropped): resampling is the identity
    vol, marker = _volume((20, 70, 90), (1.0, 1.0, 3.0), (57, 22, 13))
    if flipped:
        vol = flipped_copy(vol)
        vol.frame_of_reference_uid = "1.2.3"
        assert np.allclose(vol.index_to_lps(np.array([90 - 1 - 57, 22, 20 - 1 - 13]))[0], marker)
    _prepared, grid, token, zyx, token_map = _round_trip(vol, marker)
    # voxel level: the crop voxel holding the marker maps back to the marker's patient position exactly
    np.testing.assert_allclose((grid.crop_affine @ [zyx[2], zyx[1], zyx[0], 1.0])[:3], marker, atol=1e-6)
    # token level: the map's peak is that token, and the marker lies inside the token's patient box
    dhw, centre = grid.peak(token_map)
    assert dhw == token
    lo, hi = grid.token_box_lps(dhw)
    assert bool(np.all(lo <= marker) and np.all(marker <= hi))
    np.testing.assert_array_less(np.abs(centre - marker), np.array([PATCH[2] * 1.0, PATCH[1] * 1.0, PATCH[0] * 3.0]) / 2)
    # the map as volumes: at the marker's patient position both read the peak value
    for mv in (grid.upsample(token_map), grid.token_volume(token_map)):
        ijk = np.rint(mv.lps_to_index(marker)[0]).astype(int)
        assert mv.array[ijk[2], ijk[1], ijk[0]] == 1.0
        assert mv.frame_of_reference_uid == "1.2.3"
    if not flipped:  # the same token for the same anatomy however it is stored
        flipped_vol = flipped_copy(vol)
        _, grid_f, token_f, _, map_f = _round_trip(flipped_vol, marker)
        assert token_f == token
        np.testing.assert_allclose(grid_f.peak(map_f)[1], centre, atol=1e-6)


def test_peak_after_resampling_and_point_centred_crop() -> None:
    # 2.5 mm slices and 0.8 mm pixels: trilinear resampling to (3, 1, 1) mm; crop centred on a point
    vol, marker = _volume((40, 110, 120), (0.8, 0.8, 2.5), (70, 31, 17))
    centre = (float(marker[0]) + 5.0, None, float(marker[2]) - 9.0)
    prepared, grid, _token, zyx, token_map = _round_trip(vol, marker, centre_lps=centre)
    assert prepared.description["crop_mode"] == ["centred_on_point", "centre", "centred_on_point"]
    voxel_lps = (grid.crop_affine @ [zyx[2], zyx[1], zyx[0], 1.0])[:3]
    np.testing.assert_array_less(np.abs(voxel_lps - marker), [1.0, 1.0, 3.0])  # within one working voxel
    lo, hi = grid.token_box_lps(grid.peak(token_map)[0])
    assert bool(np.all(lo <= marker) and np.all(marker <= hi))


def test_token_centres_follow_the_contract_formula() -> None:
    """§6: crop → resampled index (± the centre-crop/pad offset), → source index (i + 0.5)·n0/n − 0.5, → LPS."""
    vol, _ = _volume((20, 130, 70), (0.9, 0.9, 2.0), (1, 1, 1))
    prepared = preprocess.preprocess_chest_ct(vol, params=PARAMS)
    grid = TokenGrid.from_prepared(prepared, PATCH)
    n0 = np.array([20, 130, 70])  # (z, y, x) source sizes
    s0 = np.array([2.0, 0.9, 0.9])
    n = (n0 * s0 / np.array([3.0, 1.0, 1.0])).astype(int)
    big_n = np.array(TINY_SPEC.img_size)
    origin_zyx = np.array(vol.origin)[::-1]
    for dhw in [(0, 0, 0), (2, 1, 3), (1, 2, 0)]:
        c = np.array(dhw) * np.array(PATCH) + (np.array(PATCH) - 1) / 2  # crop index of the token centre
        r = np.where(n >= big_n, c + (n - big_n) // 2, c - (big_n - n) // 2)
        src = (r + 0.5) * n0 / n - 0.5
        expect_zyx = origin_zyx + src * s0
        np.testing.assert_allclose(grid.token_centre_lps(dhw)[0], expect_zyx[::-1], atol=1e-6)


def test_trunk_token_order_is_d_h_w(tiny_itemized: dict[str, Path]) -> None:
    """With identity blocks, a single non-zero input patch (d, h, w) lights token d·(h_n·w_n) + h·w_n + w (§2)."""
    enc = ie.ItemizedClipEncoder(ie.ItemizedClipConfig(checkpoint=tiny_itemized["checkpoint"],
                                                       text_dir=tiny_itemized["text"], model_name=TINY_MODEL,
                                                       config_dir=tiny_itemized["configs"]))  # fmt: skip
    trunk = copy.deepcopy(enc.model.visual.trunk)
    with torch.no_grad():
        trunk.cls_token.zero_()
        trunk.spatial_posemb.zero_()
        trunk.patch_embed.proj.bias.zero_()
        trunk.norm.bias.zero_()
        for block in trunk.blocks:  # residual branches off: every block is the identity
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    _d_n, h_n, w_n = TINY_SPEC.grid_size
    pd, ph, pw = PATCH
    for d, h, w in [(0, 0, 0), (2, 1, 3), (1, 2, 0), (0, 1, 2)]:
        x = torch.zeros(1, 1, 1, *TINY_SPEC.img_size)
        x[..., d * pd:(d + 1) * pd, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw] = 1.0
        with torch.no_grad():
            tokens = trunk.forward_features(x)[0, 1:]
        lit = torch.nonzero(tokens.abs().sum(-1) > 1e-4).flatten().tolist()
        assert lit == [d * h_n * w_n + h * w_n + w]
