"""MIP geometry: a point lesion projects where expected and back-projects to its 3-D position."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.dicom.volume import Volume
from pipelines.errors import GeometryError
from pipelines.render.mip import render_mip, render_mips, to_uint8

SHAPE_KJI = (30, 20, 16)  # k (z slices), j (rows), i (columns): non-cubic so a swapped axis shows


def _volume(affine: np.ndarray, lesion_ijk: tuple[int, int, int], *, background: float = 1.0) -> Volume:
    rng = np.random.default_rng(0)
    arr = (background * rng.random(SHAPE_KJI)).astype(np.float32)
    i, j, k = lesion_ijk
    arr[k, j, i] = 25.0
    return Volume(arr, affine, frame_of_reference_uid="1.2.3", series_instance_uid="1.2.3.4", modality="PT")


def _affine(columns: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = columns * np.asarray(spacing)[None, :]
    a[:3, 3] = origin
    return a


IDENTITY = _affine(np.eye(3), (2.0, 3.0, 4.0), (-100.0, -50.0, 200.0))
# i toward -x (right), j toward -y (anterior), k toward -z (feet first): every axis flipped.
FLIPPED = _affine(np.diag([-1.0, -1.0, -1.0]), (2.0, 3.0, 4.0), (100.0, 80.0, 300.0))
# Coronally stored: i → x, j → -z (rows run down), k → +y (slices front to back).
PERMUTED = _affine(np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]), (2.0, 3.0, 4.0), (-30.0, -60.0, 90.0))


def test_identity_point_lesion_projects_and_back_projects() -> None:
    lesion = (5, 7, 11)  # i, j, k
    vol = _volume(IDENTITY, lesion)
    lps = vol.index_to_lps(np.array(lesion))[0]
    cor = render_mip(vol, "coronal")
    nk, nj, ni = SHAPE_KJI
    assert cor.image.shape == (nk, ni)  # rows along z, columns along x
    row, col = np.unravel_index(np.argmax(cor.image), cor.image.shape)
    assert (row, col) == (nk - 1 - 11, 5)  # head (max z) at row 0, patient right (min x) at column 0
    assert cor.depth[row, col] == 7
    np.testing.assert_allclose(cor.pixel_to_lps(row, col), lps, atol=1e-9)
    np.testing.assert_allclose(cor.lps_to_pixel(lps), [row, col, 7], atol=1e-9)
    assert cor.pixel_spacing_mm == (4.0, 2.0)
    sag = render_mip(vol, "sagittal")
    assert sag.image.shape == (nk, nj)
    row, col = np.unravel_index(np.argmax(sag.image), sag.image.shape)
    assert (row, col) == (nk - 1 - 11, 7)  # anterior (min y) on the left
    assert sag.depth[row, col] == 5
    np.testing.assert_allclose(sag.pixel_to_lps(row, col), lps, atol=1e-9)


@pytest.mark.parametrize("affine", [FLIPPED, PERMUTED], ids=["flipped", "permuted"])
def test_flipped_and_permuted_inputs_give_the_same_view(affine: np.ndarray) -> None:
    """Where the peak appears is decided by patient coordinates, not by the storage order."""
    lesion = (3, 13, 21)
    vol = _volume(affine, lesion)
    lps = vol.index_to_lps(np.array(lesion))[0]
    for view in ("coronal", "sagittal"):
        mip = render_mip(vol, view)
        row, col = np.unravel_index(np.argmax(mip.image), mip.image.shape)
        back = mip.pixel_to_lps(row, col)
        np.testing.assert_allclose(back, lps, atol=1e-9)
        np.testing.assert_allclose(mip.pixel_to_index(row, col), lesion, atol=1e-9)
        # Display convention: moving one row down goes toward the feet; one column right goes to
        # patient left (coronal) / posterior (sagittal).
        step_row = mip.pixel_to_lps(row + 1, col, mip.depth[row, col]) - back
        step_col = mip.pixel_to_lps(row, col + 1, mip.depth[row, col]) - back
        assert step_row[2] < 0 and abs(step_row[0]) < 1e-9 and abs(step_row[1]) < 1e-9
        axis = 0 if view == "coronal" else 1
        assert step_col[axis] > 0 and abs(step_col[2]) < 1e-9


def test_flipped_storage_matches_identity_image() -> None:
    """The same patient-space scene stored with every axis reversed renders the identical MIP."""
    rng = np.random.default_rng(3)
    arr = rng.random(SHAPE_KJI).astype(np.float32)
    nk, nj, ni = SHAPE_KJI
    ident = Volume(arr, IDENTITY)
    flipped_aff = IDENTITY.copy()
    flipped_aff[:3, :3] = -IDENTITY[:3, :3]
    flipped_aff[:3, 3] = IDENTITY[:3, :3] @ np.array([ni - 1, nj - 1, nk - 1]) + IDENTITY[:3, 3]
    flipped = Volume(arr[::-1, ::-1, ::-1].copy(), flipped_aff)
    for view in ("coronal", "sagittal"):
        a, b = render_mip(ident, view), render_mip(flipped, view)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_allclose(a.affine[:3, :2], b.affine[:3, :2], atol=1e-12)


def test_render_mips_and_window() -> None:
    vol = _volume(IDENTITY, (1, 2, 3))
    both = render_mips(vol)
    assert set(both) == {"coronal", "sagittal"}
    assert both["coronal"].frame_of_reference_uid == "1.2.3"
    u8 = to_uint8(np.array([[-1.0, 0.0, 5.0, 10.0, 20.0, np.nan]]), 0.0, 10.0)
    assert u8.tolist() == [[0, 0, 128, 255, 255, 0]]  # 127.5 rounds half to even -> 128


def test_sheared_volume_refused() -> None:
    aff = IDENTITY.copy()
    aff[0, 2] = 2.0  # k step leans along x
    with pytest.raises(GeometryError):
        render_mip(Volume(np.zeros(SHAPE_KJI, np.float32), aff), "coronal")


def test_real_ge_pet_hottest_voxel_back_projects(data_dir) -> None:  # type: ignore[no-untyped-def]
    """Real GE PET (public STS_001): the MIP's brightest pixel returns to the hottest voxel's slice and position."""
    from pipelines.dicom.series import build_volume_report, read_headers

    headers = read_headers(sorted((data_dir / "pet-ge-sts001/raw_pet").glob("*.dcm")))
    vol = build_volume_report(headers).volume
    k, j, i = np.unravel_index(np.argmax(vol.array), vol.array.shape)
    hottest = vol.index_to_lps(np.array([i, j, k]))[0]
    for view in ("coronal", "sagittal"):
        mip = render_mip(vol, view)
        assert float(np.nanmax(mip.image)) == float(vol.array.max())
        row, col = np.unravel_index(np.argmax(mip.image), mip.image.shape)
        np.testing.assert_allclose(mip.pixel_to_lps(row, col), hottest, atol=1e-6)
        assert mip.pixel_to_lps(0, col)[2] > mip.pixel_to_lps(mip.image.shape[0] - 1, col)[2]  # head at the top
    # The back-projected z is the Image Position (Patient) z of the slice that holds the hottest voxel,
    # within the series' slice jitter (the volume sits on a uniform grid; no GE slice is > 0.05 mm off it).
    uid, _frame = vol.slice_sources[k]
    ds = next(h for h in headers if h.SOPInstanceUID == uid)
    assert abs(float(ds.ImagePositionPatient[2]) - hottest[2]) < 0.05


def test_plain_array_and_affine_for_the_console() -> None:
    """The console passes what it has (an array and an affine); the renderer imports no DICOM/ITK stack."""
    import subprocess
    import sys
    from types import SimpleNamespace

    vol = _volume(IDENTITY, (4, 5, 6))
    plain = render_mip(SimpleNamespace(array=vol.array, affine=vol.affine), "coronal")
    np.testing.assert_array_equal(plain.image, render_mip(vol, "coronal").image)
    code = "import sys, pipelines.render.mip; print(sorted(m for m in ('SimpleITK', 'pydicom', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
