"""Study inventory: grouping, classification, refusals, PET and CT choice (synthetic files and real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipelines.dicom.inventory import take_inventory
from pipelines.errors import InputError

CT = "1.2.840.10008.5.1.4.1.1.2"
PET = "1.2.840.10008.5.1.4.1.1.128"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
MODALITY = {CT: "CT", PET: "PT", SEG: "SEG", LABELMAP_SEG: "SEG", RTSTRUCT: "RTSTRUCT"}


def _write(path: Path, ds: Dataset) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _base(sop_class: str, study: str, series: str, for_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = MODALITY[sop_class]
    return ds


def _series(tmp: Path, sop_class: str, study: str, for_uid: str, zs: list[float], *,
            series: str | None = None, attenuation_corrected: bool = True) -> tuple[str, list[Path]]:
    """Write a small image series (4x4 slices at the given z) and return its UID and paths."""
    series = series or generate_uid()
    paths = []
    for n, z in enumerate(zs):
        ds = _base(sop_class, study, series, for_uid)
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [4.0, 4.0]
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
        if sop_class == PET:
            ds.CorrectedImage = ["DECY", "ATTN"] if attenuation_corrected else ["DECY"]
            ds.Units = "BQML"
        paths.append(_write(tmp / series / f"{n:03d}.dcm", ds))
    return series, paths


def _seg(tmp: Path, study: str, for_uid: str, referenced_series: str, sop_class: str = SEG) -> tuple[str, Path]:
    ds = _base(sop_class, study, generate_uid(), for_uid)
    item = Dataset()
    item.SeriesInstanceUID = referenced_series
    ds.ReferencedSeriesSequence = [item]
    return ds.SeriesInstanceUID, _write(tmp / "seg" / f"{ds.SOPInstanceUID}.dcm", ds)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp_path = tmp_path_factory.mktemp("study")
    study_uid, for_a, for_b = generate_uid(), generate_uid(), generate_uid()
    pet, pet_paths = _series(tmp_path, PET, study_uid, for_a, [0.0, 10.0, 20.0, 30.0, 40.0])
    ct_full, full_paths = _series(tmp_path, CT, study_uid, for_a, list(np.arange(-50.0, 95.0, 5.0)))
    ct_part, part_paths = _series(tmp_path, CT, study_uid, for_a, list(np.arange(0.0, 21.0, 0.5)))
    ct_other, other_paths = _series(tmp_path, CT, study_uid, for_b, list(np.arange(-100.0, 101.0, 4.0)))
    seg, seg_path = _seg(tmp_path, study_uid, for_a, pet)
    rt = _base(RTSTRUCT, study_uid, generate_uid(), for_a)
    rt_path = _write(tmp_path / "rt.dcm", rt)
    no_uid = _base(CT, "", "", for_a)
    no_uid.SOPInstanceUID = ""
    no_uid_path = _write(tmp_path / "nouid.dcm", no_uid)
    text = tmp_path / "README.txt"
    text.write_text("not DICOM")
    (tmp_path / "junk.bin").write_bytes(b"not DICOM either")
    return dict(tmp=tmp_path, study=study_uid, for_a=for_a, for_b=for_b, pet=pet, pet_paths=pet_paths,
                ct_full=ct_full, ct_part=ct_part, ct_other=ct_other, seg=seg, seg_path=seg_path,
                full_paths=full_paths, part_paths=part_paths, other_paths=other_paths,
                rt_path=rt_path, no_uid_path=no_uid_path, text=text)


def test_full_study_from_a_folder(study: dict) -> None:
    inv = take_inventory([study["tmp"]])
    assert inv.study_instance_uid == study["study"]
    assert inv.pet.series_instance_uid == study["pet"]
    # the partial CT has more images and the other-FoR CT covers everything: coverage in the PET's FoR wins
    assert inv.ct is not None and inv.ct.series_instance_uid == study["ct_full"]
    assert [g.series_instance_uid for g in inv.segs] == [study["seg"]]
    roles = {c.role: c for c in inv.choices}
    assert set(roles) == {"pet", "ct", "seg"}
    assert "covers 100% of the PET extent" in roles["ct"].reason
    assert "best of 3 CT series (2 in the PET's Frame of Reference)" in roles["ct"].reason
    assert "the chosen PET" in roles["seg"].reason
    codes = {f.code for f in inv.flags}
    assert codes == {"ct_series_chosen", "instances_refused"}
    ignored = {Path(i.source).name: i.code for i in inv.ignored}
    # the folder's README is documentation beside the instances, not an ignored instance; other
    # unreadable files still are
    assert ignored == {"rt.dcm": "not_used", "nouid.dcm": "missing_uid", "junk.bin": "not_dicom"}
    refused = next(i for i in inv.ignored if i.code == "missing_uid")
    assert "SOPInstanceUID" in refused.reason and "StudyInstanceUID" in refused.reason
    # headers only, each with its path for the later pixel read, sorted into the right series
    assert len(inv.pet_headers) == 5 and all("PixelData" not in ds for ds in inv.pet_headers)
    assert sorted(inv.pet.paths) == sorted(str(p) for p in study["pet_paths"])
    assert inv.ct_headers is not None and len(inv.ct_headers) == 29


def test_partial_ct_chosen_when_only_one_in_frame(study: dict) -> None:
    items = study["pet_paths"] + study["part_paths"] + study["other_paths"] + [study["seg_path"]]
    inv = take_inventory(items)
    assert inv.ct is not None and inv.ct.series_instance_uid == study["ct_part"]
    ct_choice = next(c for c in inv.choices if c.role == "ct")
    assert "covers 51% of the PET extent" in ct_choice.reason


def test_no_ct_and_no_seg_flags(study: dict) -> None:
    inv = take_inventory(study["pet_paths"] + [study["seg_path"]])
    assert inv.ct is None and inv.ct_headers is None
    assert [f.code for f in inv.flags] == ["no_ct"]
    inv = take_inventory(study["pet_paths"] + study["other_paths"])
    assert inv.ct is None
    flags = {f.code: f.message for f in inv.flags}
    assert set(flags) == {"no_ct", "no_seg"}
    assert "Frame of Reference" in flags["no_ct"]
    assert [c.role for c in inv.choices] == ["pet"]


def test_no_pet_and_mixed_studies_refused(study: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        take_inventory(study["full_paths"] + [study["seg_path"]])
    assert err.value.code == "no_pet"
    _, other_study = _series(tmp_path / "x", PET, generate_uid(), study["for_a"], [0.0, 5.0])
    with pytest.raises(InputError) as err:
        take_inventory(study["pet_paths"] + other_study)
    assert err.value.code == "mixed_studies"


def test_multi_bed_pet_in_one_series(tmp_path: Path) -> None:
    study_uid, for_uid = generate_uid(), generate_uid()
    beds = [0.0, 10.0, 20.0, 30.0, 40.0, 45.0, 55.0, 65.0, 75.0, 85.0]  # two bed positions, one series
    _pet, pet_paths = _series(tmp_path, PET, study_uid, for_uid, beds)
    _ct_bed1, p1 = _series(tmp_path, CT, study_uid, for_uid, list(np.arange(-10.0, 50.0, 1.0)))
    ct_whole, p2 = _series(tmp_path, CT, study_uid, for_uid, list(np.arange(-10.0, 100.0, 5.0)))
    inv = take_inventory(pet_paths[::-1] + p1 + p2)
    assert len(inv.pet_headers) == 10
    assert inv.ct is not None and inv.ct.series_instance_uid == ct_whole
    assert "0.0..85.0 mm along the PET normal" in next(c.reason for c in inv.choices if c.role == "ct")


def test_pet_choice_prefers_seg_reference_then_attenuation_correction(tmp_path: Path) -> None:
    study_uid, for_uid = generate_uid(), generate_uid()
    ac, ac_paths = _series(tmp_path, PET, study_uid, for_uid, [0.0, 5.0, 10.0])
    nac, nac_paths = _series(tmp_path, PET, study_uid, for_uid, [0.0, 5.0, 10.0, 15.0],
                             attenuation_corrected=False)
    inv = take_inventory(ac_paths + nac_paths)
    assert inv.pet.series_instance_uid == ac
    assert "attenuation corrected" in inv.choices[0].reason
    # a SEG drawn on the NAC series makes that the PET to measure on
    _, seg_path = _seg(tmp_path, study_uid, for_uid, nac, sop_class=LABELMAP_SEG)
    inv = take_inventory(ac_paths + nac_paths + [seg_path])
    assert inv.pet.series_instance_uid == nac
    assert "referenced by 1 SEG instance(s)" in inv.choices[0].reason
    assert len(inv.segs) == 1 and str(inv.segs[0].headers[0].SOPClassUID) == LABELMAP_SEG


def test_in_memory_datasets_and_duplicates(study: dict) -> None:
    datasets = [pydicom.dcmread(p) for p in study["pet_paths"]]
    inv = take_inventory([*datasets, datasets[0]])
    assert len(inv.pet_headers) == 5
    assert [i.code for i in inv.ignored] == ["duplicate_sop_instance"]


# ---------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------
def test_real_ge_pet_ct_study(data_dir: Path) -> None:
    inv = take_inventory([data_dir / "pet-ge-sts001"])
    assert inv.study_instance_uid == "1.3.6.1.4.1.14519.5.2.1.5168.1900.980314374925518526455629963929"
    # raw_pet (267, attenuation corrected) over MIRP's 59-slice SUV crop
    assert inv.pet.series_instance_uid == "1.3.6.1.4.1.14519.5.2.1.5168.1900.279539551699081894888330051583"
    assert len(inv.pet_headers) == 267
    assert inv.ct is not None and inv.ct.series_instance_uid.endswith("449841255123215696894565592289")
    assert len(inv.ct.headers) == 59
    assert {f.code for f in inv.flags} == {"no_seg"}
    rt = [i for i in inv.ignored if Path(i.source).name in ("RS.dcm", "1-1.dcm")]
    assert len(rt) == 3  # two RTSTRUCTs not used; MIRP's copy repeats the third's SOP Instance UID
    assert {i.code for i in rt} == {"not_used", "duplicate_sop_instance"}


def test_totalseg_dicom_without_uids_is_refused(data_dir: Path, tmp_path: Path) -> None:
    files = sorted((data_dir / "totalseg-example/example_ct_dicom").glob("*.dcm"))
    with pytest.raises(InputError) as err:
        take_inventory(files)
    assert err.value.code == "no_pet"
    assert "20 instance(s) were refused" in err.value.reason
    # beside a valid study the UID-less files are recorded, never grouped into a series with an empty UID
    _, pet_paths = _series(tmp_path, PET, generate_uid(), generate_uid(), [0.0, 5.0])
    inv = take_inventory(files + pet_paths)
    refused = [i for i in inv.ignored if i.code == "missing_uid"]
    assert len(refused) == 20
    assert "MediaStorageSOPInstanceUID" in refused[0].reason
    assert all(g.series_instance_uid for g in inv.series)
    assert "instances_refused" in {f.code for f in inv.flags}


def _real_ct_frame(path: Path) -> tuple[str, str, list[float]]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.FrameOfReferenceUID), [float(v) for v in ds.ImagePositionPatient]


def test_real_ct_and_segs_with_pet_in_same_frame(data_dir: Path, tmp_path: Path) -> None:
    base = data_dir / "seg-ct-liver3slice-multivendor"
    study_uid, for_uid, _ = _real_ct_frame(base / "ct/01.dcm")
    _, pet_paths = _series(tmp_path, PET, study_uid, for_uid, [-128.69, -126.69])
    inv = take_inventory([base / "ct", base / "seg", *pet_paths])
    assert inv.ct is not None and inv.ct.series_instance_uid.endswith("3.10.23430.1")
    assert len(inv.segs) == 4
    seg_reasons = {c.series_instance_uid: c.reason for c in inv.choices if c.role == "seg"}
    wrong = next(uid for uid in seg_reasons if uid.endswith("52568.149994"))
    assert "FoR differs from the PET" in seg_reasons[wrong]
    assert "no referenced series" in seg_reasons[wrong]
    others = [r for uid, r in seg_reasons.items() if uid != wrong]
    assert all("the chosen CT" in r and "FoR matches" in r for r in others)
    assert inv.ignored == []  # the SEG folder's README is documentation, not an ignored instance


def test_a_readme_named_explicitly_is_still_reported(study: dict) -> None:
    inv = take_inventory([*study["pet_paths"], study["text"]])
    assert [(Path(i.source).name, i.code) for i in inv.ignored] == [("README.txt", "not_dicom")]


def test_real_phantom_two_ct_series_and_extensionless_seg(data_dir: Path, tmp_path: Path) -> None:
    base = data_dir / "seg-ct-liver3slice-multivendor/phantom_23x38x3"
    study_uid, for_uid, _ = _real_ct_frame(base / "image/IMG0001.dcm")
    _, pet_paths = _series(tmp_path, PET, study_uid, for_uid, [-177.75, -172.75])
    inv = take_inventory([base, *pet_paths])
    cts = [g for g in inv.series if g.role == "ct"]
    assert len(cts) == 2  # classic single-frame series and the Legacy Converted Enhanced CT
    assert len(inv.segs) == 1 and inv.segs[0].paths[0].endswith("label.seg")
    # equal coverage and equal image count: the choice is deterministic (by UID) and says so
    chosen = inv.ct
    assert chosen is not None
    assert chosen.series_instance_uid == min(g.series_instance_uid for g in cts)
    assert "ct_series_chosen" in {f.code for f in inv.flags}
    assert take_inventory([base, *pet_paths[::-1]]).ct.series_instance_uid == chosen.series_instance_uid
