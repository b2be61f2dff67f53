"""SEG reading and placement on image grids (pipelines.dicom.seg) with real public SEGs.

Expected voxel counts and CT means come from ``shared/data/expected.json`` (counted from
the pixel data when the data set was assembled) and ``README.md``.  Every SEG is read
with highdicom and with the functional-group fallback parser and both must agree.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.dicom.seg import (
    LABEL_MAP_SEGMENTATION_STORAGE,
    Reader,
    check_frame_of_reference,
    map_region,
    read_segments,
    segment_masks_on,
)
from pipelines.dicom.series import build_volume
from pipelines.dicom.volume import Volume
from pipelines.errors import SegmentationError

LIVER = "seg-ct-liver3slice-multivendor"
SMALL = "seg-sr-highdicom-smallct"
READERS: list[Reader] = ["auto", "fallback"]


def _read_all(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(paths)]


@pytest.fixture(scope="module")
def expected(data_dir: Path) -> dict:
    return json.loads((data_dir / "expected.json").read_text())


@pytest.fixture(scope="module")
def liver_ct(data_dir: Path) -> Volume:
    return build_volume(_read_all(list((data_dir / LIVER / "ct").glob("*.dcm"))))


@pytest.fixture(scope="module")
def small_ct_datasets(data_dir: Path) -> list[Dataset]:
    return _read_all(list((data_dir / SMALL / "ct2_pydicom").iterdir()))


@pytest.fixture(scope="module")
def small_ct3(small_ct_datasets: list[Dataset]) -> Volume:
    """The three contiguous slices (z 103.02 .. 105.52) of the four-slice pydicom CT."""
    return build_volume(small_ct_datasets[1:])


@pytest.fixture(scope="module")
def small_ct_full(small_ct_datasets: list[Dataset]) -> Volume:
    """All four slices (one 202.5 mm gap) resampled onto a regular 1.25 mm grid (165 slices)."""
    return build_volume(small_ct_datasets, irregular="resample")


def _hu_means(masks, ct: Volume) -> dict[int, float]:
    return {m.segment_number: float(ct.array[m.slices][m.mask].mean()) for m in masks}


# ---------------------------------------------------------------------------------------
# seg-ct-liver3slice-multivendor
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["seg/dcmqi_liver.dcm", "seg/dcmqi_partial_overlaps.dcm",
                                  "seg/siemens_syngovia_VA11A.seg.dcm"])
def test_liver3slice_segs_counts_and_ct_means(data_dir: Path, expected: dict, liver_ct: Volume,
                                             name: str, reader: Reader) -> None:
    exp = expected[LIVER]["segs"][name]
    seg = read_segments(data_dir / LIVER / name, reader=reader)
    assert [s.label for s in seg.segments] == exp["labels"]
    masks = segment_masks_on(seg, liver_ct)
    assert {m.segment_number: m.voxel_count for m in masks} == {int(k): v for k, v in exp["voxels"].items()}
    assert all(m.method == "index_aligned" and m.source_voxels_outside_target == 0 for m in masks)
    means = _hu_means(masks, liver_ct)
    for n, hu in exp["ct_HU_mean"].items():
        assert means[int(n)] == pytest.approx(hu, abs=0.005)


def test_dcmqi_descriptions(data_dir: Path) -> None:
    liver = read_segments(data_dir / LIVER / "seg/dcmqi_liver.dcm")
    assert liver.reader == "highdicom" and liver.segmentation_type == "BINARY"
    s = liver.segment(1)
    assert s.property_type is not None and (s.property_type.value, s.property_type.scheme) == ("T-62000", "SRT")
    assert s.flags == ()
    over = read_segments(data_dir / LIVER / "seg/dcmqi_partial_overlaps.dcm")
    assert [s.property_type.meaning for s in over.segments if s.property_type] == [
        "Tissue", "Artery", "Capillary", "Edema", "Vein"]


def test_partial_overlaps_segments_really_overlap(data_dir: Path, liver_ct: Volume) -> None:
    seg = read_segments(data_dir / LIVER / "seg/dcmqi_partial_overlaps.dcm")
    dense = {m.segment_number: m.dense() for m in segment_masks_on(seg, liver_ct)}
    union = np.zeros(liver_ct.array.shape, bool)
    for d in dense.values():
        union |= d
    assert sum(int(d.sum()) for d in dense.values()) > int(union.sum())  # shared voxels exist
    # each segment was read on its own: an overlap does not steal voxels from either side
    overlaps = [(a, b) for a in dense for b in dense if a < b and np.any(dense[a] & dense[b])]
    assert overlaps


def test_syngovia_without_property_codes_is_accepted_with_flag(data_dir: Path) -> None:
    seg = read_segments(data_dir / LIVER / "seg/siemens_syngovia_VA11A.seg.dcm")
    assert seg.reader == "fallback"
    assert any(f.code == "seg_fallback_parser" for f in seg.flags)
    s = seg.segment(1)
    assert s.label == "0" and s.property_category is None and s.property_type is None
    assert [f.code for f in s.flags] == ["seg_missing_property_codes"]
    assert s.algorithm_type == "SEMIAUTOMATIC"


@pytest.mark.parametrize("reader", READERS)
def test_wrong_frame_of_reference_is_refused(data_dir: Path, liver_ct: Volume, reader: Reader) -> None:
    seg = read_segments(data_dir / LIVER / "seg/slicer_reporting_2012_wrongFoR.seg.dcm", reader=reader)
    with pytest.raises(SegmentationError) as err:
        segment_masks_on(seg, liver_ct)
    assert err.value.code == "frame_of_reference_mismatch"
    assert "1.2.276.0.7230010.3.1.3.0.9625.1345852568.149994" in err.value.reason
    assert liver_ct.frame_of_reference_uid in err.value.reason
    # The refusal is the UID comparison: geometrically the SEG lies exactly on the CT slices,
    # so a position-only check would have accepted all of its voxels.
    (region,) = seg.source_regions()
    assert region.voxel_count == 104_500
    placed = map_region(region, liver_ct)
    assert placed.method == "index_aligned" and placed.voxel_count == 104_500


def test_phantom_bit_packing_23x38(data_dir: Path, expected: dict) -> None:
    base = data_dir / LIVER / "phantom_23x38x3"
    images = build_volume(_read_all(list((base / "image").iterdir())))
    multiframe = build_volume([pydicom.dcmread(base / "multiframe" / "mf.dcm")])
    results = []
    for reader in READERS:
        seg = read_segments(base / "seg" / "label.seg", reader=reader)
        assert seg.segment(1).label == expected[LIVER]["phantom_23x38x3"]["seg_label"]
        for target in (images, multiframe):
            (m,) = segment_masks_on(seg, target)
            assert m.voxel_count == 322 and m.method == "index_aligned"
            results.append(m.dense())
    assert all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("name", ["seg/dcmqi_liver.dcm", "seg/dcmqi_partial_overlaps.dcm"])
def test_fallback_parser_matches_highdicom_voxel_for_voxel(data_dir: Path, liver_ct: Volume, name: str) -> None:
    a = {m.segment_number: m.dense() for m in segment_masks_on(read_segments(data_dir / LIVER / name), liver_ct)}
    b = {m.segment_number: m.dense()
         for m in segment_masks_on(read_segments(data_dir / LIVER / name, reader="fallback"), liver_ct)}
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_liver_resampled_to_coarser_grid_keeps_its_volume(data_dir: Path, liver_ct: Volume) -> None:
    """The dcmqi liver mask on a grid with 2x coarser in-plane voxels shifted by a quarter voxel."""
    seg = read_segments(data_dir / LIVER / "seg/dcmqi_liver.dcm")
    aff = liver_ct.affine.copy()
    aff[:3, :2] *= 2.0
    aff[:3, 3] += 0.25 * aff[:3, 0] + 0.25 * aff[:3, 1]
    coarse = Volume(np.zeros((3, 256, 256), np.float32), aff, liver_ct.frame_of_reference_uid, modality="PT")
    (m,) = segment_masks_on(seg, coarse)
    assert m.method == "subvoxel_coverage"
    ml_fine = 107_098 * liver_ct.voxel_volume_mm3 / 1000
    ml_coarse = m.voxel_count * coarse.voxel_volume_mm3 / 1000
    assert ml_coarse == pytest.approx(ml_fine, rel=0.02)


# ---------------------------------------------------------------------------------------
# seg-sr-highdicom-smallct
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reader", READERS)
def test_highdicom_binary_and_binary_fractional_are_the_same_mask(data_dir: Path, small_ct3: Volume,
                                                                  reader: Reader) -> None:
    binary = read_segments(data_dir / SMALL / "seg/seg_image_ct_binary.dcm", reader=reader)
    frac = read_segments(data_dir / SMALL / "seg/seg_image_ct_binary_fractional.dcm", reader=reader)
    assert frac.segmentation_type == "FRACTIONAL" and frac.fractional_type == "PROBABILITY"
    assert any(f.code == "seg_fractional_thresholded" for f in frac.flags)
    (mb,) = segment_masks_on(binary, small_ct3)
    (mf,) = segment_masks_on(frac, small_ct3)
    assert mb.voxel_count == mf.voxel_count == 638
    assert np.array_equal(mb.dense(), mf.dense())


@pytest.mark.parametrize("reader", READERS)
def test_true_fractional_threshold(data_dir: Path, small_ct3: Volume, reader: Reader) -> None:
    """Values 0/64/128 of 255: the threshold >= 0.5 keeps the 128s (0.502), drops the 64s (0.251)."""
    path = data_dir / SMALL / "seg/seg_image_ct_true_fractional.dcm"
    raw = hd.seg.segread(path).get_volume(rescale_fractional=False).array[..., 0]
    assert int((raw == 128).sum()) == 638 and int((raw == 64).sum()) == 23
    assert float(raw.sum()) / 255 == pytest.approx(326.024, abs=1e-3)  # expected.json sum of fractions
    (m,) = segment_masks_on(read_segments(path, reader=reader), small_ct3)
    assert m.voxel_count == 638


@pytest.mark.parametrize("reader", READERS)
def test_overlapping_segments_with_a_slice_gap(data_dir: Path, small_ct3: Volume, small_ct_full: Volume,
                                               reader: Reader) -> None:
    seg = read_segments(data_dir / SMALL / "seg/seg_image_ct_binary_overlap.dcm", reader=reader)
    assert [s.label for s in seg.segments] == ["first segment", "second segment"]
    full = segment_masks_on(seg, small_ct_full)
    assert [(m.voxel_count, m.source_voxels_outside_target) for m in full] == [(64, 0), (16, 0)]
    d1, d2 = (m.dense() for m in full)
    assert np.any(d1 & d2)
    # on the three contiguous CT slices the frame at z = -99.48 has no image: counted as outside
    part = segment_masks_on(seg, small_ct3)
    assert [(m.voxel_count, m.source_voxels_outside_target) for m in part] == [(48, 16), (12, 4)]


@pytest.mark.parametrize("reader", READERS)
def test_single_frame_seg(data_dir: Path, reader: Reader) -> None:
    ct = build_volume([pydicom.dcmread(data_dir / SMALL / "ct_single" / "ct_image.dcm")])
    seg = read_segments(data_dir / SMALL / "seg/seg_image_ct_binary_single_frame.dcm", reader=reader)
    (m,) = segment_masks_on(seg, ct)
    assert m.voxel_count == 1832 and m.method == "index_aligned"
    with pytest.raises(SegmentationError):  # the 16x16 CT is another Frame of Reference
        check_frame_of_reference(seg, build_volume(_read_all(list((data_dir / SMALL / "ct2_pydicom").iterdir()))[1:]))


# ---------------------------------------------------------------------------------------
# Label Map SEG and connected components (written here with highdicom on the real CT slices)
# ---------------------------------------------------------------------------------------
def _highdicom_seg(sources: list[Dataset], pixels: np.ndarray, kind: hd.seg.SegmentationTypeValues,
                   numbers: list[int]) -> Dataset:
    descs = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=f"lesion {n}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n in numbers]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=kind, segment_descriptions=descs,
        series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Locus test", manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        omit_empty_frames=True)
    buf = io.BytesIO()
    seg.save_as(buf)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("reader", READERS)
def test_label_map_seg(small_ct_datasets: list[Dataset], small_ct3: Volume, reader: Reader) -> None:
    labels = np.zeros((3, 16, 16), np.uint8)
    labels[0, 2:5, 2:5] = 1
    labels[1, 2:5, 2:5] = 2
    labels[2, 8:10, 8:12] = 2
    labels[2, 12:15, 1:3] = 3
    ds = _highdicom_seg(small_ct_datasets[1:], labels, hd.seg.SegmentationTypeValues.LABELMAP, [1, 2, 3])
    assert ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    seg = read_segments(ds, reader=reader)
    assert seg.segmentation_type == "LABELMAP"
    masks = segment_masks_on(seg, small_ct3)
    assert [(m.segment_number, m.voxel_count) for m in masks] == [(1, 9), (2, 17), (3, 6)]
    # the CT volume is sorted along the normal: k = 0 is the first CT image, as in `labels`
    for m in masks:
        assert np.array_equal(m.dense(), labels == m.segment_number)
    comps = segment_masks_on(seg, small_ct3, segment_numbers=[2], mode="components")
    assert [(m.segment_number, m.component, m.voxel_count) for m in comps] == [(2, 1, 9), (2, 2, 8)]


def test_components_with_26_connectivity(small_ct_datasets: list[Dataset], small_ct3: Volume) -> None:
    mask = np.zeros((3, 16, 16), np.uint8)
    mask[0, 1:3, 1:3] = 1
    mask[1, 3, 3] = 1  # diagonal (corner) neighbour of (0, 2, 2): same component
    mask[2, 10:14, 10:13] = 1
    ds = _highdicom_seg(small_ct_datasets[1:], mask, hd.seg.SegmentationTypeValues.BINARY, [1])
    seg = read_segments(ds)
    comps = segment_masks_on(seg, small_ct3, mode="components")
    assert [(m.component, m.voxel_count) for m in comps] == [(1, 12), (2, 5)]
    assert [m.voxel_count for m in segment_masks_on(seg, small_ct3)] == [17]


def test_not_a_segmentation(data_dir: Path) -> None:
    with pytest.raises(SegmentationError) as err:
        read_segments(data_dir / LIVER / "ct" / "01.dcm")
    assert err.value.code == "not_a_segmentation"


@pytest.mark.parametrize("reader", READERS)
def test_irregular_frame_positions_are_refused(data_dir: Path, liver_ct: Volume, reader: Reader) -> None:
    ds = pydicom.dcmread(data_dir / LIVER / "seg/dcmqi_liver.dcm")
    item = ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    x, y, z = (float(v) for v in item.ImagePositionPatient)
    item.ImagePositionPatient = [x, y, z + 0.37]  # gaps 1.37 and 0.63 mm: not one slice grid
    seg = read_segments(ds, reader=reader)
    with pytest.raises(SegmentationError) as err:
        segment_masks_on(seg, liver_ct)
    assert err.value.code == "seg_geometry_irregular"


def test_fallback_frame_without_position_is_refused(data_dir: Path, liver_ct: Volume) -> None:
    ds = pydicom.dcmread(data_dir / LIVER / "seg/siemens_syngovia_VA11A.seg.dcm")
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    seg = read_segments(ds)
    with pytest.raises(SegmentationError) as err:
        segment_masks_on(seg, liver_ct)
    assert err.value.code == "seg_geometry" and "frame 3" in err.value.reason
