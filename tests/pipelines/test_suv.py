"""SUV conversion: the 17 SUV DROs, a real GE PET confirmed by MIRP, 8 vendor headers, and the refusals."""

from __future__ import annotations

import copy
import json
import math
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipelines.dicom.series import analyse_geometry, build_volume, read_headers
from pipelines.dicom.suv import (
    bsa_du_bois_m2,
    compute_suv,
    lbm_james_kg,
    lbm_janmahasatian_kg,
    suv_or_fallback,
)
from pipelines.dicom.volume import Volume
from pipelines.errors import SuvError
from pipelines.findings import SuvKind

# ---------------------------------------------------------------------------------------
# SUV digital reference objects (oncoray/suv_computation)
# ---------------------------------------------------------------------------------------
DRO_CASES = [
    "DRO_0_0", "DRO_1_0", "DRO_2_0", "DRO_2_1", "DRO_2_2", "DRO_2_3", "DRO_2_4", "DRO_2_5", "DRO_3_0",
    "DRO_3_1", "DRO_3_2", "DRO_3_3", "DRO_3_4", "DRO_4_0", "DRO_4_1", "DRO_4_2", "DRO_5_0",
]
DRO_REFERENCE = {  # how the decay reference must be found for each special case
    "DRO_0_0": "series_time",
    "DRO_2_0": "stored_suv_bw",
    "DRO_2_1": "stored_suv_lbmjames128",
    "DRO_2_2": "stored_suv_ibw",
    "DRO_2_3": "stored_suv_bsa",
    "DRO_2_4": "philips_suv_scale_factor",
    "DRO_2_5": "series_time+philips_activity_scale_factor",
    "DRO_3_1": "admin",
    "DRO_3_2": "frame_timing_backcomputed",
    "DRO_3_3": "ge_private_scan_datetime",
    "DRO_3_4": "none",
}


@pytest.fixture(scope="module")
def dro_mask(data_dir: Path) -> np.ndarray:
    img = nib.load(str(data_dir / "suv-dro/DRO/DRO_0_0/mask/DRO_mask.nii.gz"))
    # NIfTI axes (i, j, k) with RAS affine diag(-4, -4, 4): i runs to L, j to P, like the DICOM rows/columns
    np.testing.assert_allclose(img.affine, np.diag([-4.0, -4.0, 4.0, 1.0]))
    mask = np.transpose(np.asarray(img.dataobj) > 0, (2, 1, 0))
    assert int(mask.sum()) == 203202
    return mask


@pytest.mark.parametrize("case", DRO_CASES)
def test_dro_case(case: str, data_dir: Path, dro_mask: np.ndarray) -> None:
    headers = read_headers(sorted((data_dir / "suv-dro/DRO" / case / "PT").glob("*.dcm")))
    vol = build_volume(headers)
    np.testing.assert_allclose(vol.affine, np.diag([4.0, 4.0, 4.0, 1.0]))  # the mask's grid, origin 0
    conv = compute_suv(headers)
    assert conv.info.kind == SuvKind.SUV_BW and conv.info.unit == "g/ml{SUVbw}"
    suv = conv.apply(vol).array
    inside = suv[dro_mask]
    tol = 0.03 if case == "DRO_2_3" else 0.015  # DRO_2_3: SUVbsa quantised by slope 0.01 (data README)
    assert float(inside.min()) == pytest.approx(0.20, abs=tol)
    assert float(np.median(inside)) == pytest.approx(1.00, abs=tol)
    assert float(inside.max()) == pytest.approx(4.00, abs=tol)
    # zero surround; DRO_3_4 alone also has 11,289 background-valued voxels (SUV 1.0) on its
    # first slice outside the shared mask (a property of that DRO's pixel data, measured)
    outside = np.abs(suv[1:] if case == "DRO_3_4" else suv)[~(dro_mask[1:] if case == "DRO_3_4" else dro_mask)]
    assert float(outside.max()) == 0.0
    if case in DRO_REFERENCE:
        assert conv.info.decay_reference == DRO_REFERENCE[case]
    if case == "DRO_2_3":  # the README's Du Bois back-conversion figures
        assert float(inside.min()) == pytest.approx(0.1894, abs=2e-4)
        assert float(inside.max()) == pytest.approx(3.9770, abs=2e-4)


def test_dro_baseline_factor_and_flags(data_dir: Path) -> None:
    base = data_dir / "suv-dro/DRO"
    conv = compute_suv(read_headers(sorted((base / "DRO_0_0/PT").glob("*.dcm"))))
    assert conv.info.scale_factor == pytest.approx(2.7777812e-4, rel=1e-6)
    assert conv.info.injection_datetime == "2025-01-01T10:00:00"
    assert conv.info.reference_datetime == "2025-01-01T11:00:00"
    assert conv.info.flags == ()

    mbq = compute_suv(read_headers(sorted((base / "DRO_3_0/PT").glob("*.dcm"))))
    assert mbq.info.scale_factor == pytest.approx(2.7777812e-4, rel=1e-6)
    assert "dose_assumed_mbq" in {f.code for f in mbq.info.flags}

    midnight = compute_suv(read_headers(sorted((base / "DRO_4_2/PT").glob("*.dcm"))))
    assert midnight.info.injection_datetime == "2025-01-01T23:30:00"
    assert midnight.info.reference_datetime == "2025-01-02T00:30:00"
    assert "injection_before_midnight" in {f.code for f in midnight.info.flags}


def test_dro_decay_none_per_slice_alignment(data_dir: Path) -> None:
    """DecayCorrection NONE: slices acquired at 11:00 and 11:05 get different factors, matched by UID."""
    headers = read_headers(sorted((data_dir / "suv-dro/DRO/DRO_3_4/PT").glob("*.dcm")))
    conv = compute_suv(headers)
    assert not conv.uniform
    assert "decay_corrected_per_slice" in {f.code for f in conv.info.flags}
    lam = math.log(2) / 6586.2
    by_time = {}
    for ds in headers:
        t = float(ds.AcquisitionTime[:2]) * 3600 + float(ds.AcquisitionTime[2:4]) * 60 - 10 * 3600
        x = lam * float(ds.ActualFrameDuration) / 1000
        expected = 70000 / 368.08e6 * x / -math.expm1(-x) * math.exp(lam * t)
        assert conv.factors[(ds.SOPInstanceUID, None)] == pytest.approx(expected, rel=1e-12)
        by_time[ds.AcquisitionTime] = expected
    assert len(by_time) == 2

    vol = build_volume(headers)
    reversed_vol = Volume(array=vol.array[::-1].copy(), affine=vol.affine, slice_sources=vol.slice_sources[::-1],
                          series_instance_uid=vol.series_instance_uid)
    np.testing.assert_array_equal(conv.apply(reversed_vol).array[::-1], conv.apply(vol).array)

    with pytest.raises(SuvError) as err:  # a volume whose slices are not those headers
        conv.factors_for(Volume(array=vol.array, affine=vol.affine, slice_sources=(("1.2.3", None),) * 20))
    assert err.value.code == "suv_alignment"
    with pytest.raises(SuvError) as err:  # resampled: no sources, and the factor is not uniform
        conv.factors_for(Volume(array=vol.array, affine=vol.affine))
    assert err.value.code == "suv_alignment"


def test_dro_other_suv_kinds(data_dir: Path, dro_mask: np.ndarray) -> None:
    base = data_dir / "suv-dro/DRO"
    # SUVbsa from Bq/ml must reproduce what the producer stored in DRO_2_3 (Units CM2ML, Du Bois)
    bq = read_headers(sorted((base / "DRO_0_0/PT").glob("*.dcm")))
    bsa = compute_suv(bq, SuvKind.SUV_BSA)
    assert bsa.info.unit == "cm2/ml{SUVbsa}"
    stored = read_headers(sorted((base / "DRO_2_3/PT").glob("*.dcm")))
    a = bsa.apply(build_volume(bq)).array[dro_mask]
    b = build_volume(stored).array[dro_mask]  # rescaled stored SUVbsa
    assert np.abs(a - b).max() < 0.01  # within one stored quantum (slope 0.01; the DRO truncates 1.056 to 1.05)
    # PatientSex O: SUL needs M or F, the DRO gives O
    with pytest.raises(SuvError) as err:
        compute_suv(bq, SuvKind.SUV_LBM_JAMES)
    assert err.value.code == "missing_sex"


# ---------------------------------------------------------------------------------------
# Real GE Discovery ST PET (TCIA STS_001), confirmed by MIRP
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sts_headers(data_dir: Path) -> list[Dataset]:
    return read_headers(sorted((data_dir / "pet-ge-sts001/raw_pet").glob("*.dcm")))


def test_ge_sts001_factor(sts_headers: list[Dataset], data_dir: Path) -> None:
    expected = json.loads((data_dir / "expected.json").read_text())["pet-ge-sts001"]["suvbw_factor"]
    conv = compute_suv(sts_headers)
    assert conv.uniform
    assert conv.info.scale_factor == pytest.approx(expected["value"], rel=1e-6)
    assert conv.info.decay_reference == "series_time"
    dt = datetime.fromisoformat(conv.info.reference_datetime) - datetime.fromisoformat(conv.info.injection_datetime)
    assert dt.total_seconds() == expected["delta_t_s"]


def test_ge_sts001_voxelwise_equals_mirp(sts_headers: list[Dataset], data_dir: Path) -> None:
    """MIRP's SUV copy (Units GML, cropped) equals ours at the same physical voxels, to its quantisation."""
    suv = compute_suv(sts_headers).apply(build_volume(sts_headers))
    mirp_headers = read_headers(sorted((data_dir / "pet-ge-sts001/mirp_suv_pet").glob("*.dcm")))
    mirp_conv = compute_suv(mirp_headers)
    assert mirp_conv.info.decay_reference == "stored_suv_bw"
    mirp = mirp_conv.apply(build_volume(mirp_headers))
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in mirp.array.shape], indexing="ij")
    idx = suv.lps_to_index(mirp.index_to_lps(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)))
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-4)  # same lattice: a crop
    i, j, k = np.round(idx).astype(int).T
    ours = suv.array[k, j, i]
    theirs = mirp.array.ravel()
    slopes = np.array([r.slope for r in analyse_geometry(mirp_headers).refs])[kk.ravel()]
    assert np.all(np.abs(ours - theirs) <= 1.01 * slopes)  # within one stored quantum of MIRP's file
    sel = theirs > 1.0
    assert sel.sum() > 10000
    assert np.abs(ours[sel] / theirs[sel] - 1).max() < 1e-3  # "all ratios within 0.1%"


def test_ge_sts001_lean_body_mass_against_mirp_ranges(sts_headers: list[Dataset], data_dir: Path) -> None:
    expected = json.loads((data_dir / "expected.json").read_text())["pet-ge-sts001"]
    suvbw_max = expected["GTV_Mass_in_raw_pet"]["SUVbw_max"]
    bw = compute_suv(sts_headers).info.scale_factor
    james = compute_suv(sts_headers, SuvKind.SUV_LBM_JAMES)
    janma = compute_suv(sts_headers, SuvKind.SUV_LBM_JANMA)
    assert james.info.unit == "g/ml{SUVlbm(James128)}"
    # MIRP's source-given ranges for GTV_Mass: SUVlbm max 5.9-6.1, SUVlbm (BMI form) max 5.8-5.9
    assert 5.9 < suvbw_max * james.info.scale_factor / bw < 6.1
    assert 5.8 < suvbw_max * janma.info.scale_factor / bw < 5.9
    # the formulas themselves: 71 kg, 163 cm, male
    assert lbm_james_kg(71, 163, "M") == pytest.approx(1.10 * 71 - 128 * (71 / 163) ** 2)
    assert lbm_janmahasatian_kg(71, 163, "M") == pytest.approx(9270 * 71 / (6680 + 216 * 71 / 1.63**2))
    assert bsa_du_bois_m2(70, 175) == pytest.approx(1.8481, abs=1e-4)  # the DRO README's BSA


# ---------------------------------------------------------------------------------------
# Vendor header excerpts (cornerstonejs/calculate-suv)
# ---------------------------------------------------------------------------------------
VENDOR_CASES = [
    "PHILIPS_BQML", "PHILIPS_CNTS_AND_BQML_SUV", "PHILIPS_CNTS_AND_SUV", "SIEMENS", "GE_MEDICAL_AND_BQML",
    "BQML_AC_DT_lessThan_S_DT_SIEMENS", "CPS_AND_BQML_AC_DT_-_S_DT", "RADIOPHARM_DATETIME_UNDEFINED",
]
_RADIOPHARM = {"RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime",
               "RadiopharmaceuticalStartDateTime"}


def json_to_dataset(instance: dict, series_uid: str) -> Dataset:
    """Adapter: one calculate-suv instance record to a PET header Dataset."""
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "PT"
    rp = Dataset()
    for key, value in instance.items():
        if key == "PhilipsPETPrivateGroup":
            if value:
                block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
                if "SUVScaleFactor" in value:
                    block.add_new(0x00, "DS", value["SUVScaleFactor"].strip())
                if "ActivityConcentrationScaleFactor" in value:
                    block.add_new(0x09, "DS", value["ActivityConcentrationScaleFactor"].strip())
        elif key in _RADIOPHARM:
            setattr(rp, key, value.strip() if isinstance(value, str) else value)
        else:
            setattr(ds, key, value)
    ds.RadiopharmaceuticalInformationSequence = [rp]
    return ds


def _vendor(data_dir: Path, case: str) -> list[Dataset]:
    records = json.loads((data_dir / f"suv-vendor-metadata/{case}-instances.json").read_text())
    series_uid = generate_uid()
    return [json_to_dataset(r, series_uid) for r in records]


@pytest.mark.parametrize("case", VENDOR_CASES)
def test_vendor_metadata_factor(case: str, data_dir: Path) -> None:
    expected = json.loads((data_dir / "expected.json").read_text())["suv-vendor-metadata"]["suvbw_factor"][case]
    headers = _vendor(data_dir, case)
    conv = compute_suv(headers)
    first = conv.factors[(headers[0].SOPInstanceUID, None)]
    assert first == pytest.approx(expected["value"], abs=1e-6)
    if "confirmed_by" in expected:  # two implementations agree far below the upstream tolerance
        assert first == pytest.approx(expected["value"], rel=1e-9)


def test_vendor_reference_time_rules(data_dir: Path) -> None:
    # FrameReferenceTime 0 carries no timing: earliest acquisition, flagged
    conv = compute_suv(_vendor(data_dir, "CPS_AND_BQML_AC_DT_-_S_DT"))
    assert conv.info.decay_reference == "earliest_acquisition_time"
    assert "reference_time_earliest_acquisition" in {f.code for f in conv.info.flags}
    assert compute_suv(_vendor(data_dir, "BQML_AC_DT_lessThan_S_DT_SIEMENS")).info.decay_reference == (
        "frame_timing_backcomputed")
    assert compute_suv(_vendor(data_dir, "PHILIPS_CNTS_AND_SUV")).info.decay_reference == "philips_suv_scale_factor"
    # Units BQML with Philips private factors present: the private factors are not used
    assert compute_suv(_vendor(data_dir, "PHILIPS_BQML")).info.decay_reference == "series_time"


# ---------------------------------------------------------------------------------------
# Refusals and the Bq/ml fallback
# ---------------------------------------------------------------------------------------
def _edited(data_dir: Path, case: str, edit) -> list[Dataset]:  # type: ignore[no-untyped-def]
    headers = [copy.deepcopy(ds) for ds in _vendor(data_dir, case)]
    for ds in headers:
        edit(ds)
    return headers


def _suv_code(headers: list[Dataset], kind: SuvKind = SuvKind.SUV_BW) -> str:
    with pytest.raises(SuvError) as err:
        compute_suv(headers, kind)
    assert err.value.reason
    return err.value.code


def test_missing_weight_falls_back_to_bqml(data_dir: Path) -> None:
    headers = _edited(data_dir, "SIEMENS", lambda ds: delattr(ds, "PatientWeight"))
    assert _suv_code(headers) == "missing_weight"
    conv = suv_or_fallback(headers)
    assert conv.info.kind == SuvKind.BQML and conv.info.unit == "Bq/ml"
    assert conv.info.scale_factor is None
    assert conv.info.flags[0].code == "suv_fallback_bqml"
    assert "missing_weight" in conv.info.flags[0].message
    assert set(conv.factors.values()) == {1.0}
    assert set(conv.factors) == {(ds.SOPInstanceUID, None) for ds in headers}


def test_missing_dose_falls_back_to_bqml(data_dir: Path) -> None:
    def no_dose(ds: Dataset) -> None:
        del ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose

    headers = _edited(data_dir, "GE_MEDICAL_AND_BQML", no_dose)
    assert _suv_code(headers) == "missing_dose"
    assert suv_or_fallback(headers).info.flags[0].code == "suv_fallback_bqml"


def test_missing_radiopharmaceutical_sequence_falls_back_to_bqml(data_dir: Path) -> None:
    """Issue 12, defect 3: no Radiopharmaceutical Information Sequence at all is still Bq/ml."""
    for case in ("GE_MEDICAL_AND_BQML", "PHILIPS_CNTS_AND_BQML_SUV"):
        def no_sequence(ds: Dataset, case: str = case) -> None:
            del ds.RadiopharmaceuticalInformationSequence
            if case.startswith("PHILIPS"):  # only the activity factor: the SUV factor would bypass the dose
                del ds[0x70531000]

        headers = _edited(data_dir, case, no_sequence)
        assert _suv_code(headers) == "missing_radiopharmaceutical"
        conv = suv_or_fallback(headers)
        assert conv.info.kind == SuvKind.BQML and conv.info.unit == "Bq/ml"
        assert conv.info.flags[0].code == "suv_fallback_bqml"
        assert "missing_radiopharmaceutical" in conv.info.flags[0].message
        assert set(conv.factors) == {(ds.SOPInstanceUID, None) for ds in headers}
        assert all(v > 0 for v in conv.factors.values())


def test_cnts_activity_factor_fallback_and_no_factor(data_dir: Path) -> None:
    # CNTS with only the activity factor: fallback values are Bq/ml = counts x ACSF
    def only_acsf(ds: Dataset) -> None:
        del ds[0x7053, 0x1000]
        ds.PatientWeight = None

    headers = _edited(data_dir, "PHILIPS_CNTS_AND_BQML_SUV", only_acsf)
    conv = suv_or_fallback(headers)
    assert conv.info.kind == SuvKind.BQML
    assert list(conv.factors.values()) == [pytest.approx(1.602563)] * 3

    def no_factor(ds: Dataset) -> None:
        del ds[0x7053, 0x1000]
        del ds[0x7053, 0x1009]

    bare = _edited(data_dir, "PHILIPS_CNTS_AND_BQML_SUV", no_factor)
    assert _suv_code(bare) == "unsupported_units"
    with pytest.raises(SuvError):  # not even Bq/ml: nothing quantitative to fall back to
        suv_or_fallback(bare)


def test_other_refusals(data_dir: Path) -> None:
    def two_tracers(ds: Dataset) -> None:
        ds.RadiopharmaceuticalInformationSequence.append(copy.deepcopy(ds.RadiopharmaceuticalInformationSequence[0]))

    assert _suv_code(_edited(data_dir, "SIEMENS", two_tracers)) == "multiple_radiopharmaceuticals"

    def no_half_life(ds: Dataset) -> None:
        del ds.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife

    assert _suv_code(_edited(data_dir, "SIEMENS", no_half_life)) == "missing_half_life"

    def no_attn(ds: Dataset) -> None:
        ds.CorrectedImage = ["NORM", "DECY"]

    assert _suv_code(_edited(data_dir, "SIEMENS", no_attn)) == "not_attenuation_corrected"

    def late_injection(ds: Dataset) -> None:
        ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime = "20201217120000"

    assert _suv_code(_edited(data_dir, "SIEMENS", late_injection)) == "injection_after_scan"

    def no_injection(ds: Dataset) -> None:
        rp = ds.RadiopharmaceuticalInformationSequence[0]
        del rp.RadiopharmaceuticalStartDateTime
        del rp.RadiopharmaceuticalStartTime

    assert _suv_code(_edited(data_dir, "SIEMENS", no_injection)) == "missing_injection_time"

    headers = _vendor(data_dir, "SIEMENS")
    headers[1].PatientWeight = 80
    assert _suv_code(headers) == "inconsistent_pet_headers"

    headers = _edited(data_dir, "SIEMENS", lambda ds: setattr(ds, "Units", "PROPCPS"))
    assert _suv_code(headers) == "unsupported_units"

    def gml_lbm_without_height(ds: Dataset) -> None:
        ds.Units = "GML"
        ds.SUVType = "LBMJAMES128"

    assert _suv_code(_edited(data_dir, "SIEMENS", gml_lbm_without_height)) == "missing_height"


def test_decay_none_requires_frame_timing(data_dir: Path) -> None:
    def none_without_duration(ds: Dataset) -> None:
        ds.DecayCorrection = "NONE"
        ds.CorrectedImage = ["NORM", "ATTN", "SCAT"]
        del ds.ActualFrameDuration

    assert _suv_code(_edited(data_dir, "SIEMENS", none_without_duration)) == "missing_frame_timing"

    def none_with_timing(ds: Dataset) -> None:
        ds.DecayCorrection = "NONE"
        ds.CorrectedImage = ["NORM", "ATTN", "SCAT"]

    conv = compute_suv(_edited(data_dir, "SIEMENS", none_with_timing))
    assert conv.info.decay_reference == "none"
    # undecayed activity: larger factor than the START-corrected one (decay from injection to scan)
    assert conv.info.scale_factor > compute_suv(_vendor(data_dir, "SIEMENS")).info.scale_factor


def test_weight_in_grams_and_gml_suv_types(data_dir: Path) -> None:
    headers = _edited(data_dir, "SIEMENS", lambda ds: setattr(ds, "PatientWeight", 67000))
    conv = compute_suv(headers)
    assert conv.info.scale_factor == pytest.approx(0.00042748316187197236, rel=1e-9)
    assert "weight_assumed_grams" in {f.code for f in conv.info.flags}

    def gml(ds: Dataset) -> None:
        ds.Units = "GML"
        ds.SUVType = "LBMJAMES128"
        ds.PatientSize = 1.80

    stored_lbm = compute_suv(_edited(data_dir, "SIEMENS", gml))  # male, 67 kg, 180 cm
    assert stored_lbm.info.scale_factor == pytest.approx(67 / lbm_james_kg(67, 180, "M"))
    # ... and asking for SUVlbm of stored SUVlbm gives the identity
    assert compute_suv(_edited(data_dir, "SIEMENS", gml), SuvKind.SUV_LBM_JAMES).info.scale_factor == (
        pytest.approx(1.0))
