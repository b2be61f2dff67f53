"""Typed, in-memory outputs of a study analysis ("findings").

These frozen dataclasses are the contract between the pipeline stages (volumes, SUV,
lesions, localizer, study encoder, SR builder) and the node, which stores them in the
results database and passes them through the queue as JSON (``to_json``).  They hold
plain Python values only: no pixel data, no pydicom objects.

Coordinates are patient LPS millimetres (DICOM PS3.3 C.7.6.2.1.1) in the Frame of
Reference named next to them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any


def _plain(value: Any) -> Any:
    """Convert dataclasses, enums, tuples and numpy scalars into JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class CodedValue:
    """A coded concept (PS3.3 Table 8.8-1 Code Sequence Macro), independent of pydicom."""

    value: str
    scheme: str
    meaning: str

    def to_json(self) -> dict[str, str]:
        """The code as JSON."""
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> CodedValue:
        """A code from its JSON form."""
        return cls(value=data["value"], scheme=data["scheme"], meaning=data["meaning"])


@dataclass(frozen=True)
class Flag:
    """Something the radiologist or operator should know about a result.

    ``code`` is stable snake_case (e.g. ``suv_fallback_bqml``, ``no_ct``,
    ``ct_series_chosen``); ``message`` is the human-readable reason.
    """

    code: str
    message: str


class SuvKind(str, enum.Enum):
    """What the PET voxel values used for measurement mean."""

    SUV_BW = "SUVbw"  # g/mL, body weight (default)
    SUV_LBM_JAMES = "SUVlbm-James"
    SUV_LBM_JANMA = "SUVlbm-Janmahasatian"
    SUV_BSA = "SUVbsa"  # cm2/mL
    BQML = "Bq/mL"  # fallback when SUV cannot be computed


@dataclass(frozen=True)
class SuvInfo:
    """How PET activity was converted to SUV (QIBA vendor-neutral algorithm)."""

    kind: SuvKind
    unit: str  # UCUM, e.g. "g/ml{SUVbw}" or "Bq/ml"
    scale_factor: float | None  # SUV per Bq/mL (body weight); None for Bq/mL fallback
    decay_reference: str  # e.g. "series_time", "ge_private_scan_datetime", "acquisition_time", "admin", "none"
    injection_datetime: str | None
    reference_datetime: str | None
    flags: tuple[Flag, ...] = ()


@dataclass(frozen=True)
class BoundingBox:
    """Axis-aligned box in LPS mm enclosing the lesion's voxels (voxel-edge convention)."""

    center_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]


@dataclass(frozen=True)
class LesionMeasurements:
    """Per-lesion quantities; SUV values are in ``SuvInfo.unit`` (g/mL for SUVbw)."""

    voxel_count: int  # on the grid the mask was measured on (PET grid)
    volume_ml: float  # metabolic tumour volume (segment volume on the PET grid)
    suv_max: float | None
    suv_mean: float | None
    suv_peak: float | None  # 1 mL sphere (QIBA/PERCIST); None if not computable
    tlg: float | None  # total lesion glycolysis = suv_mean * volume_ml
    ct_mean_hu: float | None  # None when no CT is available
    ct_voxel_count: int | None = None


@dataclass(frozen=True)
class SiteAssignment:
    """An anatomical site for a lesion, coded for the SR Finding Site (TID 300, SCT 363698007)."""

    site_id: str  # Locus anatomy library identifier
    name: str
    code: CodedValue  # anatomic location concept (SNOMED CT)
    laterality: CodedValue | None = None  # CID 244
    modifiers: tuple[CodedValue, ...] = ()  # topographical modifiers (CID 2 / others)
    approximate: bool = False  # nearest parent concept used because no exact code exists


@dataclass(frozen=True)
class RankedLabel:
    """One candidate label with its model score."""
    label: str
    score: float


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a model that contributed to a result (recorded in SR and database)."""

    model_id: str
    name: str
    version: str
    sha256: str  # of the weights file(s)
    library_hash: str | None = None


@dataclass(frozen=True)
class Localization:
    """Output of the hierarchical localizer for one lesion."""

    site: SiteAssignment | None  # None when the predicted string maps to no coded site
    final_label: str  # HCL-AL style final location string (or coarse key under the large-lesion rule)
    coarse_ranking: tuple[RankedLabel, ...]
    fine_ranking: tuple[RankedLabel, ...]
    alternatives: tuple[RankedLabel, ...]  # top-3 final labels with scores
    model: ModelInfo
    geometry_mode: str  # "hcl-al" or "corrected"
    calibrated_probability: float | None = None
    flags: tuple[Flag, ...] = ()


@dataclass(frozen=True)
class Lesion:
    """One measured lesion: a SEG segment, or one connected component of a segment."""

    lesion_id: str  # stable within the study version, e.g. "S2" or "S2C3"
    seg_sop_instance_uid: str
    segment_number: int
    component: int | None  # 1-based component index when split, else None
    segment_label: str
    property_category: CodedValue | None
    property_type: CodedValue | None
    tracking_id: str
    tracking_uid: str
    measurements: LesionMeasurements
    bbox: BoundingBox
    centroid_mm: tuple[float, float, float]
    frame_of_reference_uid: str
    localization: Localization | None = None
    flags: tuple[Flag, ...] = ()
    # The SEG segment's own Anatomic Region Sequence (PS3.3 C.8.20.2): the sender's coding,
    # written as Finding Site only when Locus did not localize the lesion itself.
    seg_anatomic_regions: tuple[CodedValue, ...] = ()


@dataclass(frozen=True)
class ZeroShotFinding:
    """One study-level zero-shot finding with its score and, when calibrated, its decision."""
    finding: str
    score: float  # raw model score (probability of the positive prompt under the paired protocol)
    threshold: float | None
    present: bool | None  # None when no threshold is configured


@dataclass(frozen=True)
class StudyEncoding:
    """HLIP study-level output."""

    model: ModelInfo
    embedding: tuple[float, ...]
    preprocessing_version: str
    prompt_set_version: str | None
    findings: tuple[ZeroShotFinding, ...] = ()
    crop_description: str = ""
    flags: tuple[Flag, ...] = ()


@dataclass(frozen=True)
class SeriesChoice:
    """Which series was used for what, and why (recorded for the operator)."""

    role: str  # "pet", "ct", "seg"
    series_instance_uid: str
    reason: str


@dataclass
class AnalysisResult:
    """Everything one analysis of one study version produced.

    ``sr_dataset`` is the pydicom Dataset of the TID 1500 SR (None when no SR is due,
    e.g. a study without SEG); it is excluded from :meth:`to_json`.
    """

    study_instance_uid: str
    lesions: list[Lesion] = field(default_factory=list)
    suv: SuvInfo | None = None
    series: list[SeriesChoice] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    models: list[ModelInfo] = field(default_factory=list)
    study_encoding: StudyEncoding | None = None
    sr_sop_instance_uid: str | None = None
    sr_dataset: Any = None

    def to_json(self) -> dict[str, Any]:
        """The result as JSON (the SR dataset itself is left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "sr_dataset":
                continue
            out[f.name] = _plain(getattr(self, f.name))
        return out
