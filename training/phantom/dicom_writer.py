"""Write a phantom as a complete DICOM PET/CT study: CT and PET series plus a lesion SEG.

Objects written (Explicit VR Little Endian, one file per instance, PS3.10):

* **CT Image Storage** (PS3.3 A.3), one file per axial slice: int16 stored values with
  Rescale Intercept -1024 and Slope 1, so HU = stored - 1024.
* **PET Image Storage** (PS3.3 A.21), one file per slice: Units BQML, Decay Correction
  START, Corrected Image including ATTN and DECY, uint16 stored values with a per-slice
  Rescale Slope (as GE scanners write them), Radiopharmaceutical Information Sequence
  for F-18 FDG (half-life 6586.2 s), Patient Weight, Series and Acquisition Time.  The
  headers are built so that the QIBA vendor-neutral SUVbw (PS3.3 §C.8.9.1 and the QIBA FDG-PET/CT profile:
  reference time = Series Time because it precedes every Acquisition Time) reproduces
  the phantom's SUV exactly up to the 16-bit quantisation:
  ``SUVbw = (stored * slope) * weight_g / (dose * 2^(-(series - injection) / T1/2))``.
  Bed positions (150 mm, 120 s each, acquired feet first) give realistic per-slice
  Acquisition Time, Frame Reference Time and Decay Factor (PS3.3 C.8.9.4.1.5).
* **Segmentation Storage** (PS3.3 A.51) through highdicom: BINARY, one segment per
  lesion with category "Morphologically Altered Structure" (SCT 49755003), type Lesion
  (SCT 52988006) or Neoplasm (SCT 108369006), the host site's library code as anatomic
  region, and the lesion's tracking id/UID, drawn on the PET or the CT grid.
* optionally a **CT localizer** (coronal projection) in its *own* Frame of Reference, the
  kind of extra series a node has to recognise and skip.

All objects share the Study Instance UID and (except the localizer) the Frame of
Reference; identifiers are obviously synthetic ("Phantom^Seed 7", "LOCUS-PH-7") and every
UID is derived from the seed (:func:`training.phantom.generate.phantom_uid`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage

from library.anatomy import load_library
from training.phantom.generate import Phantom, grid_of

F18_HALF_LIFE_S = 6586.2
F18_POSITRON_FRACTION = 0.9673
BED_LENGTH_MM = 150.0
BED_DURATION_S = 120.0
MANUFACTURER = "Locus"
MODEL_NAME = "Locus synthetic PET/CT phantom"
SOFTWARE_VERSION = "locus-phantom 1"
PHANTOM_ALGORITHM = hd.sr.CodedConcept("PHANTOM_GT", "99LOCUS", "Synthetic phantom ground truth")


@dataclass(frozen=True)
class WrittenStudy:
    """Where a phantom study was written, and the values its SUV headers encode."""

    directory: Path
    study_uid: str
    frame_of_reference_uid: str
    ct_series_uid: str
    pet_series_uid: str
    seg_series_uid: str
    ct_paths: tuple[Path, ...]
    pet_paths: tuple[Path, ...]
    seg_path: Path | None
    scout_paths: tuple[Path, ...]
    seg_on: str
    patient_weight_kg: float
    injected_dose_bq: float
    injection_datetime: dt.datetime
    series_datetime: dt.datetime  # PET Series Date/Time = decay reference (START)
    suv_scale_factor: float  # SUVbw per Bq/mL (g/mL per Bq/mL)

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every written file, CT then PET then SEG then localizer."""
        seg = (self.seg_path,) if self.seg_path else ()
        return self.ct_paths + self.pet_paths + seg + self.scout_paths


def _ds(v: float) -> str:
    """Decimal String (VR DS, at most 16 characters) for ``v``."""
    for text in (repr(float(v)), f"{v:.10g}", f"{v:.8g}", f"{v:.6g}"):
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot encode {v!r} as DS")


def _pos(v: float) -> str:
    """DS for positions: fixed 6 decimals, trimmed."""
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


@dataclass(frozen=True)
class _Timing:
    study: dt.datetime
    ct: dt.datetime
    injection: dt.datetime
    pet: dt.datetime


def _timing(phantom: Phantom, uptake_s: float | None) -> _Timing:
    rng = np.random.default_rng(np.random.SeedSequence([phantom.seed & 0xFFFFFFFF, 0xD1C0]))
    day = dt.date(2024, 1, 8) + dt.timedelta(days=int(rng.integers(0, 700)))
    injection = dt.datetime.combine(day, dt.time(8, 0)) + dt.timedelta(minutes=int(rng.integers(0, 240)),
                                                                         seconds=int(rng.integers(0, 60)))
    uptake = float(rng.uniform(55 * 60, 75 * 60)) if uptake_s is None else float(uptake_s)
    pet = injection + dt.timedelta(seconds=round(uptake))
    ct = pet - dt.timedelta(seconds=150)
    study = injection - dt.timedelta(minutes=20)
    return _Timing(study, ct, injection, pet)


def _common(ds: Dataset, phantom: Phantom, t: _Timing, weight_kg: float) -> None:
    """Patient, General Study, Frame of Reference, General Equipment and SOP Common attributes."""
    seed = phantom.seed
    age = 40 + seed % 41
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"Phantom^Seed {seed}"
    ds.PatientID = f"LOCUS-PH-{seed}"
    ds.PatientBirthDate = f"{t.study.year - age:04d}0101"
    ds.PatientSex = "O"
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientWeight = _ds(weight_kg)
    ds.PatientSize = _ds(round(phantom.anatomy.height_mm / 1000.0, 2))
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID = phantom.uids.study
    ds.StudyDate = t.study.strftime("%Y%m%d")
    ds.StudyTime = t.study.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"PH{seed % 10**8}"
    ds.AccessionNumber = f"LPH{seed % 10**12:012d}"
    ds.StudyDescription = "PET/CT FDG whole body (Locus synthetic phantom)"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.DeviceSerialNumber = "PHANTOM-1"
    ds.InstitutionName = "Synthetic"
    ds.BodyPartExamined = "WHOLEBODY"  # unpaired: Laterality (0020,0060) stays absent
    ds.PositionReferenceIndicator = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _plane(ds: Dataset, grid_origin: np.ndarray, spacing: Sequence[float], rows: int, cols: int) -> None:
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = [_pos(v) for v in grid_origin]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # [row spacing (y), column spacing (x)]
    ds.SliceThickness = _ds(spacing[2])
    ds.SliceLocation = _pos(grid_origin[2])
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15


def _ct_slices(phantom: Phantom, t: _Timing, weight_kg: float, out: Path) -> tuple[list[Path], list[Dataset]]:
    vol = phantom.ct
    g = grid_of(vol)
    nk, nj, ni = vol.array.shape
    paths, headers = [], []
    out.mkdir(parents=True, exist_ok=True)
    for k in range(nk):
        ds = Dataset()
        sop = phantom.uids.ct_instances[k]
        ds.file_meta = _file_meta(CTImageStorage, sop)
        _common(ds, phantom, t, weight_kg)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.InstanceCreationDate, ds.InstanceCreationTime = t.ct.strftime("%Y%m%d"), t.ct.strftime("%H%M%S")
        ds.Modality = "CT"
        ds.SeriesInstanceUID = phantom.uids.ct_series
        ds.SeriesNumber = 2
        ds.SeriesDescription = "CT whole body (synthetic phantom)"
        ds.SeriesDate, ds.SeriesTime = t.ct.strftime("%Y%m%d"), t.ct.strftime("%H%M%S")
        ds.FrameOfReferenceUID = phantom.uids.frame_of_reference
        ds.PatientPosition = "HFS"  # General Series 2C for CT (PET codes it in the NM/PET orientation module)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = nk - k  # head first: instance 1 is the most superior slice
        ds.AcquisitionNumber = 1
        ds.AcquisitionDate, ds.AcquisitionTime = t.ct.strftime("%Y%m%d"), t.ct.strftime("%H%M%S")
        ds.ContentDate, ds.ContentTime = t.ct.strftime("%Y%m%d"), t.ct.strftime("%H%M%S")
        _plane(ds, g.voxel_center((k, 0, 0)), g.spacing, nj, ni)
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.KVP = "120"
        ds.XRayTubeCurrent = 80
        ds.ConvolutionKernel = "STANDARD"
        ds.ReconstructionDiameter = _ds(g.spacing[0] * ni)
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        stored = (vol.array[k].astype(np.int32) + 1024).astype(np.int16)
        ds.PixelData = stored.tobytes()
        path = out / f"CT_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        del ds.PixelData
        headers.append(ds)
    return paths, headers


def _pet_slices(phantom: Phantom, t: _Timing, weight_kg: float, dose_bq: float, out: Path
                ) -> tuple[list[Path], list[Dataset], float]:
    vol = phantom.pet
    g = grid_of(vol)
    nk, nj, ni = vol.array.shape
    lam = math.log(2.0) / F18_HALF_LIFE_S
    delta = (t.pet - t.injection).total_seconds()
    decayed = dose_bq * 2.0 ** (-delta / F18_HALF_LIFE_S)
    suv_factor = weight_kg * 1000.0 / decayed  # SUVbw per Bq/mL
    # Tavg: time within a frame at which the decaying activity equals its frame average (C.8.9.4.1.5)
    tavg = math.log(lam * BED_DURATION_S / (1.0 - math.exp(-lam * BED_DURATION_S))) / lam
    z_first = g.origin[2] - g.spacing[2] / 2
    rp = Dataset()
    rp.Radiopharmaceutical = "Fluorodeoxyglucose"
    rp.RadiopharmaceuticalRoute = "Intravenous route"
    rp.RadiopharmaceuticalStartTime = t.injection.strftime("%H%M%S")
    rp.RadiopharmaceuticalStartDateTime = t.injection.strftime("%Y%m%d%H%M%S")
    rp.RadionuclideTotalDose = _ds(dose_bq)
    rp.RadionuclideHalfLife = _ds(F18_HALF_LIFE_S)
    rp.RadionuclidePositronFraction = _ds(F18_POSITRON_FRACTION)
    rp.RadionuclideCodeSequence = [_code_item(codes.SCT._18Fluorine.value, "SCT", codes.SCT._18Fluorine.meaning)]
    rp.RadiopharmaceuticalCodeSequence = [_code_item(codes.SCT.FluorodeoxyglucoseF18.value, "SCT",
                                                     codes.SCT.FluorodeoxyglucoseF18.meaning)]
    orient = _code_item(codes.SCT.Recumbent.value, "SCT", codes.SCT.Recumbent.meaning)
    orient.PatientOrientationModifierCodeSequence = [_code_item(codes.SCT.Supine.value, "SCT",
                                                                codes.SCT.Supine.meaning)]
    gantry = _code_item(codes.SCT.Headfirst.value, "SCT", codes.SCT.Headfirst.meaning)
    paths, headers = [], []
    out.mkdir(parents=True, exist_ok=True)
    for k in range(nk):
        ds = Dataset()
        sop = phantom.uids.pet_instances[k]
        ds.file_meta = _file_meta(PositronEmissionTomographyImageStorage, sop)
        _common(ds, phantom, t, weight_kg)
        ds.SOPClassUID, ds.SOPInstanceUID = PositronEmissionTomographyImageStorage, sop
        ds.InstanceCreationDate, ds.InstanceCreationTime = t.pet.strftime("%Y%m%d"), t.pet.strftime("%H%M%S")
        ds.Modality = "PT"
        ds.SeriesInstanceUID = phantom.uids.pet_series
        ds.SeriesNumber = 3
        ds.SeriesDescription = "PET FDG whole body AC (synthetic phantom)"
        ds.SeriesDate, ds.SeriesTime = t.pet.strftime("%Y%m%d"), t.pet.strftime("%H%M%S")
        ds.FrameOfReferenceUID = phantom.uids.frame_of_reference
        # PET Series module (C.8.9.1)
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["WHOLE BODY", "IMAGE"]
        ds.NumberOfSlices = nk
        ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
        ds.DecayCorrection = "START"
        ds.RandomsCorrectionMethod = "DLYD"
        ds.AttenuationCorrectionMethod = "CT-based"
        ds.ScatterCorrectionMethod = "Model-based"
        ds.ReconstructionMethod = "Analytic phantom (no reconstruction)"
        ds.ReconstructionDiameter = _ds(g.spacing[0] * ni)
        ds.CollimatorType = "NONE"
        # PET Isotope module (C.8.9.2), NM/PET Patient Orientation module (C.8.4.6)
        ds.RadiopharmaceuticalInformationSequence = [rp]
        ds.PatientOrientationCodeSequence = [orient]
        ds.PatientGantryRelationshipCodeSequence = [gantry]
        # PET Image module (C.8.9.4): beds acquired feet first, BED_DURATION_S each
        bed = int((g.origin[2] + k * g.spacing[2] - z_first) // BED_LENGTH_MM)
        bed_start = bed * BED_DURATION_S
        acq = t.pet + dt.timedelta(seconds=bed_start)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageIndex = k + 1
        ds.InstanceNumber = k + 1
        ds.AcquisitionDate, ds.AcquisitionTime = acq.strftime("%Y%m%d"), acq.strftime("%H%M%S")
        ds.ContentDate, ds.ContentTime = t.pet.strftime("%Y%m%d"), t.pet.strftime("%H%M%S")
        ds.FrameReferenceTime = _ds(round((bed_start + tavg) * 1000.0, 3))
        ds.ActualFrameDuration = int(BED_DURATION_S * 1000)
        ds.DecayFactor = _ds(round(math.exp(lam * (bed_start + tavg)), 6))
        ds.DeadTimeFactor = "1"
        _plane(ds, g.voxel_center((k, 0, 0)), g.spacing, nj, ni)
        ds.PixelRepresentation = 0
        activity = vol.array[k].astype(np.float64) / suv_factor  # Bq/mL at the series (START) time
        top = float(activity.max())
        slope_text = _ds(top / 65535.0) if top > 0 else "1"
        slope = float(slope_text)
        stored = np.clip(np.rint(activity / slope), 0, 65535).astype(np.uint16)
        ds.RescaleIntercept, ds.RescaleSlope = "0", slope_text
        ds.PixelData = stored.tobytes()
        path = out / f"PT_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        del ds.PixelData
        headers.append(ds)
    return paths, headers, suv_factor


def _seg(phantom: Phantom, headers: list[Dataset], on: str, out: Path, lesion_type: str) -> Path:
    lib = load_library()
    labels = (phantom.pet_lesions if on == "pet" else phantom.ct_lesions).array
    ptype = codes.SCT.Neoplasm if lesion_type == "neoplasm" else codes.SCT.Lesion
    algo = hd.AlgorithmIdentificationSequence(name="Locus synthetic phantom", family=PHANTOM_ALGORITHM,
                                             version=SOFTWARE_VERSION,
                                             parameters={"seed": str(phantom.seed), "size": phantom.preset})
    descs = []
    for les in phantom.lesions:
        site = lib.site(les.site_id)
        region = hd.sr.CodedConcept(site.code.value, site.code.scheme, site.code.meaning)
        descs.append(hd.seg.SegmentDescription(
            segment_number=les.label, segment_label=f"Lesion {les.label} ({site.name})"[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=ptype, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo, tracking_uid=les.tracking_uid, tracking_id=les.tracking_id,
            anatomic_regions=[region]))
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=phantom.uids.seg_series, series_number=100,
        sop_instance_uid=phantom.uids.seg_instance, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME, software_versions=SOFTWARE_VERSION, device_serial_number="PHANTOM-1",
        content_label="LESIONS", content_description="Ground-truth lesions of a synthetic phantom",
        content_creator_name="Phantom^Generator", series_description="Lesion SEG (synthetic phantom ground truth)",
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "SEG_0001.dcm"
    seg.save_as(path)
    return path


def _scout(phantom: Phantom, t: _Timing, weight_kg: float, out: Path) -> Path:
    """A coronal CT localizer (mean HU along y) in its own Frame of Reference (PS3.3 C.8.2.1)."""
    vol = phantom.ct
    g = grid_of(vol)
    proj = np.clip(np.rint(vol.array.astype(np.float32).mean(axis=1)), -1024, 3071)[::-1]  # rows: superior first
    nk, ni = proj.shape
    ds = Dataset()
    sop = phantom.uids.scout_instance
    ds.file_meta = _file_meta(CTImageStorage, sop)
    _common(ds, phantom, t, weight_kg)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.Modality = "CT"
    ds.SeriesInstanceUID = phantom.uids.scout_series
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Topogram (synthetic phantom)"
    ds.SeriesDate, ds.SeriesTime = t.ct.strftime("%Y%m%d"), (t.ct - dt.timedelta(minutes=2)).strftime("%H%M%S")
    ds.FrameOfReferenceUID = phantom.uids.scout_frame_of_reference
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    top = g.voxel_center((nk - 1, 0, 0))
    ds.ImagePositionPatient = [_pos(top[0]), "0", _pos(top[2])]
    ds.PixelSpacing = [_ds(g.spacing[2]), _ds(g.spacing[0])]
    ds.SliceThickness = ""
    ds.Rows, ds.Columns = nk, ni
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PatientPosition = "HFS"
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"  # a projection: no RescaleType HU for localizers
    ds.KVP = "120"
    ds.PixelData = (proj.astype(np.int32) + 1024).astype(np.int16).tobytes()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "CT_SCOUT_0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(phantom: Phantom, out_dir: str | Path, *, patient_weight_kg: float | None = None,
                dose_bq: float | None = None, uptake_s: float | None = None, seg_on: str | None = "pet",
                lesion_type: str = "lesion", with_scout: bool = False) -> WrittenStudy:
    """Write CT, PET, SEG (and optionally a localizer) under ``out_dir`` (sub-folders CT, PT, SEG, SCOUT).

    ``patient_weight_kg`` defaults to the phantom's weight, ``dose_bq`` to 3.7 MBq/kg
    (rounded to 1 MBq), ``uptake_s`` (injection to PET series start) to a seeded 55-75 min.
    ``seg_on`` picks the SEG grid: ``"pet"``, ``"ct"`` or None for no SEG.  ``lesion_type``
    is ``"lesion"`` or ``"neoplasm"`` (the segmented property type).
    """
    if seg_on not in ("pet", "ct", None):
        raise ValueError(f"seg_on must be 'pet', 'ct' or None, not {seg_on!r}")
    if lesion_type not in ("lesion", "neoplasm"):
        raise ValueError(f"lesion_type must be 'lesion' or 'neoplasm', not {lesion_type!r}")
    out = Path(out_dir)
    weight = float(phantom.patient_weight_kg if patient_weight_kg is None else patient_weight_kg)
    dose = float(round(3.7e6 * weight, -6) if dose_bq is None else dose_bq)
    if weight <= 0 or dose <= 0:
        raise ValueError("patient weight and injected dose must be positive")
    t = _timing(phantom, uptake_s)
    ct_paths, ct_headers = _ct_slices(phantom, t, weight, out / "CT")
    pet_paths, pet_headers, factor = _pet_slices(phantom, t, weight, dose, out / "PT")
    seg_path = None
    if seg_on is not None and phantom.lesions:
        seg_path = _seg(phantom, pet_headers if seg_on == "pet" else ct_headers, seg_on, out / "SEG", lesion_type)
    scouts = (_scout(phantom, t, weight, out / "SCOUT"),) if with_scout else ()
    return WrittenStudy(
        directory=out, study_uid=phantom.uids.study, frame_of_reference_uid=phantom.uids.frame_of_reference,
        ct_series_uid=phantom.uids.ct_series, pet_series_uid=phantom.uids.pet_series,
        seg_series_uid=phantom.uids.seg_series, ct_paths=tuple(ct_paths), pet_paths=tuple(pet_paths),
        seg_path=seg_path, scout_paths=scouts, seg_on=str(seg_on), patient_weight_kg=weight, injected_dose_bq=dose,
        injection_datetime=t.injection, series_datetime=t.pet, suv_scale_factor=factor,
    )

