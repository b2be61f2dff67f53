"""The analysis entry point on a whole study, and `locus analyse` (issue: study analysis)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from node.cli import main as locus
from node.cli_demo import SAMPLE_STUDY
from pipelines.analysis import AnalysisOptions, analyse_study
from pipelines.errors import InputError
from pipelines.sr.reader import read_measurement_report
from tests.helpers.dicomcheck import assert_dciodvfy_clean

CT = sorted((SAMPLE_STUDY / "CT").glob("*.dcm"))
PT = sorted((SAMPLE_STUDY / "PT").glob("*.dcm"))
SEG = sorted((SAMPLE_STUDY / "SEG").glob("*.dcm"))


@pytest.fixture(scope="module")
def full_result():  # type: ignore[no-untyped-def]
    return analyse_study([SAMPLE_STUDY])


def test_whole_study(full_result, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = full_result
    seg = pydicom.dcmread(SEG[0])
    assert len(r.lesions) == len(seg.SegmentSequence) == 5
    assert r.suv is not None and r.suv.kind.value == "SUVbw"
    assert {c.role for c in r.series} >= {"pet", "ct"}
    for les in r.lesions:
        m = les.measurements
        assert m.suv_max >= m.suv_peak > 0 and m.suv_max >= m.suv_mean > 0
        assert m.tlg == pytest.approx(m.suv_mean * m.volume_ml, rel=1e-6)
        assert m.ct_mean_hu is not None
    assert set(r.timings_s) >= {"inventory", "volumes", "suv", "lesions", "report", "total"}
    assert any(f.code == "location_not_assessed" for f in r.flags)
    # JSON for the database and the queue
    json.dumps(r.to_json())
    # the SR is valid and carries the same numbers
    out = tmp_path / "sr.dcm"
    r.sr_dataset.save_as(out, enforce_file_format=True)
    assert_dciodvfy_clean(out)
    read = read_measurement_report(out)
    by_uid = {les.tracking_uid: les for les in read.lesions}
    for les in r.lesions:
        assert by_uid[les.tracking_uid].suv_max == pytest.approx(les.measurements.suv_max, rel=1e-6)
        assert not by_uid[les.tracking_uid].location_assessed
    assert r.sr_dataset.StudyInstanceUID == seg.StudyInstanceUID  # the SR lands in the original study


def test_deterministic_sr_uid(full_result) -> None:  # type: ignore[no-untyped-def]
    again = analyse_study([SAMPLE_STUDY])
    assert again.sr_sop_instance_uid == full_result.sr_sop_instance_uid
    v2 = analyse_study([SAMPLE_STUDY], AnalysisOptions(study_version=2))
    assert v2.sr_sop_instance_uid != full_result.sr_sop_instance_uid


def test_components_mode() -> None:
    r = analyse_study([SAMPLE_STUDY], AnalysisOptions(lesion_mode="components", write_report=False))
    assert len(r.lesions) >= 5
    assert all(les.component is not None for les in r.lesions)


def test_pet_and_seg_without_ct() -> None:
    r = analyse_study([*PT, *SEG])
    assert any(f.code == "no_ct" for f in r.flags)
    assert len(r.lesions) == 5
    assert all(les.measurements.ct_mean_hu is None for les in r.lesions)
    assert all(les.measurements.suv_max > 0 for les in r.lesions)
    assert r.sr_dataset is not None


def test_no_seg_means_no_report() -> None:
    r = analyse_study([*CT, *PT])
    assert r.lesions == [] and r.sr_dataset is None
    assert any(f.code == "no_seg" for f in r.flags)


def test_no_pet_is_refused_with_reason() -> None:
    with pytest.raises(InputError) as exc:
        analyse_study([*CT, *SEG])
    assert exc.value.code == "no_pet"


def test_missing_weight_falls_back_to_bqml(tmp_path: Path) -> None:
    for p in PT:
        ds = pydicom.dcmread(p)
        del ds.PatientWeight
        ds.save_as(tmp_path / p.name)
    r = analyse_study([*CT, *sorted(tmp_path.glob("*.dcm")), *SEG])
    assert r.suv is not None and r.suv.kind.value == "Bq/mL"
    assert any(f.code == "suv_fallback_bqml" for f in r.flags)
    assert r.lesions and all(les.measurements.suv_max > 100 for les in r.lesions)  # Bq/mL, not SUV
    out = tmp_path / "sr.dcm"
    r.sr_dataset.save_as(out, enforce_file_format=True)
    assert_dciodvfy_clean(out)


def test_cli_analyse_json_and_sr(tmp_path: Path) -> None:
    sr = tmp_path / "out.dcm"
    res = CliRunner().invoke(locus, ["analyse", str(SAMPLE_STUDY), "--json", "--sr", str(sr)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["lesions"]) == 5
    les = data["lesions"][0]
    assert {"segment_number", "measurements", "bbox", "centroid_mm"} <= set(les)
    assert les["measurements"]["suv_max"] > 0
    assert_dciodvfy_clean(sr)


def test_cli_analyse_refusal_exit_code(tmp_path: Path) -> None:
    res = CliRunner().invoke(locus, ["analyse", *map(str, CT[:3])])
    assert res.exit_code == 2
    assert "no_pet" in res.output


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name:UserWarning")
def test_pet_without_radiopharmaceutical_reports_bqml(tmp_path: Path, data_dir: Path) -> None:
    """Issue 12, defect 3: a real GE FDG PET with the Radiopharmaceutical Information Sequence
    deleted (no dose, half-life or injection time) still gets a report, in Bq/ml and flagged.

    Six slices of ``pet-ge-sts001`` (Units BQML) with a one-segment SEG written by highdicom;
    the SR is checked with dciodvfy and read back: PET values are DCM 110821 "Nuclear Medicine
    Tomographic Activity" in UCUM Bq/ml, never an SUV concept, and the flag is in the result
    and in the SR.
    """
    import highdicom as hd
    import numpy as np

    from pipelines.dicom.suv import compute_suv
    from pipelines.errors import SuvError
    from pipelines.sr import codes

    pet_files = sorted((data_dir / "pet-ge-sts001" / "raw_pet").glob("*.dcm"))[100:106]
    pets = []
    for f in pet_files:
        ds = pydicom.dcmread(f)
        del ds.RadiopharmaceuticalInformationSequence
        ds.save_as(tmp_path / f.name)
        pets.append(ds)
    with pytest.raises(SuvError) as refused:  # SUV really is impossible: this exercises the fallback
        compute_suv(pets)
    assert refused.value.code == "missing_radiopharmaceutical"
    mask = np.zeros((len(pets), pets[0].Rows, pets[0].Columns), dtype=np.uint8)
    mask[2:4, 60:66, 60:68] = 1
    seg = hd.seg.Segmentation(
        source_images=pets, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            1, "lesion", codes.FINDING_CATEGORY_ABNORMAL, codes.FINDING_LESION,
            hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Locus tests", manufacturer_model_name="fixture", software_versions="1",
        device_serial_number="0",
    )
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)

    r = analyse_study([tmp_path])
    assert r.suv is not None and r.suv.kind.value == "Bq/mL" and r.suv.unit == "Bq/ml"
    assert r.suv.scale_factor is None and r.suv.injection_datetime is None
    fallback = [f for f in r.flags if f.code == "suv_fallback_bqml"]
    assert len(fallback) == 1 and "missing_radiopharmaceutical" in fallback[0].message
    (lesion,) = r.lesions
    # Bq/ml of the stored voxels (slope applied): FDG tissue activity is thousands of Bq/ml, not an SUV
    stored = np.stack([p.pixel_array[60:66, 60:68] * float(p.RescaleSlope) + float(p.RescaleIntercept)
                       for p in pets[2:4]])
    assert lesion.measurements.suv_max == pytest.approx(stored.max(), rel=1e-5)
    assert lesion.measurements.suv_max > 1000
    assert r.sr_dataset is not None
    out = tmp_path / "report" / "sr.dcm"
    out.parent.mkdir()
    r.sr_dataset.save_as(out, enforce_file_format=True)
    assert_dciodvfy_clean(out)
    read = read_measurement_report(out)
    (got,) = read.lesions
    assert got.pet_quantity == codes.to_coded_value(codes.PET_ACTIVITY_CONCENTRATION)
    assert got.pet_measurements and all(
        m.unit == codes.to_coded_value(codes.UNIT_BQ_PER_ML) for m in got.pet_measurements)
    assert got.suv_max == pytest.approx(lesion.measurements.suv_max, rel=1e-6)
    assert got.tlg is None  # TLG is defined for SUV only
    assert got.algorithm.parameter("pet_quantity") == "Bq/mL"
    assert "pet_values_bqml" in {f.code for f in got.flags}
    assert [f.code for f in read.notes].count("suv_fallback_bqml") == 1
    suv_names = {codes.to_coded_value(q.name) for k, q in codes.PET_QUANTITIES.items() if k.value != "Bq/mL"}
    assert not any(m.name in suv_names for m in got.pet_measurements)
