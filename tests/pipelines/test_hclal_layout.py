"""HCL-AL dataset layout: NIfTI orientation (LPS <-> RAS), CSV columns and ground-truth mapping.

HCL-AL (Gao et al. 2025): input channels, LPS world mm, CSV columns and box convention.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from library import load_library
from pipelines.datasets.hclal_layout import (
    ANNO_COLUMNS,
    BBOX_COLUMNS,
    TRAIN_COARSE_COLUMNS,
    TRAIN_FINE_COLUMNS,
    Box,
    DatasetFormatError,
    ct_storage_dtype,
    find_study_images,
    join_labels,
    label_boxes,
    read_csv,
    read_nifti,
    split_labels,
    voxel_box,
    write_csv,
    write_nifti,
    write_study_images,
)
from pipelines.datasets.hclal_truth import coarse_keys_for_finals, sites_for_finals, truth_for_site
from pipelines.datasets.rebuild import LesionKey, lesion_label_map, rebuild_study
from pipelines.dicom.volume import Volume
from pipelines.errors import GeometryError

DEMO_STUDY = Path(__file__).resolve().parents[2] / "node" / "demo_study"  # synthetic PET/CT + SEG (phantom)


def oblique_volume(dtype: type = np.int16) -> Volume:
    """A 7x6x5 (i, j, k) grid with flipped x/y axes, a 20 degree rotation about z and anisotropic spacing."""
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    direction = rot @ np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array([0.8, 1.2, 3.0])[None, :]
    affine[:3, 3] = (120.0, -45.5, -310.25)
    return Volume(array=np.zeros((5, 6, 7), dtype=dtype), affine=affine, frame_of_reference_uid="1.2.3",
                  modality="CT")


def test_marker_voxel_keeps_its_lps_position_through_nifti(tmp_path: Path) -> None:
    vol = oblique_volume()
    i, j, k = 2, 3, 4
    vol.array[k, j, i] = 1000
    marker_lps = vol.index_to_lps(np.array([i, j, k]))[0]

    path = write_nifti(vol, tmp_path / "CT.nii.gz")
    back = read_nifti(path, modality="CT")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    (kk,), (jj,), (ii,) = np.nonzero(back.array == 1000)
    np.testing.assert_allclose(back.index_to_lps(np.array([ii, jj, kk]))[0], marker_lps, atol=1e-4)

    # An independent NIfTI reader sees the same point in RAS (x and y negated), as the format requires.
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    assert data.shape == (7, 6, 5)  # NIfTI arrays are (i, j, k)
    (a,), (b,), (c,) = np.nonzero(data == 1000)
    ras = img.affine @ np.array([a, b, c, 1.0])
    np.testing.assert_allclose(ras[:3], marker_lps * np.array([-1.0, -1.0, 1.0]), atol=1e-4)
    assert int(img.header["sform_code"]) > 0 or int(img.header["qform_code"]) > 0


def test_sheared_grid_is_refused(tmp_path: Path) -> None:
    vol = oblique_volume()
    vol.affine[0, 2] = 1.5  # slice step not perpendicular to the image plane (gantry tilt)
    with pytest.raises(GeometryError):
        write_nifti(vol, tmp_path / "tilted.nii.gz")


def test_study_images_round_trip_with_channel_dtypes(tmp_path: Path) -> None:
    ct = oblique_volume(np.float32)
    ct.array[:] = np.arange(ct.array.size, dtype=np.float32).reshape(ct.array.shape) - 1024.0
    suv = oblique_volume(np.float32)
    suv.array[:] = np.linspace(0.0, 12.5, suv.array.size, dtype=np.float32).reshape(suv.array.shape)
    labels = oblique_volume(np.int32)
    labels.array[1:3, 2:4, 1:2] = 1
    labels.array[4, 5, 6] = 2

    images = write_study_images(tmp_path / "study", ct=ct, suv=suv, labels=labels)
    assert find_study_images(tmp_path / "study") == images
    assert [p.name for p in (images.ct, images.suv, images.mask)] == ["CT.nii.gz", "SUV.nii.gz", "mask.nii.gz"]
    ct_back, suv_back, mask_back = (read_nifti(p) for p in (images.ct, images.suv, images.mask))
    assert ct_back.array.dtype == np.int16  # integral HU are stored compactly
    assert suv_back.array.dtype == np.float32 and mask_back.array.dtype == np.uint8
    np.testing.assert_array_equal(ct_back.array, ct.array)
    np.testing.assert_array_equal(suv_back.array, suv.array)
    np.testing.assert_array_equal(mask_back.array, labels.array)
    for back in (ct_back, suv_back, mask_back):
        np.testing.assert_allclose(back.affine, ct.affine, atol=1e-5)

    (tmp_path / "study" / "SUV.nii.gz").unlink()
    with pytest.raises(DatasetFormatError, match=r"lacks SUV\.nii\.gz"):
        find_study_images(tmp_path / "study")


def test_label_boxes_use_voxel_edges_in_lps() -> None:
    labels = oblique_volume(np.int32)
    labels.array[1:3, 2:4, 1:2] = 3  # k 1..2, j 2..3, i 1
    boxes = label_boxes(labels)
    assert set(boxes) == {3}
    expected = voxel_box(labels.affine, (1, 2, 1), (1, 3, 2))
    assert boxes[3] == expected
    # the box contains the centres of the label's voxels
    centres = labels.index_to_lps(np.argwhere(labels.array == 3)[:, ::-1])
    lo = np.array(expected.centre) - np.array(expected.size) / 2
    hi = np.array(expected.centre) + np.array(expected.size) / 2
    assert np.all((centres > lo) & (centres < hi))


def test_box_iou() -> None:
    a = Box((0.0, 0.0, 0.0), (10.0, 10.0, 10.0))
    assert a.iou(a) == pytest.approx(1.0)
    assert a.iou(Box((5.0, 0.0, 0.0), (10.0, 10.0, 10.0))) == pytest.approx(500.0 / 1500.0)
    assert a.iou(Box((20.0, 0.0, 0.0), (10.0, 10.0, 10.0))) == 0.0


def test_csv_columns_are_hclal_names_in_order_and_values_round_trip(tmp_path: Path) -> None:
    assert BBOX_COLUMNS == ("image_path", "image_path1", "image_path2", "x", "y", "z", "width", "height", "depth")
    assert ANNO_COLUMNS == ("image_path", "x", "y", "z", "width", "height", "depth", "GT")
    assert (*BBOX_COLUMNS, "coarse_gt") == TRAIN_COARSE_COLUMNS
    assert (*BBOX_COLUMNS, "coarse_gt", "fine_gt", "coarse_labels") == TRAIN_FINE_COLUMNS

    box = Box((-12.345678901234, 0.1 + 0.2, 1e-7), (3.0, 4.5, 6.25))
    gt = join_labels(["Liver S7", "Liver S8"])
    row = {"image_path": "s1/CT.nii.gz", **box.as_row(), "GT": gt, "locus_site_id": "liver_s7"}
    assert write_csv(tmp_path / "anno.csv", ANNO_COLUMNS, [row], extra_columns=("locus_site_id",)) == 1

    with open(tmp_path / "anno.csv", encoding="utf-8", newline="") as fh:
        header, values = list(csv.reader(fh))
    assert header == [*ANNO_COLUMNS, "locus_site_id"]
    assert values[ANNO_COLUMNS.index("GT")] == "Liver S7,Liver S8"  # quoted by csv, read back intact

    (back,) = read_csv(tmp_path / "anno.csv", ANNO_COLUMNS)
    assert Box.from_row(back) == box  # floats written with repr() read back bit-exact
    assert split_labels(back["GT"]) == ("Liver S7", "Liver S8")
    assert back["locus_site_id"] == "liver_s7"

    with pytest.raises(DatasetFormatError, match=r"lacks HCL-AL column\(s\) \['image_path1'"):
        read_csv(tmp_path / "anno.csv", BBOX_COLUMNS)
    with pytest.raises(ValueError, match="missing columns"):
        write_csv(tmp_path / "bad.csv", ANNO_COLUMNS, [{"image_path": "x"}])
    with pytest.raises(ValueError, match="free of commas"):
        join_labels(["Liver, segment 7"])


def test_ground_truth_between_library_sites_and_hclal_strings() -> None:
    library = load_library()
    leaf = truth_for_site(library, "liver_s7")
    assert leaf.finals == ("Liver S7",) and leaf.coarse_key == "Liver" and leaf.fine == ("Liver", "Liver S7")

    coarse = truth_for_site(library, "liver")  # a coarse node: any final below it is acceptable
    assert set(coarse.finals) >= {"Liver S1", "Liver S7", "Porta hepatis"}
    assert coarse.coarse_keys == ("Liver",) and coarse.fine is None

    assert sites_for_finals(library, ["Liver S7", "Liver S8", "Liver S7"]) == ("liver_s7", "liver_s8")
    assert coarse_keys_for_finals(library, ["Liver S7", "Brain"]) == ("Liver", "Brain")
    with pytest.raises(DatasetFormatError, match=r"anno.csv line 3: HCL-AL location string\(s\) \['Liver S9'\]"):
        sites_for_finals(library, ["Liver S7", "Liver S9"], where="anno.csv line 3")


def test_label_map_from_the_demo_study_keeps_first_lesion_on_overlap() -> None:
    """Lesion masks are the SEG segments on the PET grid; a voxel carries one label (HCL-AL §2)."""
    study = rebuild_study(sorted(DEMO_STUDY.rglob("*.dcm")))
    assert study.ct is not None and study.suv_info.kind.value == "SUVbw"
    (seg_uid, seg), = study.segs.items()
    keys = [
        LesionKey("S1", seg_uid, 1, None, label=1),
        LesionKey("S2", seg_uid, 2, None, label=2),
        LesionKey("again", seg_uid, 1, None, label=3),  # the same segment twice: every voxel taken
        LesionKey("lost", "1.2.3.4", 1, None, label=4),  # a SEG the study does not hold
    ]
    result = lesion_label_map(study.suv, study.segs, keys)
    assert result.labels.array.shape == study.suv.array.shape
    np.testing.assert_array_equal(result.labels.affine, study.suv.affine)
    for lesion_id, segment, label in (("S1", 1, 1), ("S2", 2, 2)):
        expected = seg.source_mask(segment)  # demo SEG is drawn on the PET grid: index-aligned copy
        assert result.voxels[lesion_id] == expected.voxel_count == int((result.labels.array == label).sum())
    assert result.overlaps == {"again": result.voxels["S1"]}
    assert "already belongs to an earlier lesion" in result.missing["again"]
    assert "1.2.3.4 is not in the study" in result.missing["lost"]
    assert not np.any(result.labels.array >= 3)
    with pytest.raises(ValueError, match="distinct positive"):
        lesion_label_map(study.suv, study.segs, [keys[0], LesionKey("dup", seg_uid, 2, None, label=1)])


def test_ct_is_stored_as_int16_only_when_that_is_lossless() -> None:
    assert ct_storage_dtype(np.array([[[-1024.0, 3071.0]]], np.float32)) == np.int16
    assert ct_storage_dtype(np.array([[[-1024.0, 0.5]]], np.float32)) == np.float32  # fractional HU
    assert ct_storage_dtype(np.array([[[0, 40000]]], np.int32)) == np.float32  # out of int16 range
    assert ct_storage_dtype(np.array([[[0.0, np.nan]]], np.float32)) == np.float32
