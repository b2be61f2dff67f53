"""Every coded concept the Locus structured report uses, in one place.

Why one module: concept keywords and meanings drift between pydicom releases, and a
report whose codes are scattered over the builder cannot be reviewed against the
standard.  The builder and the reader import *only* from here, so a code is written
and recognised the same way.

Sources (pydicom 3.0.2 code dictionaries, DICOM PS3.16):

- SUV quantities (CID 7180 / 7469) and their UCUM units (CID 85), SUV calculation
  methods (DCM 126410-126415), measurement derivations (CID 7464), PET
  measurement names metabolic volume / TLG (CID 7466);
- finding type / category (CID 7159 / 7150), procedure reported (CID 100), report
  title (CID 7021), algorithm family (CID 7162), presence (CID 240);
- the private coding scheme ``99LOCUS`` (PS3.16 section 8.2: designators starting
  with ``99`` are private) for concepts the standard does not have: bounding box and
  centroid coordinates, voxel counts, localizer status and ranking, zero-shot
  findings.  Coordinates are patient LPS millimetres (PS3.3 C.7.6.2.1.1) in the
  Frame of Reference of the referenced SEG.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.findings import CodedValue, SuvKind

# --------------------------------------------------------------------------------------
# Private coding scheme
# --------------------------------------------------------------------------------------

LOCUS_SCHEME = "99LOCUS"
"""Private Coding Scheme Designator (PS3.16 section 8.2, "99" prefix)."""

LOCUS_SCHEME_NAME = "Locus PET/CT reporting concepts"
LOCUS_SCHEME_VERSION = "1"

CODING_SCHEME_IDENTIFICATION = CodingSchemeIdentificationItem(
    designator=LOCUS_SCHEME,
    name=LOCUS_SCHEME_NAME,
    version=LOCUS_SCHEME_VERSION,
    responsible_organization="Locus project",
)
"""Coding Scheme Identification Sequence item (PS3.3 C.12.1.1.4) for ``99LOCUS``."""


def _locus(value: str, meaning: str) -> Code:
    if len(value) > 16 or len(meaning) > 64:  # SH / LO limits of the Code Sequence Macro
        raise ValueError(f"private code {value!r} exceeds Code Sequence Macro limits")
    return Code(value, LOCUS_SCHEME, meaning)


# --------------------------------------------------------------------------------------
# Report frame (TID 1500)
# --------------------------------------------------------------------------------------

REPORT_TITLE = codes.cid7021.ImagingMeasurementReport  # DCM 126000, as the highdicom samples
PROCEDURE_FDG_PETCT_WHOLE_BODY = codes.SCT.PETCTFDGImagingOfWholeBody  # SCT 443271005
PROCEDURE_PET_WHOLE_BODY = codes.LN.PETWholeBody  # LN 44139-4, tracer-agnostic
RADIOPHARMACEUTICAL_FDG = codes.SCT.FluorodeoxyglucoseF18  # SCT 35321007
RADIOPHARMACEUTICAL_FDG_SRT = Code("C-B1031", "SRT", "Fluorodeoxyglucose F^18^")  # older PET headers
FDG_TEXT_MARKERS = ("FDG", "FLUORODEOXYGLUCOSE")  # Radiopharmaceutical (0018,0031) free text
PROCEDURE_REPORTED = codes.DCM.ProcedureReported  # DCM 121058
OBSERVER_TYPE_DEVICE = codes.cid270.Device  # DCM 121007 (CID 270)
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # DCM 109104, Contributing Equipment purpose

# --------------------------------------------------------------------------------------
# Measurement group (TID 1411 / 1501)
# --------------------------------------------------------------------------------------

FINDING_LESION = codes.SCT.Lesion  # SCT 52988006
FINDING_CATEGORY_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003
ALGORITHM_FAMILY_AI = codes.cid7162.ArtificialIntelligence  # DCM 123110
ALGORITHM_NAME = codes.DCM.AlgorithmName  # DCM 111001 (reading TID 4019)
ALGORITHM_VERSION = codes.DCM.AlgorithmVersion  # DCM 111003
ALGORITHM_PARAMETERS = codes.DCM.AlgorithmParameters  # DCM 111002
ALGORITHM_FAMILY = codes.DCM.AlgorithmFamily  # DCM 111000
ALGORITHM_MANUFACTURER = codes.DCM.AlgorithmManufacturer  # DCM 122405
FINDING_SITE = codes.SCT.FindingSite  # SCT 363698007
LATERALITY = codes.SCT.Laterality  # SCT 272741003
TOPOGRAPHICAL_MODIFIER = codes.SCT.TopographicalModifier  # SCT 106233006
REFERENCED_SEGMENT = codes.DCM.ReferencedSegment  # DCM 121191
REFERENCED_SEGMENTATION_FRAME = codes.DCM.ReferencedSegmentationFrame  # DCM 121214 (TID 1410)
VOLUME_SURFACE = codes.DCM.VolumeSurface  # DCM 121231 (TID 1411)
IMAGE_REGION = codes.DCM.ImageRegion  # DCM 111030 (TID 1410 / 1411)
IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements  # DCM 126010 (TID 1500)
MEASUREMENT_GROUP = codes.DCM.MeasurementGroup  # DCM 125007 (TID 1501 / 1410 / 1411)
SOURCE_SERIES_FOR_SEGMENTATION = codes.DCM.SourceSeriesForSegmentation  # DCM 121232
SOURCE_IMAGE_FOR_SEGMENTATION = codes.DCM.SourceImageForSegmentation  # DCM 121233
COMMENT = codes.DCM.Comment  # DCM 121106, TEXT notes
TRACKING_IDENTIFIER = codes.DCM.TrackingIdentifier  # DCM 112039 (TID 4108)
TRACKING_UID = codes.DCM.TrackingUniqueIdentifier  # DCM 112040 (TID 4108)
FINDING = codes.DCM.Finding  # DCM 121071, concept name of the finding type
FINDING_CATEGORY = Code("276214006", "SCT", "Finding category")  # as highdicom writes it
DERIVATION = codes.DCM.Derivation  # DCM 121401 (TID 300)
MEASUREMENT_METHOD = codes.SCT.MeasurementMethod  # SCT 370129005 (TID 300)

# Derivations (CID 7464)
DERIVATION_MAX = codes.SCT.Maximum  # SCT 56851009
DERIVATION_MEAN = codes.SCT.Mean  # SCT 373098007
DERIVATION_PEAK = codes.DCM.PeakValueWithinROI  # DCM 126031

# Sizes
VOLUME = codes.SCT.Volume  # SCT 118565006
METABOLIC_VOLUME = codes.DCM.MetabolicVolume  # DCM 126032 (CID 7466)
TOTAL_LESION_GLYCOLYSIS = codes.DCM.TotalLesionGlycolysis  # DCM 126033 (CID 7466)

# CT
ATTENUATION_COEFFICIENT = codes.DCM.AttenuationCoefficient  # DCM 112031 (CID 7180)

# PET quantity when SUV cannot be computed (Bq/mL fallback): the voxel quantity of the
# PET series itself, "Nuclear Medicine Tomographic Activity" (CID 7180), in Bq/ml.
PET_ACTIVITY_CONCENTRATION = codes.DCM.NuclearMedicineTomographicActivity  # DCM 110821

# Units (UCUM)
UNIT_ML = Code("ml", "UCUM", "milliliter")  # valid UCUM, not in pydicom's unit list
UNIT_MM = codes.UCUM.Millimeter
UNIT_HU = codes.UCUM.HounsfieldUnit  # [hnsf'U]
UNIT_BQ_PER_ML = codes.UCUM.BecquerelsPerMilliliter  # Bq/ml
UNIT_GRAM = Code("g", "UCUM", "gram")  # TLG for SUVbw / SUVlbm: g/ml * ml
UNIT_CM2 = Code("cm2", "UCUM", "square centimeter")  # TLG for SUVbsa: cm2/ml * ml
UNIT_NONE = codes.UCUM.NoUnits  # UCUM "1": scores, probabilities, indices
UNIT_VOXELS = Code("{voxels}", "UCUM", "voxels")  # UCUM annotation (dimensionless)

# Presence (CID 240) and "not evaluated" (CID 3703)
PRESENT = codes.SCT.Present  # SCT 52101004
ABSENT = codes.SCT.Absent  # SCT 272519000
NOT_EVALUATED = codes.SCT.NotEvaluated  # SCT 373121007


@dataclass(frozen=True)
class PetQuantity:
    """How one :class:`SuvKind` is written: concept name, unit, method, TLG unit."""

    name: Code
    unit: Code
    method: Code | None
    tlg_unit: Code | None  # None: TLG is not defined for this quantity


PET_QUANTITIES: dict[SuvKind, PetQuantity] = {
    SuvKind.SUV_BW: PetQuantity(
        codes.DCM.Suvbw,  # DCM 126401
        codes.UCUM.StandardizedUptakeValueBodyWeight,  # g/ml{SUVbw}
        codes.DCM.SUVBodyWeightCalculationMethod,  # DCM 126410
        UNIT_GRAM,
    ),
    SuvKind.SUV_LBM_JAMES: PetQuantity(
        codes.DCM.Suvlbm,  # DCM 126402 SUVlbm (James)
        codes.UCUM.StandardizedUptakeValueLeanBodyMassJames,  # g/ml{SUVlbm}
        codes.DCM.SUVLeanBodyMassCalculationMethod,  # DCM 126411
        UNIT_GRAM,
    ),
    SuvKind.SUV_LBM_JANMA: PetQuantity(
        codes.DCM.SuvlbmJanma,  # DCM 126405
        codes.UCUM.StandardizedUptakeValueLeanBodyMassJanma,  # g/ml{SUVlbm(Janma)}
        codes.DCM.SUVLeanBodyMassCalculationJanmahasatianMethod,  # DCM 126414
        UNIT_GRAM,
    ),
    SuvKind.SUV_BSA: PetQuantity(
        codes.DCM.Suvbsa,  # DCM 126403
        codes.UCUM.StandardizedUptakeValueBodySurfaceArea,  # cm2/ml{SUVbsa}
        codes.DCM.SUVBodySurfaceAreaCalculationMethod,  # DCM 126412
        UNIT_CM2,
    ),
    SuvKind.BQML: PetQuantity(PET_ACTIVITY_CONCENTRATION, UNIT_BQ_PER_ML, None, None),
}
"""PET voxel quantity per :class:`SuvKind`; SUV kinds follow CID 7180 and CID 85."""

# --------------------------------------------------------------------------------------
# Private concepts (99LOCUS)
# --------------------------------------------------------------------------------------

# Bounding box: axis-aligned, voxel-edge convention, patient LPS mm, SEG frame of reference.
BBOX_X_MIN = _locus("BBOXXMIN", "Bounding box x minimum (LPS mm, voxel edge)")
BBOX_X_MAX = _locus("BBOXXMAX", "Bounding box x maximum (LPS mm, voxel edge)")
BBOX_Y_MIN = _locus("BBOXYMIN", "Bounding box y minimum (LPS mm, voxel edge)")
BBOX_Y_MAX = _locus("BBOXYMAX", "Bounding box y maximum (LPS mm, voxel edge)")
BBOX_Z_MIN = _locus("BBOXZMIN", "Bounding box z minimum (LPS mm, voxel edge)")
BBOX_Z_MAX = _locus("BBOXZMAX", "Bounding box z maximum (LPS mm, voxel edge)")
BBOX_CODES: tuple[Code, ...] = (BBOX_X_MIN, BBOX_X_MAX, BBOX_Y_MIN, BBOX_Y_MAX, BBOX_Z_MIN, BBOX_Z_MAX)

# Centroid: unweighted centre of the lesion voxels (voxel centres), patient LPS mm.
CENTROID_X = _locus("CENTROIDX", "Centroid x (LPS mm, voxel centres)")
CENTROID_Y = _locus("CENTROIDY", "Centroid y (LPS mm, voxel centres)")
CENTROID_Z = _locus("CENTROIDZ", "Centroid z (LPS mm, voxel centres)")
CENTROID_CODES: tuple[Code, ...] = (CENTROID_X, CENTROID_Y, CENTROID_Z)

VOXEL_COUNT = _locus("VOXELCOUNT", "Lesion voxel count on the PET grid")
CT_VOXEL_COUNT = _locus("CTVOXELCOUNT", "Lesion voxel count on the CT grid")
COMPONENT_NUMBER = _locus("COMPONENT", "Connected component number within segment")

# Anatomical localization (HCL-AL-compatible localizer).
LOCALIZATION_STATUS = _locus("LOCSTATUS", "Anatomic localization")
LOCALIZATION_CODED = _locus("LOCCODED", "Localized by AI, coded site")
LOCALIZATION_APPROXIMATE = _locus("LOCAPPROX", "Localized by AI, nearest coded parent site")
LOCALIZATION_UNCODED = _locus("LOCUNCODED", "Localized by AI, no coded site")
LOCALIZATION_NOT_ASSESSED = NOT_EVALUATED  # standard "Not Evaluated" when no localizer ran
LOCALIZER_LABEL = _locus("LOCLABEL", "Localizer predicted location")
LOCALIZER_ALTERNATIVE = _locus("LOCALT", "Localizer ranked alternative")
LOCALIZER_PROBABILITY = _locus("LOCPROB", "Localizer calibrated probability")

# Processing notes (TEXT): Flag codes and messages.
PROCESSING_FLAG = _locus("FLAG", "Locus processing flag")

# Study-level zero-shot findings (HLIP-compatible study encoder).
STUDY_FINDINGS_TRACKING_ID = "Study-level zero-shot findings"
STUDY_NOTES_TRACKING_ID = "Study processing notes"
ZERO_SHOT_PREFIX = "ZS"


def zero_shot_finding_code(finding: str) -> Code:
    """Private concept for one zero-shot finding prompt (e.g. "pleural effusion").

    The code value is a hash of the full finding text so it stays within the 16
    characters of Code Value (SH) and is stable across releases; the meaning is the
    finding text itself (truncated to the 64 characters of Code Meaning, LO).
    """
    text = finding.strip()
    if not text:
        raise ValueError("zero-shot finding text is empty")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:14].upper()
    return _locus(ZERO_SHOT_PREFIX + digest, text[:64])


def is_zero_shot_finding_code(code: Code | CodedConcept) -> bool:
    """Whether a code is one of Locus's zero-shot finding codes (its private scheme and prefix)."""
    return (
        code.scheme_designator == LOCUS_SCHEME
        and code.value.startswith(ZERO_SHOT_PREFIX)
        and len(code.value) == len(ZERO_SHOT_PREFIX) + 14
    )


# --------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------


def to_concept(value: CodedValue | Code | CodedConcept) -> CodedConcept:
    """A highdicom concept from a Locus :class:`CodedValue` (or a pydicom Code)."""
    if isinstance(value, CodedConcept):
        return value
    if isinstance(value, Code):
        return CodedConcept.from_code(value)
    return CodedConcept(value=value.value, scheme_designator=value.scheme, meaning=value.meaning)


def to_coded_value(concept: Code | CodedConcept) -> CodedValue:
    """A plain :class:`CodedValue` from a highdicom concept or pydicom Code."""
    return CodedValue(
        value=str(concept.value), scheme=str(concept.scheme_designator), meaning=str(concept.meaning)
    )


def _value_and_scheme(code: Code | CodedConcept | CodedValue) -> tuple[str, str]:
    if isinstance(code, CodedValue):
        return code.value, code.scheme
    return str(code.value), str(code.scheme_designator)


def same_code(a: Code | CodedConcept | CodedValue, b: Code | CodedConcept | CodedValue) -> bool:
    """Code equality by value and scheme (SRT and SCT treated alike, as pydicom does).

    Plain tuple comparison unless exactly one side is SRT (then pydicom's SRT-to-SCT
    map decides): readers compare thousands of codes per report.
    """
    ka, kb = _value_and_scheme(a), _value_and_scheme(b)
    if ka[1] == kb[1] or "SRT" not in (ka[1], kb[1]):
        return ka == kb
    return to_concept(a) == to_concept(b)
