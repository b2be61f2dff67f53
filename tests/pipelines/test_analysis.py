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
