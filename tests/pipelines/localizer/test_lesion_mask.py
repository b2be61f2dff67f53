"""Boxes (B1/B2) and the lesion-mask channel (§5, B5–B8) in hcl-al and corrected modes."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pipelines.models.localizer.crop import CropGeometry
from pipelines.models.localizer.lesion_mask import (
    LesionBox,
    box_iou,
    corrected_mask_channel,
    exact_box,
    reference_box,
    reference_dilate,
    reference_mask_channel,
)


def image(arr_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def test_reference_box_has_half_voxel_bias_and_exact_box_does_not() -> None:
    arr = np.zeros((20, 30, 40))
    arr[5:8, 10:14, 20:26] = 3  # z 5..7, y 10..13, x 20..25
    img = image(arr, (0.8, 0.9, 2.5), (-10.0, 5.0, 100.0))
    ref, exact = reference_box(img, 3), exact_box(img, 3)
    sp = np.array([0.8, 0.9, 2.5])
    lo, hi = np.array([20, 10, 5]), np.array([25, 13, 7])
    np.testing.assert_allclose(exact.centre, np.array([-10, 5, 100]) + (lo + hi) / 2 * sp)
    np.testing.assert_allclose(ref.centre, np.array(exact.centre) + sp / 2)  # B1: +½ voxel
    np.testing.assert_allclose(ref.size, (hi - lo + 1) * sp)
    np.testing.assert_allclose(exact.size, (hi - lo + 1) * sp)
    assert reference_box(img, 7) is None


def test_flipped_direction_reference_centre_is_wrong_and_exact_is_right() -> None:
    arr = np.zeros((20, 30, 40))
    arr[5:8, 10:14, 20:26] = 1
    sp = np.array([1.5, 1.5, 2.0])
    origin = np.array([100.0, 80.0, -50.0])
    img = image(arr, tuple(sp), tuple(origin), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    lo, hi = np.array([20, 10, 5]), np.array([25, 13, 7])
    # voxel centres in LPS: x = 100 − 1.5 i, y = 80 − 1.5 j, z = −50 + 2 k
    true_centre = origin + np.array([-1, -1, 1]) * (lo + hi) / 2 * sp
    np.testing.assert_allclose(exact_box(img).centre, true_centre)
    ref = reference_box(img, 1)
    # B2: corner + |size|/2 walks the wrong way along flipped axes: off by (size − ½ voxel) there
    size = (hi - lo + 1) * sp
    expected = origin + np.array([-1, -1, 1]) * lo * sp + size / 2
    np.testing.assert_allclose(ref.centre, expected)
    err = np.array(ref.centre) - true_centre
    np.testing.assert_allclose(err[:2], size[:2] - sp[:2] / 2)
    np.testing.assert_allclose(err[2], sp[2] / 2)


def test_box_iou() -> None:
    a = np.array([0, 0, 0, 2, 2, 2.0])
    assert box_iou(a, a) == 1.0
    assert box_iou(a, np.array([1, 0, 0, 2, 2, 2.0])) == 4 / 12
    assert box_iou(a, np.array([5, 0, 0, 2, 2, 2.0])) == 0.0


GEOM = CropGeometry((4.0, 4.0, 4.0), (16, 16, 16))


def test_touching_lesions_merge_in_compat_only() -> None:
    arr = np.zeros((64, 64, 64))
    arr[28:36, 28:36, 24:32] = 1
    arr[28:36, 28:36, 32:40] = 2  # touches lesion 1 along x
    img = image(arr)
    centre = reference_box(img, 1).centre
    compat = reference_mask_channel(img, centre, reference_box(img, 1).as_array(), GEOM)
    corrected = corrected_mask_channel(sitk.Cast(img == 1, sitk.sitkUInt8), exact_box(img, 1).centre, GEOM)
    assert compat.matched and corrected.matched and not compat.fallback_used
    assert compat.values.sum() == 2 * corrected.values.sum() > 0  # B7: both lesions in the channel
    assert set(np.unique(compat.values)) == {0.0, 1.0}


def test_iou_picks_the_queried_lesion() -> None:
    arr = np.zeros((64, 64, 64))
    arr[24:32, 24:32, 20:28] = 1
    arr[24:32, 24:32, 40:48] = 2
    img = image(arr)
    for lab, xs in ((1, slice(20, 28)), (2, slice(40, 48))):
        box = reference_box(img, lab)
        ch = reference_mask_channel(img, box.centre, box.as_array(), GEOM)
        # crop voxel x index of world x: (x − (c − 32)) / 4
        o = np.array(box.centre) - 32
        world_x = o[0] + 4 * np.argwhere(ch.values > 0)[:, 0]
        assert ch.values.sum() > 0 and np.all((world_x >= xs.start) & (world_x < xs.stop))


def _tiny_lesion(geom: CropGeometry):
    """One 1-mm voxel at p, seen by the half-spacing grid but missed at model spacing (z off by 2 mm)."""
    arr = np.zeros((100, 80, 80))
    p = np.array([40.0, 40.0, 50.0])
    arr[50, 40, 40] = 5
    centre = p + np.array([0.0, 0.0, 2.0])
    query = np.array([*centre, 3.0, 3.0, 3.0])
    return image(arr), centre, query


def test_tiny_lesion_fallback_non_cubic_compat_quirk_gives_empty_channel() -> None:
    geom = CropGeometry((4.0, 4.0, 4.0), (16, 16, 32))
    img, centre, query = _tiny_lesion(geom)
    compat = reference_mask_channel(img, centre, query, geom)
    assert compat.matched and compat.fallback_used and compat.values.sum() == 0  # quirk: dilation misses
    corrected = corrected_mask_channel(sitk.Cast(img > 0, sitk.sitkUInt8), centre, geom)
    assert corrected.matched and corrected.fallback_used
    assert sorted(map(tuple, np.argwhere(corrected.values > 0))) == [(8, 8, 15), (8, 8, 16)]


def test_tiny_lesion_fallback_cubic_compat_dilates_inside_its_box() -> None:
    geom = CropGeometry((4.0, 4.0, 4.0), (16, 16, 16))
    img, centre, query = _tiny_lesion(geom)
    compat = reference_mask_channel(img, centre, query, geom)
    assert compat.fallback_used and np.argwhere(compat.values > 0).tolist() == [[8, 8, 8]]
    corrected = corrected_mask_channel(sitk.Cast(img > 0, sitk.sitkUInt8), centre, geom)
    assert sorted(map(tuple, np.argwhere(corrected.values > 0))) == [(8, 8, 7), (8, 8, 8)]


def test_reference_dilate_reads_box_in_xyz_order() -> None:
    a = np.zeros((10, 6, 6), dtype=np.int32)  # z, y, x
    a[8, 3, 3] = 1  # xyz box (3,3,8) → the reference dilates z∈[2,4], y∈[2,4], x∈[7,9]: nothing there
    np.testing.assert_array_equal(reference_dilate(a), a)
    b = np.zeros((6, 6, 6), dtype=np.int32)
    b[3, 3, 3] = 1
    assert reference_dilate(b).sum() == 7  # symmetric case: full 6-neighbourhood


def test_no_match_leaves_other_component_ids_in_compat_and_zero_in_corrected() -> None:
    """B6: two blocks joined by a bridge only the half-spacing grid sees; the query matches nothing."""
    arr = np.zeros((64, 64, 64))
    arr[20:32, 20:32, 20:28] = 1  # A  (z, y, x)
    arr[20:32, 20:32, 36:44] = 2  # B
    arr[26, 26, 28:36] = 3  # 1-mm bridge at y = z = 26 (sampled at 2 mm, not at 4 mm)
    img = image(arr)
    centre = np.array([32.0, 32.0, 40.0])
    query = np.array([*centre, 1.0, 1.0, 1.0])
    ch = reference_mask_channel(img, centre, query, GEOM)
    assert not ch.matched and ch.fallback_used and ch.residual
    assert set(np.unique(ch.values)) == {0.0, 2.0}  # B's component id survives, not binarised
    lesion_elsewhere = np.zeros((100, 100, 100))
    lesion_elsewhere[90, 90, 90] = 1  # outside the 64-mm crop
    corr = corrected_mask_channel(sitk.Cast(image(lesion_elsewhere) > 0, sitk.sitkUInt8), centre, GEOM)
    assert not corr.matched and corr.values.sum() == 0 and corr.values.shape == (16, 16, 16)


def test_mask_mode_target_label_binarises_original_labels() -> None:
    """B5: the coarse stage of the reference mask mode binarises the original label value."""
    arr = np.zeros((64, 64, 64))
    arr[28:36, 28:36, 24:32] = 7
    arr[28:36, 28:36, 32:40] = 9
    img = image(arr)
    box = reference_box(img, 7)
    ch = reference_mask_channel(img, box.centre, box.as_array(), GEOM, target_label=7)
    merged = reference_mask_channel(img, box.centre, box.as_array(), GEOM)
    assert 0 < ch.values.sum() < merged.values.sum()
    assert reference_mask_channel(img, box.centre, box.as_array(), GEOM, target_label=1).values.sum() == 0


def test_lesion_box_array() -> None:
    b = LesionBox((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert b.as_array().tolist() == [1, 2, 3, 4, 5, 6]
