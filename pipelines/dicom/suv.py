"""PET activity to SUV: the QIBA vendor-neutral algorithm with the DRO-verified reference time.

Implements the body-weight SUV of the QIBA/UW vendor-neutral pseudo-code (D. Clunie,
"Vendor-neutral pseudo-code for SUV calculation", QIBA FDG-PET/CT profile) as written up in
dicom-guide section 5, with the choices the 17 digital reference objects of Vácha et al.
("Standardizing SUV Computation", oncoray/suv_computation) need:

``SUVbw = A[Bq/ml] * W[g] / (D[Bq] * 2^(-dt / T1/2))``, dt = decay reference time - injection
time, with ``A = stored * RescaleSlope + RescaleIntercept`` per slice (done by
:mod:`pipelines.dicom.series`).  Decay reference time (DecayCorrection START), first match:

1. the GE private PET scan datetime (0009,xx0D), creator ``GEMS_PETD_01``;
2. Series Date/Time if it is not later than the earliest Acquisition Date/Time;
3. back-computed from frame timing (PS3.3 C.8.9.4.1.5 Frame Reference Time):
   ``t_acq - FrameReferenceTime + T_avg`` with ``T_avg = ln(lambda*T / (1 - e^(-lambda*T))) / lambda``,
   T = Actual Frame Duration (only where FrameReferenceTime > 0: a zero FrameReferenceTime
   carries no timing information and would move the reference by T_avg);
4. the earliest Acquisition Date/Time.

DecayCorrection ADMIN: dt = 0.  DecayCorrection NONE: no single reference exists; every
slice is decay-corrected to injection on its own, from its Acquisition Date/Time and Actual
Frame Duration (average activity over the frame):
``f_k = W / D * lambda*T_k / (1 - e^(-lambda*T_k)) * e^(lambda*(t_acq,k - t_inj))``.

Units (PS3.3 C.8.9.1.1.3): BQML; CNTS with the Philips private SUV Scale Factor (7053,xx00)
or Activity Concentration Scale Factor (7053,xx09) (creator "Philips PET Private Group");
GML and CM2ML, whose stored values are already SUVs of the type SUVType (0054,1006), are
converted back to SUVbw with the normalising body measure (Sugawara et al., Radiology 1999;
Du Bois for BSA; the two sex formulas averaged when PatientSex is O, as the DRO manual
recommends).  The result is a per-slice factor from rescaled voxel values to the requested
SUV kind, keyed by (SOP Instance UID, frame), so it can be applied to a built volume whatever
order its slices are in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from pydicom.dataset import Dataset

from pipelines.dicom.volume import Volume
from pipelines.errors import SuvError
from pipelines.findings import Flag, SuvInfo, SuvKind

log = logging.getLogger(__name__)

#: A RadionuclideTotalDose below this is taken to be in MBq (Enhanced PET uses MBq, C.8.22.4;
#: no real injection is below 0.1 MBq, no MBq value above 1e5).
DOSE_MBQ_THRESHOLD = 1e5
#: A PatientWeight above this is taken to be in grams (DRO manual, "Patient's weight").
WEIGHT_GRAMS_THRESHOLD = 1000.0
#: Per-slice back-computed reference times may spread this much before being flagged (s).
REFERENCE_SPREAD_S = 1.0

GE_PET_CREATOR = "GEMS_PETD_01"
PHILIPS_PET_CREATOR = "Philips PET Private Group"

UNITS: dict[SuvKind, str] = {
    SuvKind.SUV_BW: "g/ml{SUVbw}",
    SuvKind.SUV_LBM_JAMES: "g/ml{SUVlbm(James128)}",
    SuvKind.SUV_LBM_JANMA: "g/ml{SUVlbm(Janma)}",
    SuvKind.SUV_BSA: "cm2/ml{SUVbsa}",
    SuvKind.BQML: "Bq/ml",
}

SliceKey = tuple[str, int | None]


# ---------------------------------------------------------------------------------------
# Body size formulas (W in kg, H in cm unless stated)
# ---------------------------------------------------------------------------------------
def lbm_james_kg(weight_kg: float, height_cm: float, sex: str) -> float:
    """Lean body mass, James (1976) with the 128 multiplier (SUVType LBMJAMES128)."""
    r = (weight_kg / height_cm) ** 2
    male = 1.10 * weight_kg - 128.0 * r
    female = 1.07 * weight_kg - 148.0 * r
    return _by_sex(male, female, sex)


def lbm_morgan_kg(weight_kg: float, height_cm: float, sex: str) -> float:
    """Lean body mass, James/Morgan with the 120 multiplier (SUVType LBM)."""
    r = (weight_kg / height_cm) ** 2
    return _by_sex(1.10 * weight_kg - 120.0 * r, 1.07 * weight_kg - 148.0 * r, sex)


def lbm_janmahasatian_kg(weight_kg: float, height_cm: float, sex: str) -> float:
    """Lean body mass, Janmahasatian et al. 2005 (SUVType LBMJANMA); BMI with height in m."""
    bmi = weight_kg / (height_cm / 100.0) ** 2
    return _by_sex(9270.0 * weight_kg / (6680.0 + 216.0 * bmi), 9270.0 * weight_kg / (8780.0 + 244.0 * bmi), sex)


def ibw_kg(weight_kg: float, height_cm: float, sex: str) -> float:
    """Ideal body weight as in the DRO manual (SUVType IBW)."""
    del weight_kg
    return _by_sex(48.0 + 1.06 * (height_cm - 152.0), 45.5 + 0.91 * (height_cm - 152.0), sex)


def bsa_du_bois_m2(weight_kg: float, height_cm: float) -> float:
    """Body surface area, Du Bois & Du Bois 1916: 0.007184 W^0.425 H^0.725 (m2)."""
    return 0.007184 * weight_kg**0.425 * height_cm**0.725


def _by_sex(male: float, female: float, sex: str) -> float:
    if sex == "M":
        return male
    if sex == "F":
        return female
    return 0.5 * (male + female)  # "O" or unknown: mean, as the DRO manual recommends


# ---------------------------------------------------------------------------------------
# Header access
# ---------------------------------------------------------------------------------------
def _get(ds: Dataset, keyword: str) -> object:
    """Top-level attribute, else from the shared converted attributes of a Legacy Converted object."""
    if keyword in ds:
        return ds.get(keyword)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        conv = shared[0].get("UnassignedSharedConvertedAttributesSequence")
        if conv and keyword in conv[0]:
            return conv[0].get(keyword)
    return None


def _float(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace").strip("\x00 ")
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ").strip()


def _private(ds: Dataset, group: int, creator: str, element: int, *, allow_missing_creator: bool) -> object:
    """Value of private element (group, xx<element>) of ``creator``'s block.

    With ``allow_missing_creator`` the conventional block 0x10 is used when no creator is
    recorded at all (some exports, and the synthetic DROs, drop the creator element).
    """
    for block in range(0x10, 0x100):
        tag = (group << 16) | block
        if tag not in ds:
            continue
        if _text(ds[tag].value) == creator:
            elem = (group << 16) | (block << 8) | element
            return ds[elem].value if elem in ds else None
    if allow_missing_creator and not any(((group << 16) | b) in ds for b in range(0x10, 0x100)):
        elem = (group << 16) | 0x1000 | element
        if elem in ds:
            return ds[elem].value
    return None


def _has_private_creator(ds: Dataset, group: int, creator: str) -> bool:
    return any(((group << 16) | b) in ds and _text(ds[(group << 16) | b].value) == creator for b in range(0x10, 0x100))


def _parse_date(value: object) -> tuple[int, int, int] | None:
    s = _text(value).replace(".", "").replace("-", "")
    if len(s) < 8 or not s[:8].isdigit():
        return None
    return int(s[:4]), int(s[4:6]), int(s[6:8])


def _parse_time(value: object) -> timedelta | None:
    """DICOM TM (HHMMSS.FFFFFF, also HHMM, HH, and the old HH:MM:SS) as time since midnight."""
    s = _text(value).replace(":", "")
    if not s:
        return None
    main, _, frac = s.partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6):
        return None
    h = int(main[0:2])
    m = int(main[2:4]) if len(main) >= 4 else 0
    sec = int(main[4:6]) if len(main) >= 6 else 0
    us = int((frac + "000000")[:6]) if frac.isdigit() else 0
    return timedelta(hours=h, minutes=m, seconds=sec, microseconds=us)


def _parse_dt(value: object) -> datetime | None:
    """DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX); the UTC offset is dropped (all times of one study share it)."""
    s = _text(value)
    if not s:
        return None
    for sign in ("+", "-"):
        idx = s.find(sign, 8)
        if idx > 0:
            s = s[:idx]
    date = _parse_date(s[:8])
    if date is None:
        return None
    t = _parse_time(s[8:]) if len(s) > 8 else timedelta(0)
    if t is None:
        return None
    return _at(date, t)


def _at(date: tuple[int, int, int], t: timedelta) -> datetime | None:
    """``date`` + ``t``, or None for a date that does not exist (e.g. 20250230: found by tests/fuzz)."""
    try:
        return datetime(*date) + t
    except (ValueError, OverflowError):
        return None


def _combine(date_value: object, time_value: object) -> datetime | None:
    d, t = _parse_date(date_value), _parse_time(time_value)
    if d is None or t is None:
        return None
    return _at(d, t)


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def _acquisition_datetime(ds: Dataset) -> datetime | None:
    adt = _parse_dt(_get(ds, "AcquisitionDateTime"))
    if adt is not None:
        return adt
    date = _get(ds, "AcquisitionDate") or _get(ds, "SeriesDate")
    return _combine(date, _get(ds, "AcquisitionTime"))


def _keys(ds: Dataset) -> list[SliceKey]:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return [(uid, f + 1) for f in range(int(ds.get("NumberOfFrames", 1) or 1))]
    return [(uid, None)]


# ---------------------------------------------------------------------------------------
# Result type
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuvConversion:
    """Per-slice factors from rescaled PET voxel values to ``info.kind`` (``info.unit``).

    ``factors`` is keyed by (SOP Instance UID, frame number or None), the same key
    :class:`~pipelines.dicom.volume.Volume` uses in ``slice_sources``, so the factors are
    matched to slices by identity, never by position in a list.
    """

    info: SuvInfo
    factors: Mapping[SliceKey, float] = field(default_factory=dict)
    body_weight_factors: Mapping[SliceKey, float] = field(default_factory=dict)  # to SUVbw; empty for Bq/ml

    @property
    def uniform(self) -> bool:
        """Whether every slice has the same factor (then one factor describes the series)."""
        vals = list(self.factors.values())
        return bool(vals) and all(math.isclose(v, vals[0], rel_tol=1e-12) for v in vals)

    def factors_for(self, volume: Volume) -> np.ndarray:
        """Factor of each slice k of ``volume`` (shape (K,)), matched by slice source."""
        n = volume.array.shape[0]
        if volume.slice_sources:
            if len(volume.slice_sources) != n:
                raise SuvError(
                    f"volume {volume.series_instance_uid}: slice_sources does not list every slice",
                    code="suv_alignment",
                )
            missing = [s for s in volume.slice_sources if s not in self.factors]
            if missing:
                raise SuvError(
                    f"volume {volume.series_instance_uid}: no SUV factor for {len(missing)} slice(s), e.g. "
                    f"{missing[0][0]}; the headers given to compute_suv are not those of the volume",
                    code="suv_alignment",
                )
            return np.array([self.factors[s] for s in volume.slice_sources], dtype=np.float64)
        if self.uniform:
            return np.full(n, next(iter(self.factors.values())), dtype=np.float64)
        raise SuvError(
            f"volume {volume.series_instance_uid} has no slice sources (it was resampled) and the SUV factor "
            "differs between slices; convert before resampling",
            code="suv_alignment",
        )

    def apply(self, volume: Volume) -> Volume:
        """A float32 copy of ``volume`` in ``info.unit``."""
        f = self.factors_for(volume)
        out = (volume.array.astype(np.float64) * f[:, None, None]).astype(np.float32)
        return volume.with_array(out)


# ---------------------------------------------------------------------------------------
# Computation
# ---------------------------------------------------------------------------------------
@dataclass
class _Series:
    """Series-level PET facts, checked to agree across instances."""

    units: str
    decay_correction: str
    suv_type: str
    weight_kg: float | None
    height_cm: float | None
    sex: str
    dose_bq: float | None
    half_life_s: float | None
    injection: datetime | None
    injection_time_only: object
    flags: list[Flag]


def _same(headers: Sequence[Dataset], keyword: str) -> object:
    values = [_text(_get(ds, keyword)) for ds in headers]
    if len(set(values)) > 1:
        raise SuvError(
            f"{keyword} differs between the instances of the PET series ({sorted(set(values))[:3]}); "
            "one SUV conversion cannot cover them",
            code="inconsistent_pet_headers",
        )
    return _get(headers[0], keyword)


def _radiopharmaceutical(ds: Dataset) -> Dataset:
    seq = _get(ds, "RadiopharmaceuticalInformationSequence")
    if not seq:
        raise SuvError(
            "the PET header has no Radiopharmaceutical Information Sequence (dose, half-life, injection time)",
            code="missing_radiopharmaceutical",
        )
    count = len(seq)  # type: ignore[arg-type]
    if count > 1:
        raise SuvError(
            f"the PET header lists {count} radiopharmaceuticals; which one the images show is ambiguous",
            code="multiple_radiopharmaceuticals",
        )
    return seq[0]  # type: ignore[index]


def _series_facts(headers: Sequence[Dataset], *, radiopharmaceutical: bool = True) -> _Series:
    """Series-level facts, checked to agree across the instances.

    With ``radiopharmaceutical=False`` (activity concentration only) the Radiopharmaceutical
    Information Sequence (PS3.3 C.8.9.2) is not required: Bq/ml needs only Units and the
    rescale (C.8.9.1.1.3), so a PET without it still has a quantitative value to report,
    and dose, half-life and injection time are simply unknown.
    """
    flags: list[Flag] = []
    units = _text(_same(headers, "Units")).upper()
    decay = _text(_same(headers, "DecayCorrection")).upper()
    if not radiopharmaceutical:  # nor the patient's size: a broken PatientWeight cannot block Bq/ml
        return _Series(units=units, decay_correction=decay, suv_type="", weight_kg=None, height_cm=None, sex="",
                       dose_bq=None, half_life_s=None, injection=None, injection_time_only=None, flags=flags)
    suv_type = _text(_same(headers, "SUVType")).upper()
    sex = _text(_same(headers, "PatientSex")).upper()
    weight = _float(_same(headers, "PatientWeight"))
    size_m = _float(_same(headers, "PatientSize"))

    rp0 = _radiopharmaceutical(headers[0])
    for ds in headers[1:]:
        rp = _radiopharmaceutical(ds)
        for kw in ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartDateTime",
                   "RadiopharmaceuticalStartTime"):
            if _text(rp.get(kw)) != _text(rp0.get(kw)):
                raise SuvError(
                    f"{kw} differs between the instances of the PET series", code="inconsistent_pet_headers"
                )

    if weight is not None and weight > WEIGHT_GRAMS_THRESHOLD:
        flags.append(Flag("weight_assumed_grams", f"PatientWeight {weight:g} read as grams ({weight / 1000:g} kg)"))
        weight /= 1000.0
    if weight is not None and weight <= 0:
        weight = None

    dose = _float(rp0.get("RadionuclideTotalDose"))
    if dose is not None and 0 < dose < DOSE_MBQ_THRESHOLD:
        flags.append(
            Flag("dose_assumed_mbq", f"RadionuclideTotalDose {dose:g} is below {DOSE_MBQ_THRESHOLD:g}: read as MBq")
        )
        dose *= 1e6
    if dose is not None and dose <= 0:
        dose = None
    half_life = _float(rp0.get("RadionuclideHalfLife"))
    if half_life is not None and half_life <= 0:
        half_life = None

    return _Series(
        units=units,
        decay_correction=decay,
        suv_type=suv_type,
        weight_kg=weight,
        height_cm=size_m * 100.0 if size_m and size_m > 0 else None,
        sex=sex,
        dose_bq=dose,
        half_life_s=half_life,
        injection=_parse_dt(rp0.get("RadiopharmaceuticalStartDateTime")),
        injection_time_only=rp0.get("RadiopharmaceuticalStartTime"),
        flags=flags,
    )


def _injection_before(s: _Series, reference: datetime) -> datetime:
    """Injection datetime; a time-only injection is placed on the last day not after ``reference``."""
    if s.injection is not None:
        return s.injection
    t = _parse_time(s.injection_time_only)
    if t is None:
        raise SuvError(
            "neither Radiopharmaceutical Start DateTime nor Start Time is present: injection time unknown",
            code="missing_injection_time",
        )
    inj = datetime(reference.year, reference.month, reference.day) + t
    if inj > reference:  # injected before midnight, scanned after it
        inj -= timedelta(days=1)
        s.flags.append(Flag("injection_before_midnight", "injection time is later in the day than the scan: "
                            "taken as the previous day"))
    return inj


def _ge_scan_datetime(ds: Dataset) -> datetime | None:
    manufacturer = _text(ds.get("Manufacturer")).upper()
    allow_missing = manufacturer.startswith("GE")
    return _parse_dt(_private(ds, 0x0009, GE_PET_CREATOR, 0x0D, allow_missing_creator=allow_missing))


def _average_count_time_s(half_life_s: float, duration_s: float) -> float:
    """T_avg = ln(lambda*T / (1 - e^(-lambda*T))) / lambda: when the frame's mean activity occurs."""
    lam = math.log(2) / half_life_s
    x = lam * duration_s
    return math.log(x / -math.expm1(-x)) / lam


def _reference_time(headers: Sequence[Dataset], s: _Series) -> tuple[datetime, str]:
    """Decay reference time for DecayCorrection START (module docstring, rules 1-4)."""
    ge = [_ge_scan_datetime(ds) for ds in headers]
    ge_times = [t for t in ge if t is not None]
    if ge_times:
        if len(set(ge_times)) > 1:
            s.flags.append(Flag("ge_scan_datetime_varies", "GE private PET scan datetime differs between slices; "
                                "the earliest is used"))
        return min(ge_times), "ge_private_scan_datetime"

    acq = [_acquisition_datetime(ds) for ds in headers]
    acq_known = [t for t in acq if t is not None]
    series = _combine(_get(headers[0], "SeriesDate"), _get(headers[0], "SeriesTime"))
    if series is not None and (not acq_known or series <= min(acq_known)):
        return series, "series_time"

    if not acq_known:
        raise SuvError("neither Series nor Acquisition Date/Time is usable: scan time unknown",
                       code="missing_scan_time")
    if s.half_life_s is not None:
        back: list[datetime] = []
        for ds, t in zip(headers, acq, strict=True):
            frt = _float(_get(ds, "FrameReferenceTime"))
            afd = _float(_get(ds, "ActualFrameDuration"))
            if t is None or not frt or frt <= 0 or not afd or afd <= 0:
                continue
            t_avg = _average_count_time_s(s.half_life_s, afd / 1000.0)
            back.append(t - timedelta(seconds=frt / 1000.0) + timedelta(seconds=t_avg))
        if back:
            back.sort()
            spread = (back[-1] - back[0]).total_seconds()
            if spread > REFERENCE_SPREAD_S:
                s.flags.append(Flag("reference_time_spread",
                                    f"reference times back-computed from frame timing spread over {spread:.1f} s; "
                                    "the median is used"))
            return back[len(back) // 2], "frame_timing_backcomputed"

    s.flags.append(Flag("reference_time_earliest_acquisition",
                        "series time is later than acquisition and no frame timing is usable: the earliest "
                        "acquisition time is used as decay reference (wrong for multi-injection protocols)"))
    return min(acq_known), "earliest_acquisition_time"


def _require(value: float | None, code: str, what: str) -> float:
    if value is None:
        raise SuvError(f"{what} is missing or zero: SUV cannot be computed", code=code)
    return value


def _kind_ratio(kind: SuvKind, s: _Series) -> float:
    """Factor from SUVbw to ``kind`` (normalising measure / body weight)."""
    if kind == SuvKind.SUV_BW:
        return 1.0
    w = _require(s.weight_kg, "missing_weight", "PatientWeight")
    h = _require(s.height_cm, "missing_height", f"PatientSize (needed for {kind.value})")
    if kind == SuvKind.SUV_BSA:
        return bsa_du_bois_m2(w, h) * 1e4 / (w * 1000.0)  # cm2 per g
    if s.sex not in ("M", "F"):
        raise SuvError(f"PatientSex is {s.sex or 'empty'}: {kind.value} needs M or F", code="missing_sex")
    if kind == SuvKind.SUV_LBM_JAMES:
        return lbm_james_kg(w, h, s.sex) / w
    if kind == SuvKind.SUV_LBM_JANMA:
        return lbm_janmahasatian_kg(w, h, s.sex) / w
    raise SuvError(f"SUV kind {kind.value} is not an SUV", code="unsupported_suv_kind")


def _stored_suv_to_bw(s: _Series) -> tuple[float, str]:
    """Factor from a stored SUV (Units GML/CM2ML, SUVType) back to SUVbw."""
    suv_type = s.suv_type or ("BSA" if s.units == "CM2ML" else "BW")
    if (s.units == "CM2ML" and suv_type != "BSA") or (s.units == "GML" and suv_type == "BSA"):
        raise SuvError(f"Units {s.units} contradict SUVType {suv_type}", code="inconsistent_pet_headers")
    if suv_type == "BW":
        return 1.0, suv_type
    w = _require(s.weight_kg, "missing_weight", f"PatientWeight (needed to convert stored SUV{suv_type})")
    h = _require(s.height_cm, "missing_height", f"PatientSize (needed to convert stored SUV{suv_type})")
    if suv_type == "BSA":
        return w * 1000.0 / (bsa_du_bois_m2(w, h) * 1e4), suv_type
    formulas = {"LBM": lbm_morgan_kg, "LBMJAMES128": lbm_james_kg, "LBMJANMA": lbm_janmahasatian_kg, "IBW": ibw_kg}
    if suv_type not in formulas:
        raise SuvError(f"stored SUVType {suv_type} is not one Locus can convert", code="unsupported_suv_type")
    if s.sex not in ("M", "F"):
        s.flags.append(Flag("sex_unknown_mean_formula",
                            f"PatientSex {s.sex or 'empty'}: mean of the male and female {suv_type} formulas used"))
    return w / formulas[suv_type](w, h, s.sex), suv_type


def _check_corrections(headers: Sequence[Dataset], s: _Series) -> None:
    raw = _get(headers[0], "CorrectedImage")
    # CS, VM 1-n (PS3.3 C.8.9.1): pydicom gives a str for one value, a MultiValue for several
    values = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, Iterable) else []
    corrected = {_text(v).upper() for v in values}
    if "ATTN" not in corrected:
        raise SuvError(
            f"CorrectedImage {sorted(corrected) or 'absent'} lacks ATTN: not attenuation corrected, not quantitative",
            code="not_attenuation_corrected",
        )
    if s.decay_correction in ("START", "ADMIN") and "DECY" not in corrected:
        raise SuvError(f"DecayCorrection {s.decay_correction} but CorrectedImage lacks DECY",
                       code="inconsistent_pet_headers")
    if s.decay_correction == "NONE" and "DECY" in corrected:
        raise SuvError("DecayCorrection NONE but CorrectedImage lists DECY", code="inconsistent_pet_headers")


def _activity_factors(headers: Sequence[Dataset], s: _Series) -> tuple[dict[SliceKey, float], str | None]:
    """Factor from rescaled values to Bq/ml per slice (1 for BQML; Philips ACSF for CNTS)."""
    out: dict[SliceKey, float] = {}
    if s.units == "BQML":
        for ds in headers:
            for key in _keys(ds):
                out[key] = 1.0
        return out, None
    if s.units == "CNTS":
        for ds in headers:
            acsf = _float(_private(ds, 0x7053, PHILIPS_PET_CREATOR, 0x09, allow_missing_creator=True))
            if not acsf or acsf <= 0:
                return {}, "Units CNTS without a Philips Activity Concentration Scale Factor (7053,xx09)"
            for key in _keys(ds):
                out[key] = acsf
        return out, None
    return {}, f"Units {s.units or 'absent'} cannot be converted to Bq/ml"


def _decay_factors(
    headers: Sequence[Dataset], s: _Series
) -> tuple[dict[SliceKey, float], str, datetime | None, datetime | None]:
    """Per slice W[g] / decayed dose[Bq] (SUVbw per Bq/ml), with reference description and times."""
    w = _require(s.weight_kg, "missing_weight", "PatientWeight")
    dose = _require(s.dose_bq, "missing_dose", "RadionuclideTotalDose")
    half_life = _require(s.half_life_s, "missing_half_life", "RadionuclideHalfLife")
    lam = math.log(2) / half_life
    grams = w * 1000.0
    out: dict[SliceKey, float] = {}

    if s.decay_correction == "ADMIN":
        # images are decay-corrected to injection: no decay to apply, the injection time is only recorded
        acq = [t for t in (_acquisition_datetime(ds) for ds in headers) if t is not None]
        ref = min(acq) if acq else _combine(_get(headers[0], "SeriesDate"), _get(headers[0], "SeriesTime"))
        try:
            inj = _injection_before(s, ref) if ref is not None else s.injection
        except SuvError:
            inj = None
        for ds in headers:
            for key in _keys(ds):
                out[key] = grams / dose
        return out, "admin", inj, inj

    if s.decay_correction == "START":
        ref, how = _reference_time(headers, s)
        inj = _injection_before(s, ref)
        dt = (ref - inj).total_seconds()
        if dt < 0:
            raise SuvError(f"injection ({inj.isoformat()}) is after the decay reference time ({ref.isoformat()})",
                           code="injection_after_scan")
        f = grams / (dose * math.exp(-lam * dt))
        for ds in headers:
            for key in _keys(ds):
                out[key] = f
        return out, how, inj, ref

    if s.decay_correction == "NONE":
        if any(len(_keys(ds)) > 1 for ds in headers):
            raise SuvError("DecayCorrection NONE in a multi-frame PET object is not supported",
                           code="unsupported_multiframe_decay")
        earliest: datetime | None = None
        inj = None
        for ds in headers:
            t = _acquisition_datetime(ds)
            afd = _float(_get(ds, "ActualFrameDuration"))
            if t is None or not afd or afd <= 0:
                raise SuvError(
                    f"DecayCorrection NONE: instance {ds.get('SOPInstanceUID', '?')} lacks Acquisition Date/Time "
                    "or Actual Frame Duration, needed to decay-correct it",
                    code="missing_frame_timing",
                )
            inj_k = _injection_before(s, t)
            inj = inj_k if inj is None else min(inj, inj_k)
            dt = (t - inj_k).total_seconds()
            if dt < 0:
                raise SuvError("injection is after the acquisition of a slice", code="injection_after_scan")
            x = lam * afd / 1000.0
            # mean activity over [t, t+T] is A_inj * e^(-lam*dt) * (1 - e^(-x)) / x
            f = grams / dose * (x / -math.expm1(-x)) * math.exp(lam * dt)
            for key in _keys(ds):
                out[key] = f
            earliest = t if earliest is None or t < earliest else earliest
        s.flags.append(Flag("decay_corrected_per_slice",
                            "DecayCorrection NONE: each slice was decay-corrected to injection from its own "
                            "acquisition time and frame duration"))
        assert inj is not None
        return out, "none", inj, earliest

    raise SuvError(f"DecayCorrection {s.decay_correction or 'absent'} is not START, ADMIN or NONE",
                   code="unsupported_decay_correction")


def _decoded(what: str, fn: Callable[[], SuvConversion]) -> SuvConversion:
    """Run ``fn``; an attribute pydicom cannot decode is an :class:`SuvError`, not a crash.

    Headers are received data and pydicom converts values lazily: a US of odd length
    raises BytesLengthException, "1e309" in an IS OverflowError, an unknown VR
    NotImplementedError (all found by tests/fuzz).  Such a header is unusable for
    ``what``; the study records code ``invalid_pet_header`` with the cause.
    """
    try:
        return fn()
    except SuvError:
        raise
    except Exception as exc:
        raise SuvError(f"a PET header attribute cannot be decoded ({what}): {type(exc).__name__}: {exc}",
                       code="invalid_pet_header") from exc


def compute_suv(headers: Sequence[Dataset], kind: SuvKind = SuvKind.SUV_BW) -> SuvConversion:
    """SUV conversion factors for the instances of one PET series (headers suffice).

    Raises :class:`SuvError` (with a ``code``) when SUV cannot be computed; see
    :func:`suv_or_fallback` for the Bq/ml fallback.
    """
    return _decoded("SUV", lambda: _compute_suv(headers, kind))


def _compute_suv(headers: Sequence[Dataset], kind: SuvKind) -> SuvConversion:
    if kind == SuvKind.BQML:
        raise SuvError("compute_suv computes SUVs; use activity_concentration for Bq/ml", code="unsupported_suv_kind")
    if not headers:
        raise SuvError("no PET instances given", code="empty_series")
    modalities = {_text(ds.get("Modality")) for ds in headers}
    if modalities != {"PT"}:
        raise SuvError(f"SUV needs PET (Modality PT), got {sorted(modalities)}", code="not_pet")
    s = _series_facts(headers)
    series_uid = _text(headers[0].get("SeriesInstanceUID"))

    bw: dict[SliceKey, float] = {}
    inj: datetime | None = None
    ref: datetime | None = None
    if s.units in ("GML", "CM2ML"):
        f, suv_type = _stored_suv_to_bw(s)
        for ds in headers:
            for key in _keys(ds):
                bw[key] = f
        how = f"stored_suv_{suv_type.lower()}"
        s.flags.append(Flag("suv_stored_in_image",
                            f"Units {s.units}, SUVType {suv_type}: voxel values are SUVs computed by the producer"))
    elif s.units == "CNTS" and all(
        (_float(_private(ds, 0x7053, PHILIPS_PET_CREATOR, 0x00, allow_missing_creator=True)) or 0) > 0
        for ds in headers
    ):
        for ds in headers:
            scale = _float(_private(ds, 0x7053, PHILIPS_PET_CREATOR, 0x00, allow_missing_creator=True))
            assert scale is not None
            for key in _keys(ds):
                bw[key] = scale
        how = "philips_suv_scale_factor"
        if not _has_private_creator(headers[0], 0x7053, PHILIPS_PET_CREATOR):
            s.flags.append(Flag("private_creator_missing",
                                "(7053,1000) used as the Philips SUV Scale Factor without its private creator"))
    else:
        activity, why_not = _activity_factors(headers, s)
        if why_not:
            raise SuvError(why_not, code="unsupported_units")
        _check_corrections(headers, s)
        decay, how, inj, ref = _decay_factors(headers, s)
        bw = {k: activity[k] * decay[k] for k in decay}
        if s.units == "CNTS":
            how = f"{how}+philips_activity_scale_factor"

    ratio = _kind_ratio(kind, s)
    factors = {k: v * ratio for k, v in bw.items()}
    vals = np.array(list(factors.values()))
    if np.ptp(vals) > 1e-12 * abs(vals).max():
        s.flags.append(Flag("suv_per_slice_factors",
                            f"SUV factor varies per slice ({vals.min():.6g} .. {vals.max():.6g}); "
                            "scale_factor is the median"))
    info = SuvInfo(
        kind=kind,
        unit=UNITS[kind],
        scale_factor=float(np.median(vals)),
        decay_reference=how,
        injection_datetime=_iso(inj),
        reference_datetime=_iso(ref),
        flags=tuple(s.flags),
    )
    log.info("SUV %s for PET series %s: factor %.6g (%s)", kind.value, series_uid, info.scale_factor, how)
    return SuvConversion(info=info, factors=factors, body_weight_factors=bw)


def activity_concentration(headers: Sequence[Dataset]) -> SuvConversion:
    """Factors from rescaled values to Bq/ml (Units BQML, or CNTS with a Philips activity factor)."""
    return _decoded("activity concentration", lambda: _activity_concentration(headers))


def _activity_concentration(headers: Sequence[Dataset]) -> SuvConversion:
    if not headers:
        raise SuvError("no PET instances given", code="empty_series")
    s = _series_facts(headers, radiopharmaceutical=False)
    factors, why_not = _activity_factors(headers, s)
    if why_not:
        raise SuvError(f"{why_not}; not even activity concentration is available", code="unsupported_units")
    vals = list(factors.values())
    info = SuvInfo(
        kind=SuvKind.BQML,
        unit=UNITS[SuvKind.BQML],
        scale_factor=None,
        decay_reference=s.decay_correction.lower() or "unknown",
        injection_datetime=None,
        reference_datetime=None,
        flags=tuple(s.flags),
    )
    del vals
    return SuvConversion(info=info, factors=factors)


def suv_or_fallback(headers: Sequence[Dataset], kind: SuvKind = SuvKind.SUV_BW) -> SuvConversion:
    """:func:`compute_suv`, or Bq/ml with flag ``suv_fallback_bqml`` when SUV cannot be computed.

    Still raises :class:`SuvError` when the voxels cannot even be expressed in Bq/ml
    (e.g. Units CNTS without scale factors): there is then no quantitative value to report.
    """
    try:
        return compute_suv(headers, kind)
    except SuvError as exc:
        fallback = activity_concentration(headers)
        flag = Flag("suv_fallback_bqml", f"SUV not computed ({exc.code}: {exc.reason}); values are Bq/ml")
        log.warning("PET series %s: SUV unavailable (%s), falling back to Bq/ml",
                    _text(headers[0].get("SeriesInstanceUID")), exc.code)
        info = SuvInfo(
            kind=SuvKind.BQML,
            unit=UNITS[SuvKind.BQML],
            scale_factor=None,
            decay_reference=fallback.info.decay_reference,
            injection_datetime=None,
            reference_datetime=None,
            flags=(flag, *fallback.info.flags),
        )
        return SuvConversion(info=info, factors=fallback.factors)
