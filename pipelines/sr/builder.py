"""TID 1500 Measurement Report for Locus PET/CT lesion findings (highdicom).

One Comprehensive 3D SR (PS3.3 A.35.13) per analysed study version, placed in the
original study (patient and study modules copied from the evidence) as a new series.
Content tree (PS3.16 TID 1500, compare ``seg-sr-highdicom-smallct/sr``)::

    CONTAINER Imaging Measurement Report (DCM 126000)            TID 1500
      HAS CONCEPT MOD  Language = English (US)                   TID 1204
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID/Name/Manufacturer/Model
      HAS CONCEPT MOD  Procedure reported (SCT 443271005 for FDG, else LN 44139-4)
      CONTAINS CONTAINER Imaging Measurements
        CONTAINER Measurement Group, per lesion                  TID 1411
          Tracking Identifier / Tracking Unique Identifier       TID 4108
          Finding category = Morphologically abnormal structure, Finding = Lesion
          Finding Site (+ Laterality, Topographical modifier)    from the localizer
          Algorithm Name / Version / Parameters / Family         TID 4019
          Referenced Segment (SEG, segment n) + Source series for segmentation
          NUM  SUVbw (or Bq/ml fallback) max / mean / peak, Volume, Metabolic Volume,
               TLG, attenuation coefficient mean (HU), private 99LOCUS NUMs: voxel
               counts, component, bounding box (6), centroid (3), localizer probability
          CODE Anatomic localization (99LOCUS) = coded / approximate / uncoded /
               SCT "Not Evaluated" (no localizer configured, or no CT; the SEG's own
               Anatomic Region Sequence is then the Finding Site when present)
          TEXT localizer label, ranked alternatives, processing flags, comments
        CONTAINER Measurement Group "Study-level zero-shot findings"   TID 1501
          NUM  <finding> score (UCUM 1), CODE <finding> = Present / Absent
        CONTAINER Measurement Group "Study processing notes"            TID 1501
          TEXT processing flags

Design decisions (documented because readers depend on them):

- Segments are referenced with ``ReferencedSegment`` built directly (workaround for
  highdicom's single-segment bug, dicom-guide P1) and ``SourceSeriesForSegmentation``
  rather than one IMAGE item per source slice, to keep whole-body reports small
  (dicom-guide 2.6, 2.7).
- Bounding box and centroid are private NUMs (dicom-guide 2.4 option A) rather than a
  second SCOORD3D group: TID 1411 allows one ROI per group, a second group per lesion
  would double the group count, and dcmqi drops SCOORD3D.  Coordinates are patient LPS
  mm in the Frame of Reference of the referenced SEG (checked when building); the
  box uses the voxel-edge convention, the centroid voxel centres.
- Free-text qualitative evaluations (TEXT with a coded name, TID 1501/1411 row
  "$QualitativeEvaluations ... coded or text answers") carry the localizer label, the
  ranked alternatives and processing flags; highdicom only builds CODE evaluations,
  so the TEXT items are appended to the group container after construction.
- The SOP Instance and Series UIDs are derived from the study UID, the study version
  and a digest of every input that shapes the content (:mod:`pipelines.sr.uids`):
  re-sending the same result yields the same UIDs; pass ``content_datetime`` (the
  stored analysis time) to make the re-sent object byte-identical as well.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import highdicom as hd
import pydicom.multival
import pydicom.sequence
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    ReferencedSegment,
    RelationshipTypeValues,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from pipelines.errors import ReportError
from pipelines.findings import (
    Flag,
    Lesion,
    Localization,
    ModelInfo,
    StudyEncoding,
    SuvInfo,
    SuvKind,
)
from pipelines.sr import codes, uids

logger = logging.getLogger(__name__)

REPORT_LAYOUT_VERSION = "locus-sr-1"
"""Version of this content layout; part of the UID digest so a layout change makes new UIDs."""

DEFAULT_SERIES_NUMBER = 9701
DEFAULT_SERIES_DESCRIPTION = "Locus PET/CT lesion report"

SEGMENTATION_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
    }
)

UTF8 = "ISO_IR 192"  # Specific Character Set for UTF-8 (PS3.3 C.12.1.1.2)


@dataclass(frozen=True)
class DeviceIdentity:
    """The Locus node as SR Device Observer (TID 1004) and as equipment (PS3.3 C.7.5.1).

    ``uid`` None: derived with :func:`pipelines.sr.uids.device_uid` from ``name``,
    ``version`` and the weights hashes of the contributing models (IHE AIR).
    """

    name: str
    manufacturer: str
    model_name: str
    version: str
    uid: str | None = None
    serial_number: str | None = None
    institution_name: str | None = None


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The lesion measurement algorithm (TID 4019 Algorithm Identification)."""

    name: str
    version: str
    parameters: tuple[str, ...] = ()
    manufacturer: str | None = None


class PredecessorReference(NamedTuple):
    """An earlier SR this one replaces (Predecessor Documents Sequence, PS3.3 C.17.2)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


def build_measurement_report(
    *,
    lesions: Sequence[Lesion],
    suv: SuvInfo | None,
    evidence: Sequence[Dataset],
    device: DeviceIdentity,
    algorithm: AlgorithmIdentity,
    models: Sequence[ModelInfo] = (),
    study_version: int,
    predecessor: tuple[str, str, str, str] | None = None,
    study_encoding: StudyEncoding | None = None,
    flags: Sequence[Flag] = (),
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description: str = DEFAULT_SERIES_DESCRIPTION,
    procedure: Code | None = None,
    content_datetime: datetime.datetime | None = None,
    uid_prefix: str | None = None,
) -> Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR for one analysed study version.

    Parameters
    ----------
    lesions
        Measured lesions; each references a segment of a SEG present in ``evidence``.
    suv
        How PET values were converted (None when no PET quantity was measured).
    evidence
        The SEG datasets and the source image headers (CT/PET) the findings were
        computed from; every SEG a lesion references must be here (highdicom lists
        evidence in Current Requested Procedure Evidence and refuses unlisted
        references).  Patient and study attributes are copied from the first image.
    device, algorithm, models
        Identity of the node (Device Observer), of the lesion algorithm (TID 4019), and
        of the models that contributed; the models named by the localizations and the
        study encoding are added automatically.  Their weights hashes derive the device
        UID when ``device.uid`` is None (IHE AIR: a new model is a new device UID).
    study_version
        The study version analysed (>= 1), part of the SR UIDs.
    predecessor
        ``(sop_class_uid, sop_instance_uid, series_instance_uid, study_instance_uid)`` of
        the SR this one supersedes, written to the Predecessor Documents Sequence.
    study_encoding
        HLIP study-level output; its zero-shot findings become a TID 1501 group.
    flags
        Study-level processing flags, written as TEXT notes.
    procedure
        Procedure reported (CID 100); default derived from the PET radiopharmaceutical.
    content_datetime
        Content / series / instance creation date-time; pass the stored analysis time
        to re-create a byte-identical object. Default: now.
    uid_prefix
        Organisation UID root; default ``2.25`` UUID-derived UIDs.

    Raises
    ------
    ReportError
        When the inputs are inconsistent (missing SEG evidence, unknown segment, frame
        of reference mismatch, non-finite values) or highdicom rejects the content.
    """
    if isinstance(study_version, bool) or not isinstance(study_version, int) or study_version < 1:
        raise ReportError(f"study_version must be a positive integer, got {study_version!r}",
                          code="sr_bad_study_version")
    images, segs = _split_evidence(evidence)
    first = images[0] if images else segs[0]
    study_uid = str(first.StudyInstanceUID)
    pred = _predecessor(predecessor)
    contributing = _contributing_models(models, lesions, study_encoding)
    resolved_device = _resolve_device(device, contributing, uid_prefix)
    assert resolved_device.uid is not None  # _resolve_device always fills it

    groups: list[
        VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    ] = []
    series_of_instance = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in images}
    seg_by_uid = {str(ds.SOPInstanceUID): ds for ds in segs}
    for lesion in lesions:
        groups.append(_lesion_group(lesion, suv, seg_by_uid, series_of_instance, algorithm, uid_prefix))
    if study_encoding is not None:
        groups.append(_study_findings_group(study_encoding, study_uid, uid_prefix))
    notes = _study_notes(flags, suv, lesions)
    if notes:
        groups.append(_study_notes_group(notes, study_uid, uid_prefix))

    digest = uids.content_digest(
        {
            "layout": REPORT_LAYOUT_VERSION,
            "highdicom": hd.__version__,
            "study": study_uid,
            "lesions": list(lesions),
            "suv": suv,
            "study_encoding": study_encoding,
            "flags": list(flags),
            "models": contributing,
            "device": resolved_device,
            "algorithm": algorithm,
            "predecessor": list(pred) if pred else None,
            "evidence": sorted(
                (str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.SOPInstanceUID), str(d.SOPClassUID))
                for d in (*images, *segs)
            ),
            "series_number": series_number,
            "series_description": series_description,
            "procedure": None if procedure is None else [procedure.value, procedure.scheme_designator],
        }
    )
    series_uid = uids.sr_series_instance_uid(study_uid, study_version, digest, prefix=uid_prefix)
    sop_uid = uids.sr_sop_instance_uid(study_uid, study_version, digest, prefix=uid_prefix)

    observer = ObserverContext(
        observer_type=codes.OBSERVER_TYPE_DEVICE,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=resolved_device.uid,
            name=resolved_device.name,
            manufacturer_name=resolved_device.manufacturer,
            model_name=resolved_device.model_name,
            serial_number=resolved_device.serial_number,
        ),
    )
    when = content_datetime or datetime.datetime.now()
    try:
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=procedure or _procedure_reported(images),
            imaging_measurements=groups,
            title=codes.REPORT_TITLE,
        )
        sr = Comprehensive3DSR(
            evidence=[*images, *segs],
            content=report,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=resolved_device.manufacturer,
            manufacturer_model_name=resolved_device.model_name,
            software_versions=_software_versions(resolved_device, contributing),
            device_serial_number=resolved_device.serial_number,
            institution_name=resolved_device.institution_name,
            series_description=series_description,
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=[_predecessor_dataset(pred)] if pred else None,
            coding_schemes=[codes.CODING_SCHEME_IDENTIFICATION],
            specific_character_set=_character_set(
                first, report, (series_description, *_device_strings(resolved_device))
            ),
            contributing_equipment=[
                hd.ContributingEquipment(
                    manufacturer=resolved_device.manufacturer,
                    purpose_of_reference=codes.PROCESSING_EQUIPMENT,
                    manufacturer_model_name=resolved_device.model_name,
                    software_versions=resolved_device.version,
                    contribution_datetime=when,
                    contribution_description="Lesion measurement, localization and report creation",
                )
            ],
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"highdicom rejected the measurement report: {exc}", code="sr_build_failed") from exc

    _pin_creation_time(sr, when)
    logger.info(
        "built TID 1500 SR %s (series %s) for study %s version %d: %d lesion groups",
        sop_uid, series_uid, study_uid, study_version, len(lesions),
    )
    return sr


# --------------------------------------------------------------------------------------
# Evidence
# --------------------------------------------------------------------------------------


def _split_evidence(evidence: Sequence[Dataset]) -> tuple[list[Dataset], list[Dataset]]:
    """Source images first (patient/study are copied from evidence[0]), then SEGs; deduplicated."""
    if not evidence:
        raise ReportError("no evidence given: the SR needs the SEG and source image headers",
                          code="sr_no_evidence")
    seen: set[str] = set()
    images: list[Dataset] = []
    segs: list[Dataset] = []
    for ds in evidence:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not ds.get(keyword):
                raise ReportError(f"evidence dataset lacks {keyword}", code="sr_bad_evidence")
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            continue
        seen.add(uid)
        (segs if str(ds.SOPClassUID) in SEGMENTATION_SOP_CLASSES else images).append(ds)
    patients = {str(ds.get("PatientID", "")) for ds in (*images, *segs)}
    if len(patients) > 1:
        raise ReportError("evidence belongs to more than one patient (Patient ID differs)",
                          code="sr_evidence_patient_mismatch")
    # PET first: the report describes PET findings and is placed in the PET's study.
    images.sort(key=lambda d: (d.get("Modality") != "PT", str(d.SeriesInstanceUID),
                               int(d.get("InstanceNumber") or 0), str(d.SOPInstanceUID)))
    segs.sort(key=lambda d: str(d.SOPInstanceUID))
    return images, segs


def _seg_source_series(seg: Dataset, series_of_instance: dict[str, str]) -> str:
    """Series the SEG was derived from.

    Referenced Series Sequence first (PS3.3 C.7.4.3, preferring a series present in the
    evidence); otherwise the series of the evidence images the SEG names as source
    images (Source Image Sequence at top level or in the shared / per-frame Derivation
    Image Sequence), as some producers (e.g. 3D Slicer 2012) omit the Referenced
    Series Sequence.
    """
    candidates = [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])
                  if item.get("SeriesInstanceUID")]
    evidence_series = set(series_of_instance.values())
    for series in candidates:
        if series in evidence_series:
            return series
    if candidates:
        return candidates[0]
    sources = [str(item.ReferencedSOPInstanceUID) for item in seg.get("SourceImageSequence", [])]
    groups = [*seg.get("SharedFunctionalGroupsSequence", []), *seg.get("PerFrameFunctionalGroupsSequence", [])]
    for frame in groups:
        for derivation in frame.get("DerivationImageSequence", []):
            sources.extend(str(item.ReferencedSOPInstanceUID) for item in derivation.get("SourceImageSequence", []))
    found = sorted({series_of_instance[uid] for uid in sources if uid in series_of_instance})
    if len(found) == 1:
        return found[0]
    raise ReportError(
        f"SEG {seg.SOPInstanceUID} names no single source series (no Referenced Series Sequence and "
        f"{len(found)} evidence series among its source images)",
        code="sr_seg_source_unknown",
    )


def _procedure_reported(images: Sequence[Dataset]) -> Code:
    """CID 100: FDG PET/CT whole body when the PET names FDG, else the tracer-agnostic PET code."""
    for ds in images:
        if ds.get("Modality") != "PT":
            continue
        for info in ds.get("RadiopharmaceuticalInformationSequence", []):
            for code_item in info.get("RadiopharmaceuticalCodeSequence", []):
                try:
                    concept = CodedConcept.from_dataset(code_item)
                except (AttributeError, ValueError, TypeError):
                    continue  # an incomplete code item: fall back to the free text
                if concept in (codes.RADIOPHARMACEUTICAL_FDG, codes.RADIOPHARMACEUTICAL_FDG_SRT):
                    return codes.PROCEDURE_FDG_PETCT_WHOLE_BODY
            text = str(info.get("Radiopharmaceutical", "")).upper().replace(" ", "")
            if any(marker in text for marker in codes.FDG_TEXT_MARKERS):
                return codes.PROCEDURE_FDG_PETCT_WHOLE_BODY
    return codes.PROCEDURE_PET_WHOLE_BODY


def _strings(value: object) -> Iterator[str]:
    """Every text value in a dataset tree (for choosing the character set)."""
    if isinstance(value, Dataset):
        for element in value:
            yield from _strings(element.value)
    elif isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple, pydicom.sequence.Sequence, pydicom.multival.MultiValue)):
        for item in value:
            yield from _strings(item)


def _device_strings(device: DeviceIdentity) -> tuple[str, ...]:
    return tuple(v for v in (device.name, device.manufacturer, device.model_name, device.version,
                             device.serial_number, device.institution_name) if v)


def _character_set(source: Dataset, content: Dataset | Sequence[Dataset],
                   extra: Sequence[str]) -> str | list[str] | None:
    """Specific Character Set of the SR (PS3.3 C.12.1.1.2).

    Keep the source's (patient and study text are copied from it); use UTF-8 only when
    Locus's own text needs more than ASCII, because dcmtk 3.6.7 warns on ISO_IR 192.
    A present but empty source value (seen in real GE CT) means the default
    repertoire and is written as absent, which highdicom requires.
    """
    ours_ascii = all(text.isascii() for text in (*_strings(content), *extra))
    value = source.get("SpecificCharacterSet")
    values = [v for v in (value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]) if v]
    if not ours_ascii:
        return UTF8
    if not values:
        return None
    return values[0] if len(values) == 1 else list(value)


def _predecessor(value: tuple[str, str, str, str] | None) -> PredecessorReference | None:
    if value is None:
        return None
    if len(value) != 4 or not all(isinstance(v, str) for v in value):
        raise ReportError("predecessor must be (sop_class_uid, sop_instance_uid, series_uid, study_uid)",
                          code="sr_bad_predecessor")
    for uid in value:
        if not uids.is_valid_uid(uid):
            raise ReportError(f"predecessor reference has an invalid UID {uid!r}", code="sr_bad_predecessor")
    return PredecessorReference(*value)


def _predecessor_dataset(pred: PredecessorReference) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = pred.sop_class_uid
    ds.SOPInstanceUID = pred.sop_instance_uid
    ds.SeriesInstanceUID = pred.series_instance_uid
    ds.StudyInstanceUID = pred.study_instance_uid
    return ds


# --------------------------------------------------------------------------------------
# Device, algorithm, versions
# --------------------------------------------------------------------------------------


def _resolve_device(device: DeviceIdentity, models: Sequence[ModelInfo], prefix: str | None) -> DeviceIdentity:
    if device.uid:
        if not uids.is_valid_uid(device.uid):
            raise ReportError(f"device UID {device.uid!r} is not a valid UID", code="sr_bad_device_uid")
        return device
    return DeviceIdentity(
        name=device.name,
        manufacturer=device.manufacturer,
        model_name=device.model_name,
        version=device.version,
        uid=str(uids.device_uid(device.name, device.version, models, prefix=prefix)),
        serial_number=device.serial_number,
        institution_name=device.institution_name,
    )


def _contributing_models(models: Sequence[ModelInfo], lesions: Sequence[Lesion],
                         encoding: StudyEncoding | None) -> list[ModelInfo]:
    """``models`` plus every model named by a localization or the study encoding, deduplicated.

    So the Device Observer UID changes with any model that shaped the content, even
    one the caller forgot to list.
    """
    found: dict[tuple[str, str], ModelInfo] = {}
    named = [lesion.localization.model for lesion in lesions if lesion.localization is not None]
    for model in (*models, *named, *([encoding.model] if encoding is not None else [])):
        found.setdefault((model.model_id, model.sha256), model)
    return sorted(found.values(), key=lambda m: (m.model_id, m.sha256))


def _software_versions(device: DeviceIdentity, models: Sequence[ModelInfo]) -> list[str]:
    """Software Versions (LO, 64 chars each): node version, then model id @ weights hash."""
    versions = [device.version]
    for model in models:
        versions.append(f"{model.model_id}@{model.sha256[:16]}"[:64])
    return versions


def _model_parameters(role: str, model: ModelInfo) -> list[str]:
    params = [
        f"{role}_model_id={model.model_id}",
        f"{role}_model_name={model.name}",
        f"{role}_model_version={model.version}",
        f"{role}_weights_sha256={model.sha256}",
    ]
    if model.library_hash:
        params.append(f"{role}_library_hash={model.library_hash}")
    return params


def _lesion_algorithm(algorithm: AlgorithmIdentity, suv: SuvInfo | None,
                      localization: Localization | None) -> AlgorithmIdentification:
    params = list(algorithm.parameters)
    if suv is not None:
        params.append(f"pet_quantity={suv.kind.value}")
        params.append(f"pet_decay_reference={suv.decay_reference}")
        if suv.scale_factor is not None:
            params.append(f"suv_scale_factor={suv.scale_factor!r}")
    if localization is not None:
        params.extend(_model_parameters("localizer", localization.model))
        params.append(f"localizer_geometry_mode={localization.geometry_mode}")
    return AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=params or None,
        manufacturer=algorithm.manufacturer,
        # A model contributed (the localizer): mark the group as AI-derived (CID 7162).
        family=codes.ALGORITHM_FAMILY_AI if localization is not None else None,
    )


# --------------------------------------------------------------------------------------
# Lesion group (TID 1411)
# --------------------------------------------------------------------------------------


def _finite(value: float | int, what: str, lesion: Lesion) -> float | int:
    if isinstance(value, bool):
        raise ReportError(f"lesion {lesion.lesion_id}: {what} is a boolean", code="sr_bad_value")
    if isinstance(value, int):
        return int(value)
    number = float(value)
    if not math.isfinite(number):
        raise ReportError(f"lesion {lesion.lesion_id}: {what} is not finite ({value!r})",
                          code="sr_non_finite_value")
    return number


def _lesion_measurements(lesion: Lesion, suv: SuvInfo | None) -> tuple[list[Measurement], list[Flag]]:
    m = lesion.measurements
    out: list[Measurement] = []
    notes: list[Flag] = []
    pet_values = (m.suv_max, m.suv_mean, m.suv_peak)
    if suv is None:
        if any(v is not None for v in (*pet_values, m.tlg)):
            raise ReportError(
                f"lesion {lesion.lesion_id} has PET values but no SuvInfo says what they mean",
                code="sr_suv_info_missing",
            )
    else:
        quantity = codes.PET_QUANTITIES[suv.kind]
        if suv.unit and suv.unit.lower() != str(quantity.unit.value).lower():
            raise ReportError(
                f"SuvInfo says {suv.kind.value} but unit {suv.unit!r} (expected {quantity.unit.value!r})",
                code="sr_suv_unit_mismatch",
            )
        for value, derivation, label in (
            (m.suv_max, codes.DERIVATION_MAX, "PET max"),
            (m.suv_mean, codes.DERIVATION_MEAN, "PET mean"),
            (m.suv_peak, codes.DERIVATION_PEAK, "PET peak"),
        ):
            if value is not None:
                out.append(Measurement(
                    name=quantity.name,
                    value=_finite(value, label, lesion),
                    unit=quantity.unit,
                    derivation=derivation,
                    method=quantity.method,
                ))
        if suv.kind is SuvKind.BQML:
            notes.append(Flag(
                "pet_values_bqml",
                "SUV could not be computed: PET values are activity concentration in Bq/ml, not SUV",
            ))
    out.append(Measurement(name=codes.VOLUME, value=_finite(m.volume_ml, "volume", lesion), unit=codes.UNIT_ML))
    if suv is not None:
        out.append(Measurement(
            name=codes.METABOLIC_VOLUME, value=_finite(m.volume_ml, "metabolic volume", lesion), unit=codes.UNIT_ML
        ))
        tlg_unit = codes.PET_QUANTITIES[suv.kind].tlg_unit
        if m.tlg is not None and tlg_unit is not None:
            out.append(Measurement(name=codes.TOTAL_LESION_GLYCOLYSIS, value=_finite(m.tlg, "TLG", lesion),
                                   unit=tlg_unit))
        elif m.tlg is not None:
            notes.append(Flag("tlg_not_reported", "TLG is defined for SUV only and is not reported in Bq/ml mode"))
    if m.ct_mean_hu is not None:
        out.append(Measurement(
            name=codes.ATTENUATION_COEFFICIENT,
            value=_finite(m.ct_mean_hu, "CT mean", lesion),
            unit=codes.UNIT_HU,
            derivation=codes.DERIVATION_MEAN,
        ))
    out.append(Measurement(name=codes.VOXEL_COUNT, value=_finite(int(m.voxel_count), "voxel count", lesion),
                           unit=codes.UNIT_VOXELS))
    if m.ct_voxel_count is not None:
        out.append(Measurement(name=codes.CT_VOXEL_COUNT,
                               value=_finite(int(m.ct_voxel_count), "CT voxel count", lesion),
                               unit=codes.UNIT_VOXELS))
    if lesion.component is not None:
        out.append(Measurement(name=codes.COMPONENT_NUMBER, value=int(lesion.component), unit=codes.UNIT_NONE))
    center, size = lesion.bbox.center_mm, lesion.bbox.size_mm
    if len(center) != 3 or len(size) != 3 or len(lesion.centroid_mm) != 3:
        raise ReportError(f"lesion {lesion.lesion_id}: bounding box and centroid need three coordinates",
                          code="sr_bad_geometry")
    bounds: list[float] = []
    for axis in range(3):
        c = float(_finite(center[axis], "bounding box centre", lesion))
        s = float(_finite(size[axis], "bounding box size", lesion))
        if s < 0:
            raise ReportError(f"lesion {lesion.lesion_id}: negative bounding box size", code="sr_bad_geometry")
        bounds.extend((c - s / 2.0, c + s / 2.0))
    for code, value in zip(codes.BBOX_CODES, bounds):
        out.append(Measurement(name=code, value=value, unit=codes.UNIT_MM))
    for code, value in zip(codes.CENTROID_CODES, lesion.centroid_mm):
        out.append(Measurement(name=code, value=float(_finite(value, "centroid", lesion)), unit=codes.UNIT_MM))
    loc = lesion.localization
    if loc is not None and loc.calibrated_probability is not None:
        out.append(Measurement(
            name=codes.LOCALIZER_PROBABILITY,
            value=float(_finite(loc.calibrated_probability, "localizer probability", lesion)),
            unit=codes.UNIT_NONE,
        ))
    return out, notes


def _finding_sites(loc: Localization | None, notes: list[Flag]) -> list[FindingSite]:
    if loc is None or loc.site is None:
        return []
    site = loc.site
    modifier = codes.to_concept(site.modifiers[0]) if site.modifiers else None
    if len(site.modifiers) > 1:
        # TID 300 allows one Topographical modifier per Finding Site; keep the rest visible.
        extra = ", ".join(f"{m.meaning} ({m.scheme} {m.value})" for m in site.modifiers[1:])
        notes.append(Flag("site_modifiers_truncated", f"further topographical modifiers of {site.name}: {extra}"))
    return [FindingSite(
        anatomic_location=codes.to_concept(site.code),
        laterality=codes.to_concept(site.laterality) if site.laterality is not None else None,
        topographical_modifier=modifier,
    )]


def _seg_region_sites(lesion: Lesion) -> list[FindingSite]:
    """Finding Sites from the SEG segment's own Anatomic Region Sequence (the sender's coding),
    used only when Locus did not localize the lesion (PS3.3 C.8.20.2; TID 1411 Finding Site)."""
    if lesion.localization is not None:
        return []
    return [FindingSite(anatomic_location=codes.to_concept(region)) for region in lesion.seg_anatomic_regions]


def _not_assessed_reason(lesion: Lesion | None) -> str:
    """Why no localizer output exists for this lesion, in words (never a reason that is not true)."""
    flags = {f.code: f.message for f in lesion.flags} if lesion is not None else {}
    if "location_no_ct" in flags:
        return "the study has no CT, which the anatomical localizer needs"
    return "no anatomical localizer is configured"


def _localization_items(loc: Localization | None,
                        lesion: Lesion | None = None) -> tuple[QualitativeEvaluation, list[TextContentItem]]:  # fmt: skip
    texts: list[TextContentItem] = []
    if loc is None:
        status = codes.LOCALIZATION_NOT_ASSESSED
        comment = f"Anatomic location not assessed by Locus: {_not_assessed_reason(lesion)}."
        if lesion is not None and lesion.seg_anatomic_regions:
            comment += " The Finding Site is the SEG segment's Anatomic Region (the sender's coding)."
        texts.append(_text(codes.COMMENT, comment))
    else:
        if loc.site is None:
            status = codes.LOCALIZATION_UNCODED
        elif loc.site.approximate:
            status = codes.LOCALIZATION_APPROXIMATE
        else:
            status = codes.LOCALIZATION_CODED
        if loc.final_label:
            texts.append(_text(codes.LOCALIZER_LABEL, loc.final_label))
        for rank, alt in enumerate(loc.alternatives[:3], start=1):
            score = float(alt.score)
            if not math.isfinite(score):
                raise ReportError(f"localizer alternative {alt.label!r} has a non-finite score",
                                  code="sr_non_finite_value")
            texts.append(_text(codes.LOCALIZER_ALTERNATIVE, format_alternative(rank, alt.label, score)))
    return QualitativeEvaluation(name=codes.LOCALIZATION_STATUS, value=status), texts


def format_alternative(rank: int, label: str, score: float) -> str:
    """TEXT value of a ranked localizer alternative; parsed back by the reader."""
    return f"#{rank} {label} (score {score!r})"


def _text(name: Code, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def _flag_text(flag: Flag) -> TextContentItem:
    return _text(codes.PROCESSING_FLAG, f"{flag.code}: {flag.message}")


def _append_texts(group: VolumetricROIMeasurementsAndQualitativeEvaluations
                  | MeasurementsAndQualitativeEvaluations, texts: Sequence[TextContentItem]) -> None:
    if texts:
        group[0].ContentSequence.extend(texts)


def _tracking_uid(lesion: Lesion, segment: Dataset, prefix: str | None) -> str:
    """The lesion's own tracking UID; else the segment's (whole segments only); else derived."""
    if lesion.tracking_uid:
        if not uids.is_valid_uid(lesion.tracking_uid):
            raise ReportError(f"lesion {lesion.lesion_id}: tracking UID {lesion.tracking_uid!r} is not a valid UID",
                              code="sr_bad_tracking_uid")
        return lesion.tracking_uid
    seg_tracking = str(segment.get("TrackingUID", "") or "")
    if lesion.component is None and uids.is_valid_uid(seg_tracking):
        return seg_tracking
    return str(uids.lesion_tracking_uid(lesion.seg_sop_instance_uid, lesion.segment_number, lesion.component,
                                        prefix=prefix))


def _lesion_group(
    lesion: Lesion,
    suv: SuvInfo | None,
    seg_by_uid: dict[str, Dataset],
    series_of_instance: dict[str, str],
    algorithm: AlgorithmIdentity,
    prefix: str | None,
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    seg = seg_by_uid.get(lesion.seg_sop_instance_uid)
    if seg is None:
        raise ReportError(
            f"lesion {lesion.lesion_id} references SEG {lesion.seg_sop_instance_uid}, which is not in the evidence",
            code="sr_seg_not_in_evidence",
        )
    segments = {int(item.SegmentNumber): item for item in seg.get("SegmentSequence", [])}
    if lesion.segment_number not in segments:
        raise ReportError(
            f"lesion {lesion.lesion_id}: SEG {seg.SOPInstanceUID} has no segment {lesion.segment_number}",
            code="sr_segment_missing",
        )
    seg_for = seg.get("FrameOfReferenceUID")
    if seg_for and lesion.frame_of_reference_uid and str(seg_for) != lesion.frame_of_reference_uid:
        raise ReportError(
            f"lesion {lesion.lesion_id}: coordinates are in frame of reference {lesion.frame_of_reference_uid} "
            f"but the SEG is in {seg_for}",
            code="sr_frame_of_reference_mismatch",
        )
    tracking_uid = _tracking_uid(lesion, segments[lesion.segment_number], prefix)
    # P1: ReferencedSegment.from_segmentation fails on single-segment SEGs; build it directly.
    referenced_segment = ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=int(lesion.segment_number),
        source_series=SourceSeriesForSegmentation(_seg_source_series(seg, series_of_instance)),
    )
    measurements, notes = _lesion_measurements(lesion, suv)
    sites = _finding_sites(lesion.localization, notes) or _seg_region_sites(lesion)
    status, texts = _localization_items(lesion.localization, lesion)
    group = VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=lesion.tracking_id or lesion.lesion_id),
        referenced_segment=referenced_segment,
        finding_type=codes.FINDING_LESION,
        finding_category=codes.FINDING_CATEGORY_ABNORMAL,
        finding_sites=sites or None,
        algorithm_id=_lesion_algorithm(algorithm, suv, lesion.localization),
        measurements=measurements,
        qualitative_evaluations=[status],
    )
    loc_flags = lesion.localization.flags if lesion.localization is not None else ()
    _append_texts(group, [*texts, *(_flag_text(f) for f in (*notes, *lesion.flags, *loc_flags))])
    return group


# --------------------------------------------------------------------------------------
# Study-level groups (TID 1501)
# --------------------------------------------------------------------------------------


def _study_findings_group(encoding: StudyEncoding, study_uid: str,
                          prefix: str | None) -> MeasurementsAndQualitativeEvaluations:
    params = _model_parameters("encoder", encoding.model)
    params.append(f"preprocessing_version={encoding.preprocessing_version}")
    if encoding.prompt_set_version:
        params.append(f"prompt_set_version={encoding.prompt_set_version}")
    if encoding.crop_description:
        params.append(f"crop={encoding.crop_description}")
    measurements: list[Measurement] = []
    evaluations: list[QualitativeEvaluation] = []
    seen: dict[str, str] = {}
    for finding in encoding.findings:
        code = codes.zero_shot_finding_code(finding.finding)
        if code.value in seen:
            raise ReportError(f"zero-shot finding {finding.finding!r} is listed twice",
                              code="sr_duplicate_finding")
        seen[code.value] = finding.finding
        score = float(finding.score)
        if not math.isfinite(score):
            raise ReportError(f"zero-shot finding {finding.finding!r} has a non-finite score",
                              code="sr_non_finite_value")
        measurements.append(Measurement(name=code, value=score, unit=codes.UNIT_NONE))
        if finding.threshold is not None:
            params.append(f"threshold:{code.value}={float(finding.threshold)!r}")
        if finding.present is not None:
            evaluations.append(QualitativeEvaluation(
                name=code, value=codes.PRESENT if finding.present else codes.ABSENT
            ))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=str(uids.study_findings_tracking_uid(study_uid, encoding.model, prefix=prefix)),
            identifier=codes.STUDY_FINDINGS_TRACKING_ID,
        ),
        algorithm_id=AlgorithmIdentification(
            name=encoding.model.name,
            version=encoding.model.version,
            parameters=params,
            family=codes.ALGORITHM_FAMILY_AI,
        ),
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
    )
    texts = [_flag_text(f) for f in encoding.flags]
    if not encoding.findings:
        texts.append(_text(codes.COMMENT, "Study encoder ran; no zero-shot findings were configured."))
    _append_texts(group, texts)
    return group


def _study_notes(flags: Sequence[Flag], suv: SuvInfo | None, lesions: Sequence[Lesion]) -> list[TextContentItem]:
    # The analysis copies the SUV flags into the study flags too: each note is written once.
    extra = [f for f in (suv.flags if suv is not None else ()) if f not in flags]
    notes = [_flag_text(f) for f in (*flags, *extra)]
    if not lesions:
        notes.append(_text(codes.COMMENT, "No lesion was measured in this study version."))
    return notes


def _study_notes_group(notes: list[TextContentItem], study_uid: str,
                       prefix: str | None) -> MeasurementsAndQualitativeEvaluations:
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=str(uids.study_notes_tracking_uid(study_uid, prefix=prefix)),
            identifier=codes.STUDY_NOTES_TRACKING_ID,
        ),
    )
    group[0].ContentSequence.extend(notes)
    return group


def _pin_creation_time(sr: Comprehensive3DSR, when: datetime.datetime) -> None:
    """Replace the 'now' highdicom stamps (instance creation, its own contribution) by ``when``.

    The acquisition-equipment item copied from the source image keeps its own time.
    """
    sr.InstanceCreationDate = DA(when.strftime("%Y%m%d"))
    sr.InstanceCreationTime = TM(when.strftime("%H%M%S.%f"))
    for item in sr.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom" and "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f")


__all__ = [
    "DEFAULT_SERIES_DESCRIPTION",
    "DEFAULT_SERIES_NUMBER",
    "REPORT_LAYOUT_VERSION",
    "AlgorithmIdentity",
    "DeviceIdentity",
    "PredecessorReference",
    "build_measurement_report",
    "format_alternative",
]
