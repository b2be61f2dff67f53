"""Volume building from real and synthetic series: ordering, checks, rescale, multi-frame, JPEG 2000, tilt."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import map_coordinates

from pipelines.dicom.series import (
    analyse_geometry,
    build_volume,
    build_volume_report,
    load_slices,
    read_headers,
)
from pipelines.errors import GeometryError, InputError


# ---------------------------------------------------------------------------------------
# synthetic CT slices
# ---------------------------------------------------------------------------------------
def _ct_slice(
    position: tuple[float, float, float],
    values: np.ndarray,
    *,
    series_uid: str,
    for_uid: str,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (2.0, 1.5),
    slope: float = 1.0,
    intercept: float = -1024.0,
    instance_number: int = 1,
) -> Dataset:
    """A small in-memory CT Image with stored values ``(values - intercept) / slope``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = "CT"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.7f}" for v in orientation]
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    stored = np.round((values - intercept) / slope).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def _stack(zs: list[float], shape: tuple[int, int] = (4, 5), **kw: object) -> list[Dataset]:
    series_uid, for_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    return [
        _ct_slice((10.0, 20.0, z), rng.integers(-1000, 1000, shape).astype(float), series_uid=series_uid,
                  for_uid=for_uid, instance_number=i + 1, **kw)  # type: ignore[arg-type]
        for i, z in enumerate(zs)
    ]


# ---------------------------------------------------------------------------------------
# ordering, affine, rescale
# ---------------------------------------------------------------------------------------
def test_sorted_along_normal_not_instance_number() -> None:
    dss = _stack([0.0, 5.0, 10.0, 15.0])
    # instance numbers deliberately contradict the positions
    for ds, n in zip(dss, [3, 1, 4, 2], strict=True):
        ds.InstanceNumber = n
    shuffled = dss[:]
    random.Random(1).shuffle(shuffled)
    vol = build_volume(shuffled)
    assert vol.slice_sources == tuple((ds.SOPInstanceUID, None) for ds in dss)
    for k, ds in enumerate(dss):
        expected = ds.pixel_array.astype(np.float32) - 1024.0
        np.testing.assert_array_equal(vol.array[k], expected)
    # index (0,0,k) is the IPP of slice k; column spacing along i, row spacing along j
    np.testing.assert_allclose(vol.index_to_lps([[0, 0, 2]])[0], [10.0, 20.0, 10.0])
    np.testing.assert_allclose(vol.index_to_lps([[1, 0, 0]])[0], [11.5, 20.0, 0.0])
    np.testing.assert_allclose(vol.index_to_lps([[0, 1, 0]])[0], [10.0, 22.0, 0.0])
    assert vol.array.dtype == np.float32
    assert vol.modality == "CT"


def test_feet_first_normal_sorts_descending_z() -> None:
    # row cosine (1,0,0), column cosine (0,-1,0): normal (0,0,-1), slices ascend along -z
    dss = _stack([0.0, 5.0, 10.0], orientation=(1, 0, 0, 0, -1, 0))
    vol = build_volume(dss)
    assert vol.slice_sources[0][0] == dss[2].SOPInstanceUID
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, -5.0])
    np.testing.assert_allclose(vol.origin, [10.0, 20.0, 10.0])


def test_phantom_single_frame(data_dir: Path) -> None:
    paths = sorted((data_dir / "seg-ct-liver3slice-multivendor/phantom_23x38x3/image").glob("*.dcm"))
    headers = read_headers(paths)
    assert all("PixelData" not in ds for ds in headers)  # pixels are read later from the files
    vol = build_volume(headers)
    assert vol.array.shape == (3, 38, 23)
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag([0.7, 0.7, 2.5]))
    np.testing.assert_allclose(vol.origin, [46.4649, 5.01881, -177.75])
    by_uid = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in paths)}
    for k, (uid, frame) in enumerate(vol.slice_sources):
        assert frame is None
        ds = by_uid[uid]
        np.testing.assert_allclose(vol.index_to_lps([[0, 0, k]])[0], [float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_array_equal(
            vol.array[k], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        )


def test_legacy_converted_multiframe_matches_single_frames(data_dir: Path) -> None:
    base = data_dir / "seg-ct-liver3slice-multivendor/phantom_23x38x3"
    single = build_volume(read_headers(sorted((base / "image").glob("*.dcm"))))
    mf_path = base / "multiframe/mf.dcm"
    multi = build_volume(read_headers([mf_path]))
    np.testing.assert_allclose(multi.affine, single.affine)
    np.testing.assert_array_equal(multi.array, single.array)
    mf = pydicom.dcmread(mf_path, stop_before_pixels=True)
    # frames are stored top-down (frame 1 at z -177.75 ... frame 3 at -172.75): sources follow position
    zs = [float(mf.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence[0].ImagePositionPatient[2])
          for _, f in multi.slice_sources]
    assert zs == sorted(zs)
    assert {uid for uid, _ in multi.slice_sources} == {mf.SOPInstanceUID}
    # each frame's source instance (Conversion Source Attributes) is the single-frame slice at that k
    conv = [mf.PerFrameFunctionalGroupsSequence[f - 1].ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID
            for _, f in multi.slice_sources]
    assert conv == [uid for uid, _ in single.slice_sources]


def test_per_slice_rescale_slope(data_dir: Path) -> None:
    paths = sorted((data_dir / "suv-dro/DRO/DRO_1_0/PT").glob("*.dcm"))
    headers = read_headers(paths)
    slopes = {float(ds.RescaleSlope) for ds in headers}
    assert slopes == {3.0, 4.0}
    vol = build_volume(headers)
    by_uid = {ds.SOPInstanceUID: p for ds, p in zip(headers, paths, strict=True)}
    for k, (uid, _) in enumerate(vol.slice_sources):
        ds = pydicom.dcmread(by_uid[uid])
        np.testing.assert_array_equal(vol.array[k], (ds.pixel_array * float(ds.RescaleSlope)).astype(np.float32))


def test_jpeg2000_series_with_explicitly_repaired_uids(data_dir: Path) -> None:
    paths = sorted((data_dir / "totalseg-example/example_ct_dicom").glob("*.dcm"))
    headers = read_headers(paths)
    with pytest.raises(InputError) as err:
        build_volume(headers)
    assert err.value.code == "missing_uid"
    # the test repairs the empty Type 1 UIDs itself (file meta SOP UID, one new series UID)
    series_uid = generate_uid()
    for ds in headers:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
    assert str(headers[0].file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"
    vol = build_volume(headers)
    assert vol.array.shape == (20, 512, 512)
    np.testing.assert_allclose(vol.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    np.testing.assert_allclose(vol.origin, (-249.51, -437.51, -804.5), atol=0.01)
    assert float(vol.array.min()) == -1024.0
    assert float(vol.array.max()) == 1839.0


# ---------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------
def _code(dss: list[Dataset], **kw: object) -> str:
    with pytest.raises(InputError) as err:
        build_volume(dss, **kw)  # type: ignore[arg-type]
    return err.value.code


def test_duplicate_positions_refused() -> None:
    dss = _stack([0.0, 5.0, 5.0, 10.0])
    assert _code(dss) == "duplicate_slice_positions"


def test_missing_slice_refused_with_gap_in_reason() -> None:
    dss = _stack([0.0, 5.0, 10.0, 20.0, 25.0])
    with pytest.raises(GeometryError) as err:
        build_volume(dss)
    assert err.value.code == "irregular_slice_spacing"
    assert "10.000 mm" in err.value.reason


def test_small_position_jitter_is_tolerated_and_flagged(data_dir: Path) -> None:
    # GE Discovery ST: one 3.19 mm and four 3.29 mm gaps among 3.27 mm ones; no slice >0.05 mm off the grid
    headers = read_headers(sorted((data_dir / "pet-ge-sts001/raw_pet").glob("*.dcm")))
    geo = analyse_geometry(headers)
    assert geo.gaps_mm.min() == pytest.approx(3.19, abs=1e-3)
    built = build_volume_report(headers)
    assert built.volume.array.shape == (267, 128, 128)
    assert built.volume.spacing[2] == pytest.approx(3.27, abs=1e-4)
    assert [f.code for f in built.flags] == ["slice_spacing_jitter"]


def test_mixed_inputs_refused() -> None:
    dss = _stack([0.0, 5.0, 10.0])
    other = _stack([15.0])
    assert _code(dss + other) == "mixed_series"

    dss = _stack([0.0, 5.0, 10.0])
    dss[1].ImageOrientationPatient = [1, 0, 0, 0, 0.99, 0.141]
    assert _code(dss) == "mixed_orientation"

    dss = _stack([0.0, 5.0, 10.0])
    dss[2].FrameOfReferenceUID = generate_uid()
    assert _code(dss) == "mixed_frame_of_reference"

    dss = _stack([0.0, 5.0, 10.0])
    dss[0].PixelSpacing = [2.0, 1.0]
    assert _code(dss) == "mixed_pixel_spacing"

    dss = _stack([0.0, 5.0, 10.0])
    dss[1].SOPInstanceUID = ""
    assert _code(dss) == "missing_uid"

    dss = _stack([0.0, 5.0])
    del dss[0].FrameOfReferenceUID
    assert _code(dss) == "missing_frame_of_reference"

    assert _code([]) == "empty_series"


def test_headers_without_file_cannot_give_pixels() -> None:
    dss = _stack([0.0, 5.0])
    del dss[0].PixelData
    assert _code(dss) == "pixels_unavailable"


# ---------------------------------------------------------------------------------------
# resampling: exact on a linear field, real gantry-tilt CT
# ---------------------------------------------------------------------------------------
def _field(lps: np.ndarray) -> np.ndarray:
    return 2.0 * lps[..., 0] - 3.0 * lps[..., 1] + 5.0 * lps[..., 2] + 7.0


def _sheared_linear_stack(distances: list[float], tilt_deg: float) -> list[Dataset]:
    """Slices of a tilted gantry: tilted orientation, origins moving along z only (as GE writes them)."""
    t = np.radians(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(t), -np.sin(t)])
    normal = np.cross(row, col)
    spacing = (1.25, 1.0)  # (between rows, between columns)
    rows, cols = 12, 10
    series_uid, for_uid = generate_uid(), generate_uid()
    out = []
    for i, d in enumerate(distances):
        ipp = np.array([-5.0, 3.0, 0.0]) + np.array([0.0, 0.0, d / normal[2]])  # along z, distance d on the normal
        jj, ii = np.mgrid[0:rows, 0:cols]
        lps = ipp + ii[..., None] * row * spacing[1] + jj[..., None] * col * spacing[0]
        out.append(_ct_slice(tuple(ipp), _field(lps), series_uid=series_uid, for_uid=for_uid,
                             orientation=(*row, *col), spacing=spacing, slope=0.01, intercept=0.0,
                             instance_number=i + 1))
        out[-1].GantryDetectorTilt = tilt_deg
    return out


def test_tilt_resample_reproduces_linear_field_exactly() -> None:
    dists = [0.0, 3.0, 6.0, 9.0, 10.5, 15.5, 20.5]  # non-uniform, as in ct-gantry-tilt
    dss = _sheared_linear_stack(dists, 20.0)
    with pytest.raises(GeometryError) as err:
        build_volume(dss, tilt="refuse")
    assert err.value.code == "gantry_tilt"
    assert "20.00 deg" in err.value.reason

    built = build_volume_report(dss, tilt="resample", fill_value=float("nan"))
    vol = built.volume
    assert built.resampled and vol.is_orthogonal()
    assert vol.slice_sources == ()
    assert {f.code for f in built.flags} == {"gantry_tilt_resampled", "irregular_spacing_resampled"}
    assert built.geometry.shear_angle_deg == pytest.approx(20.0, abs=1e-3)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij")
    lps = vol.index_to_lps(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))
    values = vol.array.ravel()
    assert np.isfinite(values).mean() > 0.5
    # voxels within the pixel-centre extent of every input slice (beyond it ITK's linear
    # interpolator holds the border value for the last half pixel)
    geo = built.geometry
    rel = lps - geo.refs[0].position
    u, v = rel @ geo.row_cosine, rel @ geo.column_cosine
    offs = geo.inplane_offsets_mm
    inside = (
        (u >= offs[:, 0].max() - 1e-6) & (u <= offs[:, 0].min() + 9 * 1.0 + 1e-6)
        & (v >= offs[:, 1].max() - 1e-6) & (v <= offs[:, 1].min() + 11 * 1.25 + 1e-6)
    )
    assert inside.sum() > 100
    assert np.all(np.isfinite(values[inside]))
    # linear interpolation reproduces a linear field: every such voxel holds f(its LPS position)
    np.testing.assert_allclose(values[inside], _field(lps[inside]), atol=0.02)
    # every input slice's origin lies on the output grid's planes
    for ds, d in zip(dss, dists, strict=True):
        idx = vol.lps_to_index([[float(v) for v in ds.ImagePositionPatient]])[0]
        assert idx[2] * vol.spacing[2] == pytest.approx(d, abs=1e-6)


def test_irregular_resample_on_request_only() -> None:
    series_uid, for_uid = generate_uid(), generate_uid()
    zs = [0.0, 2.0, 4.0, 8.0, 10.0]  # one missing slice at 6
    jj, ii = np.mgrid[0:4, 0:5]
    dss = []
    for z in zs:
        lps = np.stack([ii * 1.5, jj * 2.0, np.full(ii.shape, z)], axis=-1)
        dss.append(_ct_slice((0.0, 0.0, z), _field(lps), series_uid=series_uid, for_uid=for_uid,
                             slope=0.01, intercept=0.0))
    assert _code(dss) == "irregular_slice_spacing"
    flags: list = []
    vol = build_volume(dss, irregular="resample", flags=flags)
    assert [f.code for f in flags] == ["irregular_spacing_resampled"]
    assert vol.array.shape == (6, 4, 5)
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 2.0])
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij")
    lps = vol.index_to_lps(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))
    np.testing.assert_allclose(vol.array.ravel(), _field(lps), atol=0.02)


def test_real_gantry_tilt_ct(data_dir: Path) -> None:
    headers = read_headers(sorted((data_dir / "ct-gantry-tilt/In_GE").glob("*.dcm")))
    with pytest.raises(GeometryError) as err:
        build_volume(headers, tilt="refuse")
    assert err.value.code == "gantry_tilt"
    assert "+18.50" in err.value.reason

    built = build_volume_report(headers, tilt="resample")
    vol, geo = built.volume, built.geometry
    assert geo.sheared and not geo.regular
    assert geo.shear_angle_deg == pytest.approx(18.5, abs=0.01)
    assert vol.is_orthogonal()
    np.testing.assert_allclose(vol.direction[:, 2], [0, 0.317305, 0.948324], atol=1e-5)
    # 13 x 4.002 + 1.081 + 13 x 6.999 mm along the normal, sampled at the median gap
    span = float(geo.distances_mm[-1])
    assert span == pytest.approx(13 * 4.002 + 1.081 + 13 * 6.999, abs=0.05)
    assert (vol.array.shape[0] - 1) * vol.spacing[2] == pytest.approx(span, abs=1e-6)
    assert vol.spacing[2] == pytest.approx(4.0, abs=0.01)

    stack = load_slices(geo.refs)
    r0 = geo.refs[0]
    idx0 = vol.lps_to_index([r0.position])[0]
    np.testing.assert_allclose(idx0, np.round(idx0), atol=1e-6)  # first slice lies on the output lattice
    i0, j0, k0 = np.round(idx0).astype(int)
    assert k0 == 0
    np.testing.assert_allclose(vol.array[0, j0:j0 + 512, i0:i0 + 512], stack[0], atol=1e-3)

    # other slices: sample the output where each input pixel physically is; the mirrored shear must not fit
    jj, ii = np.mgrid[64:448:8, 64:448:8]
    for k in (5, 13, 20):
        r = geo.refs[k]
        lps = (r.position + ii.reshape(-1, 1) * geo.row_cosine * r.pixel_spacing[1]
               + jj.reshape(-1, 1) * geo.column_cosine * r.pixel_spacing[0])
        mirrored = lps - 2 * geo.inplane_offsets_mm[k, 1] * geo.column_cosine
        ref = stack[k][jj, ii].ravel()

        def sample(points: np.ndarray) -> np.ndarray:
            idx = vol.lps_to_index(points)
            return map_coordinates(vol.array, [idx[:, 2], idx[:, 1], idx[:, 0]], order=1, mode="nearest")

        right = np.median(np.abs(sample(lps) - ref))
        wrong = np.median(np.abs(sample(mirrored) - ref))
        assert right < 5.0, (k, right)
        assert wrong > 3 * right + 5.0, (k, right, wrong)
