"""Parse a TID 1500 Measurement Report back into plain values.

Used by the round-trip tests, by predecessor checks (which SR did we send for this
study?) and by operators inspecting what a PACS holds.  The document is parsed
with highdicom (``Comprehensive3DSR.from_dataset`` -> ``MeasurementReport``, its
observer contexts; dicom-guide 2.5).  Measurement groups and their direct children
(NUM, CODE, TEXT, IMAGE, UIDREF items, including private 99LOCUS NUMs and TEXT
qualitative evaluations highdicom has no accessor for) are then read in one pass:
highdicom's per-property tree searches made a 100-lesion report take tens of seconds.

Any SR that is not a TID 1500 report (e.g. a free-form Comprehensive SR) raises
:class:`NotAMeasurementReport`; other producers' TID 1500 reports parse, with only
the parts Locus understands filled in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pydicom.multival
from highdicom.sr import CodedConcept, MeasurementReport
from pydicom import Dataset
from pydicom.sr.coding import Code

from pipelines.errors import ReportError
from pipelines.findings import CodedValue, Flag, RankedLabel
from pipelines.sr import codes

logger = logging.getLogger(__name__)

_SR_CLASSES: dict[str, type[hd.sr.Comprehensive3DSR] | type[hd.sr.ComprehensiveSR] | type[hd.sr.EnhancedSR]] = {
    "1.2.840.10008.5.1.4.1.1.88.34": hd.sr.Comprehensive3DSR,
    "1.2.840.10008.5.1.4.1.1.88.33": hd.sr.ComprehensiveSR,
    "1.2.840.10008.5.1.4.1.1.88.22": hd.sr.EnhancedSR,
}
_ALTERNATIVE = re.compile(r"^#(?P<rank>\d+) (?P<label>.*) \(score (?P<score>[^()]+)\)$", re.DOTALL)
_ML_PER_UNIT = {"ml": 1.0, "mL": 1.0, "cm3": 1.0, "mm3": 1e-3}  # UCUM volume units seen in TID 1500
_FLAG = re.compile(r"^(?P<code>[a-z0-9_]+): (?P<message>.*)$", re.DOTALL)


class NotAMeasurementReport(ReportError):
    """The object is not a TID 1500 Measurement Report (or not an SR at all)."""

    code = "sr_not_measurement_report"


# --------------------------------------------------------------------------------------
# Plain result types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadMeasurement:
    """One TID 300 NUM: concept, value, UCUM unit and modifiers."""

    name: CodedValue
    value: float
    unit: CodedValue
    derivation: CodedValue | None = None
    method: CodedValue | None = None


@dataclass(frozen=True)
class ReadFindingSite:
    """A lesion's finding site as read from the SR."""
    location: CodedValue
    laterality: CodedValue | None = None
    modifier: CodedValue | None = None


@dataclass(frozen=True)
class ReadAlgorithm:
    """TID 4019 Algorithm Identification."""

    name: str
    version: str
    parameters: tuple[str, ...] = ()
    family: CodedValue | None = None
    manufacturer: str | None = None

    def parameter(self, key: str) -> str | None:
        """Value of the first ``key=value`` parameter, or None."""
        prefix = f"{key}="
        for param in self.parameters:
            if param.startswith(prefix):
                return param[len(prefix):]
        return None


@dataclass(frozen=True)
class ReadSegmentReference:
    """The SEG segment a lesion's measurements were made on."""
    sop_class_uid: str
    sop_instance_uid: str
    segment_number: int
    source_series_uid: str | None
    source_instance_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReadLesion:
    """One TID 1411 volumetric measurement group."""

    tracking_id: str | None
    tracking_uid: str | None
    finding_type: CodedValue | None
    finding_category: CodedValue | None
    segment: ReadSegmentReference | None
    measurements: tuple[ReadMeasurement, ...]
    finding_sites: tuple[ReadFindingSite, ...]
    algorithm: ReadAlgorithm | None
    bbox_min_mm: tuple[float, float, float] | None
    bbox_max_mm: tuple[float, float, float] | None
    centroid_mm: tuple[float, float, float] | None
    component: int | None
    voxel_count: int | None
    ct_voxel_count: int | None
    localization_status: CodedValue | None
    localizer_label: str | None
    alternatives: tuple[RankedLabel, ...]
    localizer_probability: float | None
    flags: tuple[Flag, ...]
    comments: tuple[str, ...]

    def measurement(
        self, name: Code | CodedValue, derivation: Code | CodedValue | None = None
    ) -> ReadMeasurement | None:
        """The first measurement with this concept name (and derivation, when given)."""
        for m in self.measurements:
            if not codes.same_code(m.name, name):
                continue
            if derivation is None or (m.derivation is not None and codes.same_code(m.derivation, derivation)):
                return m
        return None

    @property
    def pet_measurements(self) -> tuple[ReadMeasurement, ...]:
        """SUV (any kind) or Bq/ml activity measurements."""
        names = [q.name for q in codes.PET_QUANTITIES.values()]
        return tuple(m for m in self.measurements if any(codes.same_code(m.name, n) for n in names))

    def _pet(self, derivation: Code) -> float | None:
        for m in self.pet_measurements:
            if m.derivation is not None and codes.same_code(m.derivation, derivation):
                return m.value
        return None

    @property
    def pet_quantity(self) -> CodedValue | None:
        """Concept of the PET values (e.g. DCM 126401 SUVbw, or DCM 110821 in Bq/ml)."""
        pet = self.pet_measurements
        return pet[0].name if pet else None

    @property
    def suv_max(self) -> float | None:
        """SUVmax, or None when the SR has none."""
        return self._pet(codes.DERIVATION_MAX)

    @property
    def suv_mean(self) -> float | None:
        """SUVmean, or None when the SR has none."""
        return self._pet(codes.DERIVATION_MEAN)

    @property
    def suv_peak(self) -> float | None:
        """SUVpeak, or None when the SR has none."""
        return self._pet(codes.DERIVATION_PEAK)

    def _value(self, name: Code, derivation: Code | None = None) -> float | None:
        m = self.measurement(name, derivation)
        return None if m is None else m.value

    def _volume_ml(self, name: Code) -> float | None:
        m = self.measurement(name)
        if m is None:
            return None
        factor = _ML_PER_UNIT.get(m.unit.value)
        if factor is None:
            logger.warning("volume in unsupported unit %r not converted to ml", m.unit.value)
            return None
        return m.value * factor

    @property
    def volume_ml(self) -> float | None:
        """Volume (SCT 118565006) in ml, converted from mm3 / cm3 when another producer used those."""
        return self._volume_ml(codes.VOLUME)

    @property
    def metabolic_volume_ml(self) -> float | None:
        """Metabolic volume in ml, or None."""
        return self._volume_ml(codes.METABOLIC_VOLUME)

    @property
    def tlg(self) -> float | None:
        """Total lesion glycolysis, or None."""
        return self._value(codes.TOTAL_LESION_GLYCOLYSIS)

    @property
    def ct_mean_hu(self) -> float | None:
        """Mean CT attenuation in HU, or None."""
        return self._value(codes.ATTENUATION_COEFFICIENT, codes.DERIVATION_MEAN)

    @property
    def location_assessed(self) -> bool:
        """False when the report says no localizer ran for this lesion."""
        return not (
            self.localization_status is not None
            and codes.same_code(self.localization_status, codes.LOCALIZATION_NOT_ASSESSED)
        )


@dataclass(frozen=True)
class ReadZeroShotFinding:
    """One zero-shot finding as read from the SR."""
    finding: str
    score: float
    threshold: float | None
    present: bool | None


@dataclass(frozen=True)
class ReadStudyFindings:
    """The study-level zero-shot findings group (TID 1501)."""

    tracking_uid: str | None
    algorithm: ReadAlgorithm | None
    findings: tuple[ReadZeroShotFinding, ...]
    flags: tuple[Flag, ...]
    comments: tuple[str, ...]


@dataclass(frozen=True)
class ReadDevice:
    """The device observer an SR names (which software wrote it)."""
    uid: str
    name: str | None
    manufacturer: str | None
    model_name: str | None


@dataclass(frozen=True)
class ReadReport:
    """Everything Locus reads back from a TID 1500 Measurement Report."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    series_description: str | None
    title: CodedValue
    procedures: tuple[CodedValue, ...]
    devices: tuple[ReadDevice, ...]
    lesions: tuple[ReadLesion, ...]
    study_findings: ReadStudyFindings | None
    notes: tuple[Flag, ...]
    comments: tuple[str, ...]
    predecessors: tuple[tuple[str, str, str, str], ...]  # (class, instance, series, study)
    evidence: tuple[tuple[str, str, str, str], ...]  # (study, series, instance, class)
    completion_flag: str | None
    verification_flag: str | None
    preliminary_flag: str | None

    def lesion_by_tracking_uid(self, uid: str) -> ReadLesion | None:
        """The lesion with this Tracking UID, or None."""
        for lesion in self.lesions:
            if lesion.tracking_uid == uid:
                return lesion
        return None


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def is_measurement_report(ds: Dataset) -> bool:
    """True for an SR whose root container declares TID 1500 (DCMR)."""
    if str(ds.get("SOPClassUID", "")) not in _SR_CLASSES or "ContentSequence" not in ds:
        return False
    templates = ds.get("ContentTemplateSequence", [])
    return any(str(t.get("TemplateIdentifier", "")) == "1500" for t in templates)


def read_measurement_report(source: str | Path | Dataset) -> ReadReport:
    """Parse a TID 1500 SR (path or dataset) into a :class:`ReadReport`.

    Raises
    ------
    NotAMeasurementReport
        The object is not an SR, or an SR without TID 1500 (e.g. a free-form report).
    ReportError
        The file cannot be read, or highdicom cannot parse the content tree.
    """
    owned = not isinstance(source, Dataset)  # a dataset we read ourselves may be converted in place
    ds = _load(source)
    try:
        result = _read_report(ds, owned)
    except ReportError:
        raise
    except Exception as exc:
        # A received SR is untrusted input: pydicom decodes values lazily and raises many
        # types on a broken element (NotImplementedError for an unknown VR, struct.error,
        # BytesLengthException, OSError on a cut sequence, ...), highdicom others again.
        # Each is a property of the object, reported with a code (found by tests/fuzz).
        raise ReportError(f"cannot parse TID 1500 content of SR {_safe_uid(ds)}: {type(exc).__name__}: {exc}",
                          code="sr_unparseable") from exc
    logger.debug("read TID 1500 SR %s: %d lesion groups", result.sop_instance_uid, len(result.lesions))
    return result


def _safe_uid(ds: Dataset) -> str:
    try:
        return str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # the UID element itself is what is broken
        return "(undecodable SOP Instance UID)"


def _read_report(ds: Dataset, owned: bool) -> ReadReport:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in _SR_CLASSES:
        raise NotAMeasurementReport(
            f"SOP class {sop_class or '(none)'} is not a Comprehensive/Enhanced SR, so not a TID 1500 report"
        )
    if not is_measurement_report(ds):
        title = ds.get("ConceptNameCodeSequence", [Dataset()])[0].get("CodeMeaning", "untitled")
        raise NotAMeasurementReport(
            f"SR {ds.get('SOPInstanceUID', '')} ({title!r}) does not declare template TID 1500"
        )
    sr = _SR_CLASSES[sop_class].from_dataset(ds, copy=not owned)
    report = sr.content
    if not isinstance(report, MeasurementReport):
        raise NotAMeasurementReport(f"SR {ds.SOPInstanceUID} content is not a TID 1500 Measurement Report")
    return _read(ds, report)


def _load(source: str | Path | Dataset) -> Dataset:
    if isinstance(source, Dataset):
        return source
    try:
        return pydicom.dcmread(str(source))
    except Exception as exc:  # InvalidDicomError, OSError, EOFError, struct.error, ... on a broken file
        raise ReportError(f"cannot read DICOM file {Path(source).name}: {type(exc).__name__}: {exc}",
                          code="sr_unreadable") from exc


# --------------------------------------------------------------------------------------
# Parsing helpers
#
# Groups are found with highdicom (template-aware); their direct children are then read
# in one pass from the content items, which is several times faster than highdicom's
# per-property tree searches on reports with hundreds of lesions.
# --------------------------------------------------------------------------------------


def _key(code_item: Dataset) -> tuple[str, str]:
    value = code_item.get("CodeValue") or code_item.get("LongCodeValue") or code_item.get("URNCodeValue") or ""
    return str(value), str(code_item.get("CodingSchemeDesignator", ""))


def _is(code_item: Dataset, code: Code) -> bool:
    """Code item equals ``code`` (value and scheme; SRT items compared through pydicom's map)."""
    value, scheme = _key(code_item)
    if scheme == "SRT" and code.scheme_designator == "SCT":
        return CodedConcept.from_dataset(code_item) == code
    return value == code.value and scheme == code.scheme_designator


def _name_is(item: Dataset, code: Code) -> bool:
    names = item.get("ConceptNameCodeSequence")
    return bool(names) and _is(names[0], code)


def _cv(code_item: Dataset | Code | CodedConcept | None) -> CodedValue | None:
    if code_item is None:
        return None
    if isinstance(code_item, (Code, CodedConcept)):
        return codes.to_coded_value(code_item)
    value, scheme = _key(code_item)
    return CodedValue(value=value, scheme=scheme, meaning=str(code_item.get("CodeMeaning", "")))


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def _measurement_groups(root: Dataset) -> tuple[list[list[Dataset]], list[list[Dataset]]]:
    """Children of the volumetric (TID 1411) and image-level (TID 1501) measurement groups.

    The group template comes from its Content Template Sequence when present, else
    from its ROI items as highdicom decides (Referenced Segment / Volume Surface:
    1411; Image Region / Referenced Segmentation Frame: 1410, ignored here; none: 1501).
    """
    volumetric: list[list[Dataset]] = []
    image: list[list[Dataset]] = []
    for container in _children(root):
        if container.ValueType != "CONTAINER" or not _name_is(container, codes.IMAGING_MEASUREMENTS):
            continue
        for group in _children(container):
            if group.ValueType != "CONTAINER" or not _name_is(group, codes.MEASUREMENT_GROUP):
                continue
            items = _children(group)
            templates = [str(t.get("TemplateIdentifier", "")) for t in group.get("ContentTemplateSequence", [])]
            template = templates[0] if templates else None
            if template is None:
                if any(_name_is(i, codes.REFERENCED_SEGMENT) or _name_is(i, codes.VOLUME_SURFACE) for i in items):
                    template = "1411"
                elif any(_name_is(i, codes.IMAGE_REGION) or _name_is(i, codes.REFERENCED_SEGMENTATION_FRAME)
                         for i in items):
                    template = "1410"
                else:
                    template = "1501"
            if template == "1411":
                volumetric.append(items)
            elif template == "1501":
                image.append(items)
    return volumetric, image


def _texts(items: Sequence[Dataset], name: Code) -> list[str]:
    return [str(i.TextValue) for i in items if i.ValueType == "TEXT" and _name_is(i, name)]


def _code_value(items: Sequence[Dataset], name: Code) -> CodedValue | None:
    for item in items:
        if item.ValueType == "CODE" and _name_is(item, name):
            return _cv(item.ConceptCodeSequence[0])
    return None


def _uidref(items: Sequence[Dataset], name: Code) -> str | None:
    for item in items:
        if item.ValueType == "UIDREF" and _name_is(item, name):
            return str(item.UID)
    return None


def _algorithm(items: Sequence[Dataset]) -> ReadAlgorithm | None:
    names = _texts(items, codes.ALGORITHM_NAME)
    if not names:
        return None
    versions = _texts(items, codes.ALGORITHM_VERSION)
    manufacturers = _texts(items, codes.ALGORITHM_MANUFACTURER)
    return ReadAlgorithm(
        name=names[0],
        version=versions[0] if versions else "",
        parameters=tuple(_texts(items, codes.ALGORITHM_PARAMETERS)),
        family=_code_value(items, codes.ALGORITHM_FAMILY),
        manufacturer=manufacturers[0] if manufacturers else None,
    )


def _flags(items: Sequence[Dataset]) -> tuple[Flag, ...]:
    out = []
    for text in _texts(items, codes.PROCESSING_FLAG):
        match = _FLAG.match(text)
        out.append(Flag(match["code"], match["message"]) if match else Flag("unparsed", text))
    return tuple(out)


def _measurement(item: Dataset) -> ReadMeasurement | None:
    """A TID 300 NUM item; None for a NUM without a value (qualifier only)."""
    values = item.get("MeasuredValueSequence")
    if not values:
        return None
    mv = values[0]
    value = float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)
    children = list(item.get("ContentSequence", []))
    return ReadMeasurement(
        name=_cv(item.ConceptNameCodeSequence[0]),  # type: ignore[arg-type]
        value=value,
        unit=_cv(mv.MeasurementUnitsCodeSequence[0]),  # type: ignore[arg-type]
        derivation=_code_value(children, codes.DERIVATION),
        method=_code_value(children, codes.MEASUREMENT_METHOD),
    )


def _measurements(items: Sequence[Dataset]) -> tuple[ReadMeasurement, ...]:
    out = (_measurement(i) for i in items if i.ValueType == "NUM")
    return tuple(m for m in out if m is not None)


def _finding_sites(items: Sequence[Dataset]) -> tuple[ReadFindingSite, ...]:
    sites = []
    for item in items:
        if item.ValueType == "CODE" and _name_is(item, codes.FINDING_SITE):
            children = list(item.get("ContentSequence", []))
            sites.append(ReadFindingSite(
                location=_cv(item.ConceptCodeSequence[0]),  # type: ignore[arg-type]
                laterality=_code_value(children, codes.LATERALITY),
                modifier=_code_value(children, codes.TOPOGRAPHICAL_MODIFIER),
            ))
    return tuple(sites)


def _triple(measurements: Sequence[ReadMeasurement], names: Sequence[Code]) -> tuple[float, ...] | None:
    values = []
    for name in names:
        found = [m.value for m in measurements if codes.same_code(m.name, name)]
        if not found:
            return None
        values.append(found[0])
    return tuple(values)


def _int_value(measurements: Sequence[ReadMeasurement], name: Code) -> int | None:
    for m in measurements:
        if codes.same_code(m.name, name):
            return int(round(m.value))
    return None


def _segment(items: Sequence[Dataset]) -> ReadSegmentReference | None:
    refs = [i for i in items if i.ValueType == "IMAGE" and _name_is(i, codes.REFERENCED_SEGMENT)]
    if not refs:
        return None
    sop = refs[0].ReferencedSOPSequence[0]
    numbers = sop.get("ReferencedSegmentNumber")
    number = numbers[0] if isinstance(numbers, (list, pydicom.multival.MultiValue)) else numbers
    sources = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items
               if i.ValueType == "IMAGE" and _name_is(i, codes.SOURCE_IMAGE_FOR_SEGMENTATION)]
    return ReadSegmentReference(
        sop_class_uid=str(sop.ReferencedSOPClassUID),
        sop_instance_uid=str(sop.ReferencedSOPInstanceUID),
        segment_number=int(number) if number is not None else 0,
        source_series_uid=_uidref(items, codes.SOURCE_SERIES_FOR_SEGMENTATION),
        source_instance_uids=tuple(str(uid) for uid in sources),
    )


def _alternatives(items: Sequence[Dataset]) -> tuple[RankedLabel, ...]:
    ranked = []
    for text in _texts(items, codes.LOCALIZER_ALTERNATIVE):
        match = _ALTERNATIVE.match(text)
        if match is None:
            logger.warning("unparseable localizer alternative item skipped")
            continue
        ranked.append((int(match["rank"]), RankedLabel(match["label"], float(match["score"]))))
    return tuple(label for _, label in sorted(ranked, key=lambda r: r[0]))


def _lesion(items: list[Dataset]) -> ReadLesion:
    measurements = _measurements(items)
    bbox = _triple(measurements, codes.BBOX_CODES)
    probability = [m.value for m in measurements if codes.same_code(m.name, codes.LOCALIZER_PROBABILITY)]
    labels = _texts(items, codes.LOCALIZER_LABEL)
    tracking_ids = _texts(items, codes.TRACKING_IDENTIFIER)
    return ReadLesion(
        tracking_id=tracking_ids[0] if tracking_ids else None,
        tracking_uid=_uidref(items, codes.TRACKING_UID),
        finding_type=_code_value(items, codes.FINDING),
        finding_category=_code_value(items, codes.FINDING_CATEGORY),
        segment=_segment(items),
        measurements=measurements,
        finding_sites=_finding_sites(items),
        algorithm=_algorithm(items),
        bbox_min_mm=(bbox[0], bbox[2], bbox[4]) if bbox else None,
        bbox_max_mm=(bbox[1], bbox[3], bbox[5]) if bbox else None,
        centroid_mm=_triple(measurements, codes.CENTROID_CODES),  # type: ignore[arg-type]
        component=_int_value(measurements, codes.COMPONENT_NUMBER),
        voxel_count=_int_value(measurements, codes.VOXEL_COUNT),
        ct_voxel_count=_int_value(measurements, codes.CT_VOXEL_COUNT),
        localization_status=_code_value(items, codes.LOCALIZATION_STATUS),
        localizer_label=labels[0] if labels else None,
        alternatives=_alternatives(items),
        localizer_probability=probability[0] if probability else None,
        flags=_flags(items),
        comments=tuple(_texts(items, codes.COMMENT)),
    )


def _study_findings(items: list[Dataset]) -> ReadStudyFindings:
    algorithm = _algorithm(items)
    thresholds: dict[str, float] = {}
    for param in algorithm.parameters if algorithm else ():
        if param.startswith("threshold:") and "=" in param:
            key, value = param[len("threshold:"):].split("=", 1)
            thresholds[key] = float(value)
    presence: dict[str, bool] = {}
    for item in items:
        if item.ValueType == "CODE":
            name = _cv(item.ConceptNameCodeSequence[0])
            if name is not None and codes.is_zero_shot_finding_code(codes.to_concept(name)):
                presence[name.value] = _is(item.ConceptCodeSequence[0], codes.PRESENT)
    findings = []
    for m in _measurements(items):
        if not codes.is_zero_shot_finding_code(codes.to_concept(m.name)):
            continue
        findings.append(ReadZeroShotFinding(
            finding=m.name.meaning,
            score=m.value,
            threshold=thresholds.get(m.name.value),
            present=presence.get(m.name.value),
        ))
    return ReadStudyFindings(
        tracking_uid=_uidref(items, codes.TRACKING_UID),
        algorithm=algorithm,
        findings=tuple(findings),
        flags=_flags(items),
        comments=tuple(_texts(items, codes.COMMENT)),
    )


def _devices(report: MeasurementReport) -> tuple[ReadDevice, ...]:
    out = []
    for context in report.get_observer_contexts(observer_type=codes.OBSERVER_TYPE_DEVICE):
        attrs = context.observer_identifying_attributes
        assert isinstance(attrs, hd.sr.DeviceObserverIdentifyingAttributes)  # selected by observer type above
        out.append(ReadDevice(
            uid=str(attrs.uid),
            name=attrs.name,
            manufacturer=attrs.manufacturer_name,
            model_name=attrs.model_name,
        ))
    return tuple(out)


def _predecessors(ds: Dataset) -> tuple[tuple[str, str, str, str], ...]:
    out = []
    for study in ds.get("PredecessorDocumentsSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for inst in series.get("ReferencedSOPSequence", []):
                out.append((str(inst.ReferencedSOPClassUID), str(inst.ReferencedSOPInstanceUID),
                            str(series.SeriesInstanceUID), str(study.StudyInstanceUID)))
    return tuple(out)


def _evidence(ds: Dataset) -> tuple[tuple[str, str, str, str], ...]:
    out = []
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for inst in series.get("ReferencedSOPSequence", []):
                    out.append((str(study.StudyInstanceUID), str(series.SeriesInstanceUID),
                                str(inst.ReferencedSOPInstanceUID), str(inst.ReferencedSOPClassUID)))
    return tuple(out)


def _read(ds: Dataset, report: MeasurementReport) -> ReadReport:
    root = report[0]
    root_items = list(root.get("ContentSequence", []))
    procedures = tuple(
        _cv(item.ConceptCodeSequence[0]) for item in root_items
        if item.ValueType == "CODE" and _name_is(item, codes.PROCEDURE_REPORTED)
    )
    volumetric, image = _measurement_groups(root)
    lesions = tuple(_lesion(items) for items in volumetric)
    study_findings = None
    notes: list[Flag] = []
    comments: list[str] = []
    for items in image:
        tracking = _texts(items, codes.TRACKING_IDENTIFIER)
        if tracking == [codes.STUDY_FINDINGS_TRACKING_ID]:
            study_findings = _study_findings(items)
        elif tracking == [codes.STUDY_NOTES_TRACKING_ID]:
            notes.extend(_flags(items))
            comments.extend(_texts(items, codes.COMMENT))
    return ReadReport(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_description=str(ds.SeriesDescription) if ds.get("SeriesDescription") else None,
        title=_cv(root.ConceptNameCodeSequence[0]),  # type: ignore[arg-type]
        procedures=tuple(p for p in procedures if p is not None),
        devices=_devices(report),
        lesions=lesions,
        study_findings=study_findings,
        notes=tuple(notes),
        comments=tuple(comments),
        predecessors=_predecessors(ds),
        evidence=_evidence(ds),
        completion_flag=ds.get("CompletionFlag"),
        verification_flag=ds.get("VerificationFlag"),
        preliminary_flag=ds.get("PreliminaryFlag"),
    )
