"""Reading a hand-built dataset directory in HCL-AL's layout into StudyRecords (HCL-AL, Gao et al. 2025)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.datasets.hclal_layout import (
    ANNO_COLUMNS,
    BBOX_COLUMNS,
    DatasetFormatError,
    label_boxes,
    write_csv,
    write_nifti,
)
from pipelines.dicom.volume import Volume
from training.data.hclal import read_hclal_dataset

AFFINE = np.array([[2.0, 0, 0, -40.0], [0, 2.0, 0, -30.0], [0, 0, 3.0, -100.0], [0, 0, 0, 1]])


def _study(folder: Path, lesions: dict[int, tuple[slice, slice, slice]], mask_name: str) -> Volume:
    """CT, SUV and a multi-label mask (HCL-AL's file names) on one 20x20x10 grid."""
    shape = (10, 20, 20)
    ct = Volume(array=np.full(shape, -1000, np.int16), affine=AFFINE, modality="CT")
    suv = Volume(array=np.ones(shape, np.float32), affine=AFFINE, modality="PT")
    labels = Volume(array=np.zeros(shape, np.uint8), affine=AFFINE, modality="SEG")
    for value, region in lesions.items():
        labels.array[region] = value
        suv.array[region] = 5.0 + value
    write_nifti(ct, folder / "CT.nii.gz")
    write_nifti(suv, folder / "SUV.nii.gz")
    write_nifti(labels, folder / mask_name)
    return labels


def _anno_row(image_path: str, labels: Volume, value: int, gt: str, **extra: object) -> dict[str, object]:
    return {"image_path": image_path, **label_boxes(labels)[value].as_row(), "GT": gt, **extra}


@pytest.fixture
def hclal_dir(tmp_path: Path) -> tuple[Path, dict[str, Volume]]:
    """case01 (HCL-AL names, listed in bbox.csv with absolute paths) and case02 (found by convention)."""
    root = tmp_path / "hclal"
    one = _study(root / "case01", {1: np.s_[2:4, 3:6, 3:6], 2: np.s_[6:8, 12:15, 12:16]}, "SEG_MultiLabel.nii.gz")
    two = _study(root / "case02", {4: np.s_[1:3, 8:10, 8:11]}, "SEG_MultiLabel.nii.gz")
    ct1 = str(root / "case01" / "CT.nii.gz")
    write_csv(root / "bbox.csv", BBOX_COLUMNS, [
        {"image_path": ct1, "image_path1": str(root / "case01" / "SUV.nii.gz"),
         "image_path2": str(root / "case01" / "SEG_MultiLabel.nii.gz"), **label_boxes(one)[v].as_row()}
        for v in (1, 2)
    ])
    write_csv(root / "anno.csv", ANNO_COLUMNS, [
        _anno_row(ct1, one, 2, "Rib L3,Rib L4"),  # listed out of label order: matched by box, not by row
        _anno_row(ct1, one, 1, "Liver S7"),
        _anno_row("case02/CT.nii.gz", two, 4, "Brain"),  # relative to the dataset directory
    ])
    return root, {"case01": one, "case02": two}


def test_reader_maps_gt_strings_to_library_sites_and_boxes_to_mask_labels(hclal_dir: tuple[Path, dict]) -> None:
    root, masks = hclal_dir
    records = read_hclal_dataset(root)
    assert [r.study_id for r in records] == ["case01", "case02"]
    one, two = records

    assert one.source == f"hclal:{(root / 'case01').resolve()}"
    np.testing.assert_array_equal(one.labels.array, masks["case01"].array)
    np.testing.assert_allclose(one.labels.affine, AFFINE, atol=1e-6)
    assert one.ct is not None and one.ct.array.dtype == np.int16
    assert float(one.suv.array[masks["case01"].array == 2].min()) == 7.0  # SUV channel is the SUV file

    rib, liver = one.lesions
    assert (rib.label, rib.sites, rib.hclal_locations) == (2, ("rib_left_3", "rib_left_4"), ("Rib L3", "Rib L4"))
    assert rib.coarse_keys == ("Rib L3", "Rib L4")
    assert (liver.label, liver.sites, liver.coarse_keys) == (1, ("liver_s7",), ("Liver",))
    (brain,) = two.lesions
    assert (brain.label, brain.sites) == (4, ("brain",))

    without_ct = read_hclal_dataset(root, with_ct=False)
    assert without_ct[0].ct is None


def test_unknown_gt_string_is_a_clear_error_before_images_are_read(hclal_dir: tuple[Path, dict]) -> None:
    root, masks = hclal_dir
    write_csv(root / "anno.csv", ANNO_COLUMNS, [
        _anno_row("case01/CT.nii.gz", masks["case01"], 1, "Liver S7"),
        _anno_row("case01/CT.nii.gz", masks["case01"], 2, "Liver S7,Left lung segment 11"),
    ])
    (root / "case01" / "CT.nii.gz").write_bytes(b"not an image")  # never read: the CSV fails first
    with pytest.raises(DatasetFormatError, match=r"anno.csv: line 3: HCL-AL location string\(s\) "
                                                 r"\['Left lung segment 11'\] are not in the anatomy library"):
        read_hclal_dataset(root)


def test_box_that_overlaps_no_lesion_is_an_error(hclal_dir: tuple[Path, dict]) -> None:
    root, masks = hclal_dir
    row = _anno_row("case02/CT.nii.gz", masks["case02"], 4, "Brain")
    row["x"] = float(row["x"]) + 500.0  # type: ignore[arg-type]
    write_csv(root / "anno.csv", ANNO_COLUMNS, [row])
    with pytest.raises(DatasetFormatError, match=r"line 2 \(case02\): no lesion of the mask overlaps the box"):
        read_hclal_dataset(root)


def test_missing_gt_column_is_refused(hclal_dir: tuple[Path, dict]) -> None:
    root, _ = hclal_dir
    (root / "anno.csv").write_text("image_path,x,y,z,width,height,depth\ncase02/CT.nii.gz,0,0,0,1,1,1\n")
    with pytest.raises(DatasetFormatError, match=r"lacks HCL-AL column\(s\) \['GT'\]"):
        read_hclal_dataset(root)


def test_locus_columns_and_manifest_take_precedence(tmp_path: Path) -> None:
    """A Locus export names the label and the reviewed site; the manifest names the study version."""
    root = tmp_path / "export"
    labels = _study(root / "1.2.3", {1: np.s_[2:4, 3:6, 3:6], 2: np.s_[2:4, 6:9, 3:6]}, "mask.nii.gz")
    # Touching lesions: the box of label 2 overlaps label 1 too, so only locus_label can tell them apart.
    write_csv(root / "anno.csv", ANNO_COLUMNS, [
        _anno_row("1.2.3/CT.nii.gz", labels, 2, "Around the liver", locus_label=2, locus_site_id="perihepatic",
                  locus_lesion_id="S2"),
        _anno_row("1.2.3/CT.nii.gz", labels, 1, "", locus_label=1, locus_site_id="liver", locus_lesion_id="S1"),
    ], extra_columns=("locus_label", "locus_site_id", "locus_lesion_id"))
    (root / "manifest.json").write_text(json.dumps({
        "format": "locus-hclal-dataset", "studies": [{"folder": "1.2.3", "study_uid": "1.2.3", "version": 2}],
    }))
    (record,) = read_hclal_dataset(root)
    assert record.source == "locus:1.2.3@v2"
    s2, s1 = record.lesions
    assert (s2.lesion_id, s2.label, s2.sites) == ("S2", 2, ("perihepatic",))
    assert (s1.lesion_id, s1.label, s1.sites, s1.hclal_locations) == ("S1", 1, ("liver",), ())

    write_csv(root / "anno.csv", ANNO_COLUMNS, [
        _anno_row("1.2.3/CT.nii.gz", labels, 1, "", locus_label=1, locus_site_id="no_such_site"),
    ], extra_columns=("locus_label", "locus_site_id"))
    with pytest.raises(DatasetFormatError, match="locus_site_id 'no_such_site'"):
        read_hclal_dataset(root)
