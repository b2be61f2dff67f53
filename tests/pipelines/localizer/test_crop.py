"""Crop parity with an independent implementation of the contract (HCL-AL, Gao et al. 2025).

The reference implementation below does not use SimpleITK for resampling: it maps every
output voxel centre (origin ``c − size·spacing/2``, identity direction, ``[x, y, z]`` order)
to the source's continuous index through the inverse affine, treats indices outside
``[−½, n−½)`` as outside (value 0), and interpolates with clamped trilinear weights or
round-half-up nearest neighbour, which is ITK's ``ResampleImageFilter`` rule set.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines.models.checkpoints import Normalizer
from pipelines.models.localizer.crop import (
    CropGeometry,
    crop_around,
    crop_origin,
    normalize,
    outside_fraction,
    to_xyz,
)


def make_image(arr_zyx: np.ndarray, spacing, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx.astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction))
    return img


def reference_crop(arr_zyx, spacing, origin, direction, centre, crop_spacing, crop_size, method, f32_centre=True):
    """Straightforward numpy implementation of the contract; returns ``[x, y, z]`` float64."""
    c = np.asarray(centre, dtype=np.float32 if f32_centre else np.float64).astype(np.float64)
    sp_out = np.asarray(crop_spacing, dtype=np.float64)
    n_out = np.asarray(crop_size)
    o_out = c - n_out * sp_out / 2
    axes = [o_out[a] + np.arange(n_out[a]) * sp_out[a] for a in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # [x, y, z, 3] LPS
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    cidx = ((pts - np.asarray(origin)) @ d) / np.asarray(spacing)  # continuous (i, j, k)
    size = np.array(arr_zyx.shape[::-1])  # (ni, nj, nk)
    inside = np.all((cidx >= -0.5) & (cidx < size - 0.5), axis=-1)
    vol = arr_zyx.transpose(2, 1, 0).astype(np.float64)  # [i, j, k]
    if method == "nn":
        idx = np.clip(np.floor(cidx + 0.5).astype(int), 0, size - 1)
        out = vol[idx[..., 0], idx[..., 1], idx[..., 2]]
    else:
        ci = np.clip(cidx, 0, size - 1)
        base = np.minimum(np.floor(ci).astype(int), size - 1)
        frac = ci - base
        out = np.zeros(ci.shape[:-1])
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    off = np.array([dx, dy, dz])
                    ii = np.minimum(base + off, size - 1)
                    w = np.prod(np.where(off == 1, frac, 1 - frac), axis=-1)
                    out += w * vol[ii[..., 0], ii[..., 1], ii[..., 2]]
    return np.where(inside, out, 0.0)


DIRECTIONS = {"identity": (1, 0, 0, 0, 1, 0, 0, 0, 1), "flipped": (-1, 0, 0, 0, -1, 0, 0, 0, 1)}


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, tuple, tuple]:
    rng = np.random.default_rng(7)
    arr = rng.normal(0, 400, size=(23, 31, 37)).astype(np.float32)  # z, y, x (anisotropic grid)
    return arr, (1.37, 1.37, 3.3), (-20.3, 11.1, -40.7)


@pytest.mark.parametrize("direction", ["identity", "flipped"])
@pytest.mark.parametrize("method", ["linear", "nn"])
@pytest.mark.parametrize("where", ["inside", "edge"])
def test_crop_matches_independent_implementation(source, direction: str, method: str, where: str) -> None:
    arr, spacing, origin = source
    d = DIRECTIONS[direction]
    img = make_image(arr, spacing, origin, d)
    lo = np.array(img.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0)))
    hi = np.array(img.TransformContinuousIndexToPhysicalPoint(tuple(float(n - 1) for n in img.GetSize())))
    mid = (lo + hi) / 2
    centre = mid + np.array([0.731, -1.117, 0.413]) if where == "inside" else np.maximum(lo, hi) - np.array([3.19, 2.71, 4.07])
    geom = CropGeometry((2.0, 2.0, 3.0), (16, 16, 16))
    for compat in (True, False):
        got = to_xyz(crop_around(img, centre, geom, method, compat=compat))
        want = reference_crop(arr, spacing, origin, d, centre, geom.spacing, geom.size, method, f32_centre=compat)
        assert got.shape == (16, 16, 16)
        if method == "nn":
            np.testing.assert_array_equal(got, want.astype(np.float32))
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
        if where == "edge":
            assert (want == 0).mean() > 0.2  # part of the crop is outside and 0-filled


def test_compat_origin_rounds_centre_to_float32() -> None:
    geom = CropGeometry((2.0, 2.0, 3.0), (96, 96, 128))
    centre = (123.456789012, -87.654321098, 1034.000123456)
    compat = crop_origin(centre, geom, compat=True)
    exact = crop_origin(centre, geom, compat=False)
    assert compat == tuple(float(np.float32(c)) - n * s / 2 for c, n, s in zip(centre, geom.size, geom.spacing))
    assert exact == tuple(c - n * s / 2 for c, n, s in zip(centre, geom.size, geom.spacing))
    assert compat != exact


@pytest.mark.parametrize(("size", "spacing"), [((96, 96, 128), (2.0, 2.0, 3.0)), ((64, 64, 64), (1.5, 1.5, 1.5))])
def test_marker_lands_at_expected_xyz_index(size, spacing) -> None:
    """A voxel at a known LPS point appears at ``[x, y, z] = size/2 + offset/spacing`` (−½-voxel convention)."""
    sp = np.array(spacing)
    src = np.zeros((160, 120, 140), dtype=np.float32)  # z, y, x, on a grid aligned with the crop
    src_origin = np.array([-100.0, -90.0, -200.0])
    centre = src_origin + np.array([70, 60, 80]) * sp
    offset = np.array([5, -7, 11])  # in crop voxels, along x, y, z
    marker_ijk = np.array([70, 60, 80]) + offset
    src[marker_ijk[2], marker_ijk[1], marker_ijk[0]] = 1.0
    img = make_image(src, sp, src_origin)
    for method in ("nn", "linear"):
        crop = to_xyz(crop_around(img, centre, CropGeometry(tuple(spacing), size), method, compat=True))
        assert crop.shape == size
        hit = np.argwhere(crop > 0.5)
        assert hit.tolist() == [list(np.array(size) // 2 + offset)]


def test_normalization() -> None:
    ct = np.array([-1000, -160, 40, 240, 3000], dtype=np.float32)
    out = normalize(ct, Normalizer(40, 200, True))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1, -1, 0, 1, 1], atol=1e-6)
    suv = np.array([0, 3, 30], dtype=np.float32)
    np.testing.assert_allclose(normalize(suv, Normalizer(3, 3, False)), [-1, 0, 9], rtol=1e-6)
    mask = np.array([0, 1, 2], dtype=np.float32)
    np.testing.assert_array_equal(normalize(mask, Normalizer(0, 1, False)), mask)
    assert normalize(np.array([1.0], np.float32), Normalizer(0, 1e-8, False))[0] == np.float32(1 / 2e-8)


@pytest.mark.parametrize("direction", ["identity", "flipped"])
def test_outside_fraction_counts_zero_filled_voxels(source, direction: str) -> None:
    arr, spacing, origin = source
    img = make_image(np.ones_like(arr), spacing, origin, DIRECTIONS[direction])
    lo = np.array(img.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0)))
    hi = np.array(img.TransformContinuousIndexToPhysicalPoint(tuple(float(n - 1) for n in img.GetSize())))
    geom = CropGeometry((2.0, 2.0, 3.0), (16, 16, 16))
    for centre in ((lo + hi) / 2, np.maximum(lo, hi) - 3.3, np.maximum(lo, hi) + 100):
        o = crop_origin(centre, geom, compat=False)
        filled = to_xyz(crop_around(img, centre, geom, "nn", compat=False))
        assert outside_fraction([img], o, geom) == pytest.approx(float((filled == 0).mean()))
    # oblique direction takes the per-point path and agrees too
    rot = sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix()
    obl = make_image(np.ones_like(arr), spacing, origin, rot)
    centre = np.array(obl.TransformContinuousIndexToPhysicalPoint((30.0, 25.0, 20.0)))
    o = crop_origin(centre, geom, compat=False)
    filled = to_xyz(crop_around(obl, centre, geom, "nn", compat=False))
    assert outside_fraction([obl], o, geom) == pytest.approx(float((filled == 0).mean()))
