"""Slice extraction geometry: slice index ↔ patient z, flipped storage, PET on another grid, windows."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.dicom.volume import Volume
from pipelines.errors import GeometryError, InputError
from pipelines.models.clear.slices import (
    SlicePreprocessing,
    common_grid,
    extract_slices,
)

PARAMS = SlicePreprocessing(size=32, z_spacing_mm=3.0)
MARK = (10.0, -20.0, -30.0)  # LPS mm of the lesion-like marker


def _ct(flip_k: bool = False, flip_i: bool = False, for_uid: str = "1.2.3") -> Volume:
    """64×64×40 CT, 2×2×5 mm, a 200 HU cube (±6 mm) at MARK on −1000 HU air... stored as asked."""
    ni, nj, nk = 64, 64, 40
    aff = np.diag([2.0, 2.0, 5.0, 1.0])
    aff[:3, 3] = (-63.0, -63.0, -100.0)
    ref = Volume(np.zeros((nk, nj, ni), np.float32), aff, frame_of_reference_uid=for_uid)
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    lps = ref.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], 1)).reshape(nk, nj, ni, 3)
    arr = np.full((nk, nj, ni), 40.0, np.float32)  # soft tissue
    arr[lps[..., 0] > 40] = -1000.0  # air at patient left
    inside = np.all(np.abs(lps - np.array(MARK)) <= 6.0, axis=-1)
    arr[inside] = 200.0
    if flip_k:  # stored head-first: slice 0 is the most superior, step vector points to the feet
        arr = arr[::-1].copy()
        aff = aff.copy()
        aff[:3, 3] = ref.index_to_lps(np.array([0.0, 0.0, nk - 1]))[0]
        aff[2, 2] = -5.0
    if flip_i:  # columns run right→left reversed (direction cosine −x)
        arr = arr[:, :, ::-1].copy()
        aff = aff.copy()
        aff[:3, 3] = aff[:3, 3] + aff[:3, 0] * (ni - 1)
        aff[0, 0] = -2.0
    return Volume(arr, aff, frame_of_reference_uid=for_uid, series_instance_uid="1.2.3.4")


def _pet(for_uid: str = "1.2.3") -> Volume:
    """A PET on a coarser, shifted grid (4 mm, 30×30×55), SUV 1 background and SUV 8 at MARK."""
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = (-58.0, -58.0, -110.0)
    vol = Volume(np.ones((55, 30, 30), np.float32), aff, frame_of_reference_uid=for_uid)
    k, j, i = np.meshgrid(*(np.arange(n) for n in (55, 30, 30)), indexing="ij")
    lps = vol.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], 1)).reshape(55, 30, 30, 3)
    vol.array[np.linalg.norm(lps - np.array(MARK), axis=-1) <= 8.0] = 8.0
    return vol


def _peak(img: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(img), img.shape))  # type: ignore[return-value]


def test_grid_spans_the_ct_and_indexes_z_upwards() -> None:
    g = common_grid(_ct(), PARAMS)
    assert g.z0 == pytest.approx(-100.0)
    assert g.n_slices == (195 // 3) + 1
    assert g.z_of(10) == pytest.approx(-70.0)
    assert int(g.slice_of(-70.4)) == 10
    assert g.pixel_mm == pytest.approx(126.0 / 31)


def test_marker_lands_at_its_patient_position() -> None:
    stack = extract_slices(_ct(), None, PARAMS)
    s, r, c = _peak(stack.images[:, 0] - 0.5 * stack.images[:, 1])  # brightest soft-tissue, not air
    x, y, z = stack.grid.pixel_to_lps(s, r, c)
    assert abs(z - MARK[2]) <= 6.0 and abs(x - MARK[0]) <= 6.0 and abs(y - MARK[1]) <= 6.0
    assert not stack.pet_present and np.all(stack.images[:, 2] == 0)


@pytest.mark.parametrize(("flip_k", "flip_i"), [(True, False), (False, True), (True, True)])
def test_flipped_storage_gives_the_same_slices(flip_k: bool, flip_i: bool) -> None:
    ref = extract_slices(_ct(), None, PARAMS)
    flipped_ct = _ct(flip_k, flip_i)
    got = extract_slices(flipped_ct, None, PARAMS)
    assert got.grid == ref.grid
    np.testing.assert_allclose(got.images, ref.images, atol=1e-5)
    np.testing.assert_allclose(got.z_mm, ref.z_mm)
    # the nearest stored CT slice of each grid slice lies at that slice's z (±half a CT slice)
    valid = got.ct_source_index >= 0
    src_z = flipped_ct.index_to_lps(np.stack([np.zeros(valid.sum()), np.zeros(valid.sum()),
                                              got.ct_source_index[valid]], 1))[:, 2]  # fmt: skip
    assert np.all(np.abs(src_z - got.z_mm[valid]) <= 2.5 + 1e-6)
    if flip_k:
        assert got.ct_source_index[0] == flipped_ct.array.shape[0] - 1  # lowest z is the last stored slice


def test_pet_on_another_grid_is_resampled_onto_the_ct_grid() -> None:
    stack = extract_slices(_ct(), _pet(), PARAMS)
    assert stack.pet_present
    s, r, c = _peak(stack.images[:, 2])
    x, y, z = stack.grid.pixel_to_lps(s, r, c)
    assert np.linalg.norm(np.array([x, y, z]) - np.array(MARK)) <= 8.0
    assert stack.images[:, 2].max() == pytest.approx(0.8, abs=1e-5)  # SUV 8 / suv_max 10
    far = stack.images[int(stack.grid.slice_of(-90.0)), 2, 2, 2]
    assert far == pytest.approx(0.1, abs=1e-5)  # SUV 1 background


def test_windows_map_known_hu() -> None:
    stack = extract_slices(_ct(), None, PARAMS)
    s = int(stack.grid.slice_of(-80.0))
    tissue = stack.images[s, :, 16, 4]  # x ≈ −56 mm: 40 HU soft tissue
    assert tissue[0] == pytest.approx(0.5, abs=1e-5)  # level 40
    assert tissue[1] == pytest.approx((40 + 1350) / 1500, abs=1e-5)
    air = stack.images[s, :, 16, 30]  # x ≈ +59 mm: −1000 HU
    assert air[0] == 0.0 and air[1] == pytest.approx(350 / 1500, abs=1e-5)


def test_pet_from_another_frame_of_reference_is_refused() -> None:
    with pytest.raises(GeometryError) as exc:
        extract_slices(_ct(), _pet(for_uid="9.9"), PARAMS)
    assert exc.value.code == "frame_of_reference_mismatch"
    assert extract_slices(_ct(), _pet(for_uid="9.9"), PARAMS, require_same_frame=False).pet_present


def test_sheared_ct_and_bad_parameters_are_refused() -> None:
    ct = _ct()
    ct.affine[0, 2] = 1.0  # slice step not perpendicular to the plane (gantry tilt)
    with pytest.raises(GeometryError):
        extract_slices(ct, None, PARAMS)
    with pytest.raises(InputError):
        SlicePreprocessing(z_spacing_mm=0.0)


def test_preprocessing_json_round_trip() -> None:
    assert SlicePreprocessing.from_json(PARAMS.to_json()) == PARAMS


@pytest.mark.parametrize(("flip_k", "flip_i"), [(False, False), (True, True)])
def test_separable_fast_path_equals_the_general_sampler(flip_k: bool, flip_i: bool) -> None:
    from pipelines.models.clear.slices import (
        _axis_aligned,
        _sample_general,
        _sample_separable,
    )

    ct, pet = _ct(flip_k, flip_i), _pet()
    grid = common_grid(ct, PARAMS)
    for vol, fill in ((ct, -1024.0), (pet, 0.0)):
        axes = _axis_aligned(vol)
        assert axes is not None
        fast = _sample_separable(vol, axes, grid, range(grid.n_slices), fill)
        slow = _sample_general(vol, grid, range(grid.n_slices), fill)
        np.testing.assert_allclose(fast, slow, atol=1e-3)


def test_oblique_volume_takes_the_general_path() -> None:
    from pipelines.models.clear.slices import _axis_aligned

    ct = _ct()
    a = np.radians(10.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ct.affine[:3, :3] = rot @ ct.affine[:3, :3]
    assert _axis_aligned(ct) is None
    stack = extract_slices(ct, None, PARAMS)
    s, r, c = _peak(stack.images[:, 0] - 0.5 * stack.images[:, 1])
    x, y, z = stack.grid.pixel_to_lps(s, r, c)
    mark = rot @ (np.array(MARK) - ct.affine[:3, 3]) + ct.affine[:3, 3]  # the rotated marker's position
    assert np.linalg.norm(np.array([x, y, z]) - mark) <= 8.0


def test_permuted_storage_axes_give_the_same_slices() -> None:
    """A volume stored with its i axis along patient z (and k along x) is re-ordered, not misread."""
    ref_ct = _ct()
    arr = np.ascontiguousarray(ref_ct.array.transpose(2, 1, 0))  # new [k, j, i] = old [i, j, k]
    aff = ref_ct.affine.copy()
    aff[:3, 0], aff[:3, 2] = ref_ct.affine[:3, 2], ref_ct.affine[:3, 0]
    permuted = Volume(arr, aff, frame_of_reference_uid="1.2.3")
    np.testing.assert_allclose(extract_slices(permuted, None, PARAMS).images, extract_slices(ref_ct, None, PARAMS).images,
                               atol=1e-5)  # fmt: skip
