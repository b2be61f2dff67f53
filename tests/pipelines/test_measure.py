"""Lesion measurements (pipelines.dicom.measure) on synthetic PET/CT series with known answers.

The series are real DICOM datasets (PET Image Storage / CT Image Storage written with
pydicom), stacked with :func:`pipelines.dicom.series.build_volume`, and the SEGs are
written by highdicom from a known mask, so the whole path (DICOM geometry -> Volume ->
SEG -> mask on the PET grid -> numbers) is exercised.  Expected values are derived
analytically from the phantom, not from the code under test.
"""

from __future__ import annotations

import io
import math

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipelines.dicom.measure import (
    SUVPEAK_RADIUS_MM,
    bounding_box_mm,
    measure_lesions,
    sphere_kernel,
    suv_peak_at,
)
from pipelines.dicom.seg import read_segments
from pipelines.dicom.series import build_volume
from pipelines.dicom.volume import Volume
from pipelines.errors import SegmentationError

PET_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.128"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
IDENTITY = np.eye(3)
FLIPPED = np.diag([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------
# Synthetic DICOM series and SEGs
# ---------------------------------------------------------------------------------------
def make_series(values: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float],
                direction: np.ndarray, *, modality: str, study_uid: str, for_uid: str,
                slope: float = 1.0, intercept: float = 0.0) -> list[Dataset]:
    """One single-frame image per slice of ``values[k, j, i]``.

    ``spacing`` is (column step, row step, slice step) in mm, ``direction`` the 3x3 matrix
    whose columns are the i, j, k unit vectors in LPS (row cosine, column cosine, normal).
    Stored pixel = round((value - intercept) / slope) as 16-bit signed.
    """
    series_uid = generate_uid()
    out = []
    d = np.asarray(direction, float)
    for k in range(values.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop_class = PET_SOP_CLASS if modality == "PT" else CT_SOP_CLASS
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.Modality = modality
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Locus", "PHANTOM", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "100000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 1 if modality == "PT" else 2, k + 1
        ds.Manufacturer = "Locus test"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [float(v) for v in (*d[:, 0], *d[:, 1])]
        pos = np.asarray(origin) + d[:, 2] * spacing[2] * k
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # [row spacing, column spacing]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = values.shape[1], values.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if modality == "PT":
            ds.Units = "GML"
        stored = np.round((values[k] - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def make_seg(source: list[Dataset], masks: dict[int, np.ndarray], *, omit_empty_frames: bool = True,
             tracking: dict[int, tuple[str, str]] | None = None) -> Dataset:
    """A BINARY SEG written by highdicom; ``masks[n][k, j, i]`` on the grid of ``source``."""
    descs = []
    for n in sorted(masks):
        kw = {}
        if tracking and n in tracking:
            kw = {"tracking_id": tracking[n][0], "tracking_uid": tracking[n][1]}
        descs.append(hd.seg.SegmentDescription(
            segment_number=n, segment_label=f"lesion {n}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            **kw))
    pixel = np.stack([masks[n] for n in sorted(masks)], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=10, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Locus test", manufacturer_model_name="phantom", software_versions="1",
        device_serial_number="1", omit_empty_frames=omit_empty_frames)
    buf = io.BytesIO()
    seg.save_as(buf)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def affine_of(spacing: tuple[float, float, float], origin: tuple[float, float, float], direction: np.ndarray
              ) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(direction, float) * np.asarray(spacing)[None, :]
    a[:3, 3] = origin
    return a


# ---------------------------------------------------------------------------------------
# SUVpeak kernel
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [(4.0, 4.0, 4.0), (2.0, 2.0, 3.27), (4.6875, 4.6875, 3.27), (1.0, 1.0, 1.0)])
def test_sphere_kernel_is_one_millilitre(spacing: tuple[float, float, float]) -> None:
    assert pytest.approx((3000 / (4 * math.pi)) ** (1 / 3)) == SUVPEAK_RADIUS_MM
    k = sphere_kernel(affine_of(spacing, (0, 0, 0), IDENTITY))
    assert k.weights.sum() == pytest.approx(1.0)
    assert k.volume_ml == pytest.approx(1.0, rel=0.01)
    # symmetric: the kernel-weighted mean offset is zero
    assert np.abs(k.weights @ k.offsets_kji).max() < 1e-9


def test_sphere_kernel_on_sheared_grid_is_one_millilitre() -> None:
    aff = affine_of((2.0, 2.0, 2.0), (0, 0, 0), IDENTITY)
    aff[1, 2] = 2.0 * math.tan(math.radians(18.5))  # gantry-tilt shear of the slice step
    k = sphere_kernel(aff)
    assert k.volume_ml == pytest.approx(1.0, rel=0.01)


def test_suv_peak_of_a_single_hot_voxel_is_its_share_of_one_millilitre() -> None:
    """A point source V in zero background: the 1 mL mean is V x voxel volume / 1 mL."""
    aff = affine_of((4.0, 4.0, 4.0), (0, 0, 0), IDENTITY)
    values = np.zeros((11, 11, 11))
    values[5, 5, 5] = 100.0
    k = sphere_kernel(aff)
    peak, cover, _ = suv_peak_at(values, np.array([[5, 5, 5], [5, 5, 6]]), k)
    assert cover == pytest.approx(1.0)
    assert peak == pytest.approx(100.0 * 0.064 / 1.0, rel=0.01)


def test_suv_peak_of_a_linear_field_equals_the_value_at_the_best_centre() -> None:
    """For SUV = a*x + b the mean over a symmetric sphere equals the value at its centre."""
    aff = affine_of((2.0, 2.0, 2.0), (0, 0, 0), IDENTITY)
    kk, jj, ii = np.indices((20, 20, 20))
    values = 0.5 * ii + 0.25 * jj + 0.1 * kk + 1.0
    lesion = np.argwhere((ii >= 6) & (ii <= 12) & (jj >= 6) & (jj <= 12) & (kk >= 6) & (kk <= 12))
    peak, cover, best = suv_peak_at(values, lesion, sphere_kernel(aff))
    assert cover == pytest.approx(1.0)
    assert tuple(lesion[best]) == (12, 12, 12)
    assert peak == pytest.approx(values[12, 12, 12], rel=1e-9)


# ---------------------------------------------------------------------------------------
# Whole path on a synthetic PET with a uniform cube
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [IDENTITY, FLIPPED], ids=["identity", "flipped"])
def test_cube_lesion_measured_analytically(direction: np.ndarray) -> None:
    spacing, origin = (4.0, 4.0, 3.0), (-60.0, 40.0, -300.0)
    shape = (16, 20, 24)  # k, j, i
    suv = np.full(shape, 1.0)
    cube = np.zeros(shape, bool)
    cube[4:11, 5:13, 6:15] = True  # 7 x 8 x 9 voxels, much larger than the 1 mL sphere
    suv[cube] = 6.0
    suv[7, 9, 10] = 9.5  # one hot voxel inside: SUVmax
    study, for_uid = generate_uid(), generate_uid()
    pet_ds = make_series(suv, spacing, origin, direction, modality="PT", study_uid=study, for_uid=for_uid,
                         slope=0.001)
    pet = build_volume(pet_ds)
    np.testing.assert_allclose(pet.affine, affine_of(spacing, origin, direction), atol=1e-6)
    np.testing.assert_allclose(pet.array, suv, atol=1e-3)

    seg = read_segments(make_seg(pet_ds, {1: cube}))
    result = measure_lesions(seg, pet)
    assert [les.lesion_id for les in result.lesions] == ["S1"]
    les = result.lesions[0]
    m = les.measurements
    n = 7 * 8 * 9
    voxel_ml = 4.0 * 4.0 * 3.0 / 1000
    assert m.voxel_count == n
    assert m.volume_ml == pytest.approx(n * voxel_ml)
    assert m.suv_max == pytest.approx(9.5, abs=1e-3)
    mean = (6.0 * (n - 1) + 9.5) / n
    assert m.suv_mean == pytest.approx(mean, abs=1e-4)
    assert m.tlg == pytest.approx(mean * n * voxel_ml, rel=1e-5)
    # the hot voxel raises the sphere mean around it: peak = 6 + 3.5 x (its kernel weight)
    k = sphere_kernel(pet.affine)
    w0 = float(k.weights[np.all(k.offsets_kji == 0, axis=1)][0])
    assert m.suv_peak == pytest.approx(6.0 + 3.5 * w0, abs=1e-3)
    assert m.ct_mean_hu is None and m.ct_voxel_count is None
    # voxel-edge bounding box and centroid, in LPS mm
    aff = affine_of(spacing, origin, direction)
    idx_lo, idx_hi = np.array([6, 5, 4]) - 0.5, np.array([14, 12, 10]) + 0.5  # (i, j, k)
    corners = np.array([aff[:3, :3] @ [x, y, z] + aff[:3, 3] for x in (idx_lo[0], idx_hi[0])
                        for y in (idx_lo[1], idx_hi[1]) for z in (idx_lo[2], idx_hi[2])])
    np.testing.assert_allclose(les.bbox.size_mm, [9 * 4.0, 8 * 4.0, 7 * 3.0], atol=1e-6)
    np.testing.assert_allclose(les.bbox.center_mm, (corners.min(0) + corners.max(0)) / 2, atol=1e-6)
    centre = aff[:3, :3] @ [10.0, 8.5, 7.0] + aff[:3, 3]
    np.testing.assert_allclose(les.centroid_mm, centre, atol=1e-6)
    np.testing.assert_allclose(les.bbox.center_mm, centre, atol=1e-6)
    if direction is FLIPPED:  # x and y of the box centre mirror through the origin
        assert les.centroid_mm[0] == pytest.approx(-60.0 - 10 * 4.0)
        assert les.centroid_mm[1] == pytest.approx(40.0 - 8.5 * 4.0)
    assert les.frame_of_reference_uid == for_uid
    assert les.property_type is not None and les.property_type.meaning == "Neoplasm"
    assert les.tracking_uid == generate_uid(entropy_srcs=[seg.sop_instance_uid, "segment 1"])
    assert not [f for f in les.flags if f.code != "seg_missing_property_codes"]


def test_bounding_box_helper_voxel_edges() -> None:
    box = bounding_box_mm(affine_of((2.0, 3.0, 5.0), (10, 20, 30), IDENTITY), np.array([0, 0, 0]),
                          np.array([0, 0, 0]))
    assert box.size_mm == (2.0, 3.0, 5.0)
    assert box.center_mm == (10.0, 20.0, 30.0)


def test_overlapping_segments_measured_independently() -> None:
    shape = (12, 12, 12)
    suv = np.full(shape, 2.0)
    kk, jj, ii = np.indices(shape)
    suv[:, :, 6:] = 4.0  # right half hotter
    a = (ii >= 2) & (ii <= 7) & (jj >= 3) & (jj <= 8) & (kk >= 3) & (kk <= 8)  # straddles both halves
    b = (ii >= 6) & (ii <= 9) & (jj >= 3) & (jj <= 8) & (kk >= 3) & (kk <= 8)  # overlaps a at i = 6..7
    study, for_uid = generate_uid(), generate_uid()
    pet_ds = make_series(suv, (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), IDENTITY, modality="PT", study_uid=study,
                         for_uid=for_uid, slope=0.001)
    pet = build_volume(pet_ds)
    seg = read_segments(make_seg(pet_ds, {1: a, 2: b}))
    lesions = {les.segment_number: les for les in measure_lesions(seg, pet).lesions}
    assert lesions[1].measurements.voxel_count == int(a.sum()) == 216
    assert lesions[2].measurements.voxel_count == int(b.sum()) == 144
    assert lesions[1].measurements.suv_mean == pytest.approx((2.0 * 4 + 4.0 * 2) / 6, abs=1e-4)
    assert lesions[2].measurements.suv_mean == pytest.approx(4.0, abs=1e-4)
    assert lesions[1].tracking_uid != lesions[2].tracking_uid


def test_components_split_and_deterministic_ids() -> None:
    shape = (10, 16, 16)
    suv = np.ones(shape)
    mask = np.zeros(shape, bool)
    mask[2:4, 2:4, 2:4] = True  # component 1 (8 voxels) ...
    mask[4, 4, 4] = True  # ... touches it only at a corner: same 26-connected component
    mask[6:9, 10:14, 10:14] = True  # component 2 (48 voxels)
    suv[6:9, 10:14, 10:14] = 3.0
    study, for_uid = generate_uid(), generate_uid()
    pet_ds = make_series(suv, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), IDENTITY, modality="PT", study_uid=study,
                         for_uid=for_uid, slope=0.001)
    pet = build_volume(pet_ds)
    seg_ds = make_seg(pet_ds, {1: mask}, tracking={1: ("all lesions", generate_uid())})
    seg = read_segments(seg_ds)
    res = measure_lesions(seg, pet, mode="components")
    assert [les.lesion_id for les in res.lesions] == ["S1C1", "S1C2"]
    assert [les.measurements.voxel_count for les in res.lesions] == [48, 9]  # largest first
    assert [les.component for les in res.lesions] == [1, 2]
    assert res.lesions[0].measurements.suv_max == pytest.approx(3.0, abs=1e-3)
    assert [les.tracking_id for les in res.lesions] == ["all lesions C1", "all lesions C2"]
    again = measure_lesions(read_segments(seg_ds), pet, mode="components")
    assert [les.tracking_uid for les in again.lesions] == [les.tracking_uid for les in res.lesions]
    assert len({les.tracking_uid for les in res.lesions}) == 2
    whole = measure_lesions(seg, pet).lesions
    assert [les.lesion_id for les in whole] == ["S1"] and whole[0].measurements.voxel_count == 57
    assert whole[0].tracking_id == "all lesions"


def test_seg_drawn_on_ct_measured_on_coarser_pet() -> None:
    """A SEG on a 1 mm CT grid, measured on a 4 mm PET grid (same Frame of Reference).

    The cube is aligned with PET voxel edges, so exactly the PET voxels it fills are
    covered (coverage 1 inside, 0 outside); the sphere's MTV approaches its true volume.
    """
    study, for_uid = generate_uid(), generate_uid()
    # PET: 16^3 voxels of 4 mm, voxel (0,0,0) centred at the origin -> edges at -2 + 4n
    pet_shape = (16, 16, 16)
    pet_suv = np.full(pet_shape, 1.0)
    pet_suv[4:8, 4:8, 4:8] = 5.0
    pet_ds = make_series(pet_suv, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), IDENTITY, modality="PT", study_uid=study,
                         for_uid=for_uid, slope=0.001)
    pet = build_volume(pet_ds)
    # CT: 1 mm voxels, centres at 0.5 + n - 2.0 = -1.5 + n (so 4 CT voxels tile one PET voxel)
    ct_shape = (64, 64, 64)
    kk, jj, ii = np.indices(ct_shape)
    ct_hu = np.where((ii + jj + kk) % 2 == 0, 40.0, 60.0)
    ct_ds = make_series(ct_hu, (1.0, 1.0, 1.0), (-1.5, -1.5, -1.5), IDENTITY, modality="CT", study_uid=study,
                        for_uid=for_uid, intercept=-1024.0)
    ct = build_volume(ct_ds)
    cube = (ii >= 16) & (ii < 32) & (jj >= 16) & (jj < 32) & (kk >= 16) & (kk < 32)  # = PET voxels 4..7
    centre = np.array([30.7, 29.3, 31.1])  # off both lattices
    pos = np.stack([ii, jj, kk], -1) - 1.5
    ball = np.linalg.norm(pos - centre, axis=-1) <= 18.0
    seg = read_segments(make_seg(ct_ds, {1: cube, 2: ball}))
    res = measure_lesions(seg, pet, ct=ct)
    les = {x.segment_number: x for x in res.lesions}
    c = les[1].measurements
    assert c.voxel_count == 64  # 4 x 4 x 4 PET voxels
    assert c.volume_ml == pytest.approx(16**3 / 1000)
    assert c.suv_mean == pytest.approx(5.0, abs=1e-3) and c.suv_max == pytest.approx(5.0, abs=1e-3)
    assert c.ct_voxel_count == 16**3 and c.ct_mean_hu == pytest.approx(50.0)
    assert any(f.code == "seg_resampled_to_pet" for f in les[1].flags)
    np.testing.assert_allclose(les[1].bbox.size_mm, [16.0, 16.0, 16.0])  # on the CT grid it was drawn on
    np.testing.assert_allclose(les[1].centroid_mm, [22.0, 22.0, 22.0])
    b = les[2].measurements
    true_ml = 4 / 3 * math.pi * 18.0**3 / 1000
    assert b.ct_voxel_count == int(ball.sum())
    assert b.ct_voxel_count / 1000 == pytest.approx(true_ml, rel=0.01)
    # majority coverage on 4 mm voxels: the volume error is a fraction of the surface shell
    assert b.volume_ml == pytest.approx(true_ml, rel=0.06)
    np.testing.assert_allclose(les[2].centroid_mm, centre, atol=0.05)


def test_suv_peak_truncated_at_image_edge_is_flagged() -> None:
    shape = (8, 8, 8)
    suv = np.ones(shape)
    mask = np.zeros(shape, bool)
    mask[0:2, 0:2, 0:2] = True  # lesion in the image corner
    suv[mask] = 4.0
    study, for_uid = generate_uid(), generate_uid()
    pet_ds = make_series(suv, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), IDENTITY, modality="PT", study_uid=study,
                         for_uid=for_uid, slope=0.001)
    les = measure_lesions(read_segments(make_seg(pet_ds, {1: mask})), build_volume(pet_ds)).lesions[0]
    flag = next(f for f in les.flags if f.code == "suv_peak_sphere_truncated")
    # centred on the corner voxel only offsets >= 0 stay in the image, and every voxel they
    # reach with non-zero weight is lesion: that mean (4.0) is the peak
    k = sphere_kernel(build_volume(pet_ds).affine)
    kept = float(k.weights[np.all(k.offsets_kji >= 0, axis=1)].sum())
    assert f"{100 * (1 - kept):.1f}%" in flag.message
    assert les.measurements.suv_peak == pytest.approx(4.0, abs=1e-3)


def test_frame_of_reference_checks() -> None:
    study = generate_uid()
    suv = np.ones((4, 6, 6))
    mask = np.zeros(suv.shape, bool)
    mask[1:3, 2:4, 2:4] = True
    pet_ds = make_series(suv, (4.0, 4.0, 4.0), (0, 0, 0), IDENTITY, modality="PT", study_uid=study,
                         for_uid=generate_uid(), slope=0.001)
    pet = build_volume(pet_ds)
    seg = read_segments(make_seg(pet_ds, {1: mask}))
    other = Volume(pet.array, pet.affine, frame_of_reference_uid=generate_uid(), series_instance_uid="1.2.3",
                   modality="PT")
    with pytest.raises(SegmentationError) as err:
        measure_lesions(seg, other)
    assert err.value.code == "frame_of_reference_mismatch"
    assert seg.frame_of_reference_uid in err.value.reason and other.frame_of_reference_uid in err.value.reason
    ct_other = Volume(np.zeros((4, 6, 6)), pet.affine, frame_of_reference_uid=generate_uid(), modality="CT")
    res = measure_lesions(seg, pet, ct=ct_other)
    assert res.lesions[0].measurements.ct_mean_hu is None
    assert any(f.code == "ct_frame_of_reference_mismatch" for f in res.flags)


def test_lesion_outside_pet_field_of_view_is_flagged() -> None:
    """A CT-grid SEG partly beyond the PET's axial extent: the PET part is measured, the rest flagged."""
    study, for_uid = generate_uid(), generate_uid()
    pet_ds = make_series(np.full((4, 8, 8), 2.0), (4.0, 4.0, 4.0), (0, 0, 0), IDENTITY, modality="PT",
                         study_uid=study, for_uid=for_uid, slope=0.001)
    ct_ds = make_series(np.zeros((12, 8, 8)), (4.0, 4.0, 4.0), (0, 0, 0), IDENTITY, modality="CT",
                        study_uid=study, for_uid=for_uid)
    mask = np.zeros((12, 8, 8), bool)
    mask[2:6, 3:5, 3:5] = True  # slices 2..5; the PET has slices 0..3
    seg = read_segments(make_seg(ct_ds, {1: mask}))
    les = measure_lesions(seg, build_volume(pet_ds)).lesions[0]
    assert les.measurements.voxel_count == 8
    flag = next(f for f in les.flags if f.code == "seg_outside_pet")
    assert flag.message.startswith("8 of 16")


def test_empty_segment_is_reported_not_measured() -> None:
    study, for_uid = generate_uid(), generate_uid()
    suv = np.ones((4, 6, 6))
    lesion = np.zeros(suv.shape, bool)
    lesion[1:3, 2:4, 2:4] = True
    pet_ds = make_series(suv, (4.0, 4.0, 4.0), (0, 0, 0), IDENTITY, modality="PT", study_uid=study,
                         for_uid=for_uid, slope=0.001)
    seg = read_segments(make_seg(pet_ds, {1: lesion, 2: np.zeros(suv.shape, bool)}))
    res = measure_lesions(seg, build_volume(pet_ds))
    assert [les.lesion_id for les in res.lesions] == ["S1"]
    assert [f.code for f in res.flags] == ["segment_empty"] and "segment 2" in res.flags[0].message
