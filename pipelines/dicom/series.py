"""Build a :class:`~pipelines.dicom.volume.Volume` from the instances of one image series.

Geometry comes only from the Image Plane attributes (PS3.3 C.7.6.2: Image Position /
Orientation (Patient), Pixel Spacing) or, for Enhanced and Legacy Converted Enhanced
multi-frame objects, from the Plane Position, Plane Orientation and Pixel Measures
functional groups (PS3.3 C.7.6.16.2.3-2.1).  Instance Number and Slice Location are never
used for ordering: slices are sorted by their distance along the slice normal
``n = row cosine x column cosine`` (dicom-guide section 6).

Checks, each a :class:`GeometryError` with a stable ``code``:

* one Series Instance UID, one Frame of Reference UID, one modality;
* one orientation (``allclose``, atol 1e-4) and equal Rows, Columns and Pixel Spacing;
* no two images at the same position (``duplicate_slice_positions``: several phases,
  acquisitions or time points in one series must be split first);
* regular spacing along the normal: every gap within 1 % of the median gap, otherwise
  ``irregular_slice_spacing`` (missing slices or variable spacing);
* no shear: every slice origin must lie on the line through the first one along the
  normal, otherwise ``gantry_tilt``.

A sheared stack (CT acquired with a tilted gantry, PS3.3 C.8.2.1 Gantry/Detector Tilt) or
an irregular stack can instead be resampled onto an orthogonal grid (``tilt="resample"``,
``irregular="resample"``); the method is described at :func:`_resample_parallel_slices`
and recorded as a :class:`~pipelines.findings.Flag` in the :class:`VolumeBuild`.

Voxel values are ``stored * RescaleSlope + RescaleIntercept`` of *each* slice (PS3.3
C.11.1.1.2 Modality LUT), as float32: Hounsfield units for CT, the PET ``Units`` (usually
Bq/ml) for PET.  SUV conversion is a separate step (:mod:`pipelines.dicom.suv`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.dicom.volume import Volume
from pipelines.errors import GeometryError, InputError
from pipelines.findings import Flag

log = logging.getLogger(__name__)

#: Orientation cosines of all slices must agree to this absolute tolerance.
ORIENTATION_ATOL = 1e-4
#: Pixel spacing (mm) of all slices must agree to this absolute tolerance.
SPACING_ATOL_MM = 1e-4
#: Two images closer than this along the normal (mm) are at the same position.
DUPLICATE_TOL_MM = 1e-2
#: Gaps along the normal may deviate from their median by this fraction.
GAP_RTOL = 0.01
#: ... or, failing that, every slice may lie this fraction of the step off the uniform grid
#: through the first and last slice (with no gap off by more than GAP_JITTER_MAX_RTOL).
#: Scanners spread position rounding over bed joins this way: the GE Discovery ST series in
#: ``pet-ge-sts001`` has one 3.19 mm and four 3.29 mm gaps among 3.27 mm ones, and no slice
#: is more than 0.04 mm (1.2 % of the step) off the uniform grid.  A missing slice moves
#: the grid by half a step and is always caught.
GRID_RTOL = 0.05
GAP_JITTER_MAX_RTOL = 0.10

TiltPolicy = Literal["refuse", "resample"]


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------
def read_headers(paths: Iterable[str | Path], *, stop_before_pixels: bool = True) -> list[Dataset]:
    """Read DICOM files (headers only by default); ``Dataset.filename`` keeps the path.

    :func:`build_volume` re-reads the pixel data from that path when a dataset has none,
    so headers can be validated and grouped cheaply before any pixels are decoded.
    """
    out: list[Dataset] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
        except (InvalidDicomError, OSError, EOFError) as exc:
            raise InputError(f"{path} is not a readable DICOM file: {exc}", code="unreadable_dicom") from exc
        out.append(ds)
    return out


# ---------------------------------------------------------------------------------------
# One 2-D image (a single-frame instance, or one frame of a multi-frame instance)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceRef:
    """Geometry and rescale of one 2-D image, with where its pixels come from."""

    sop_instance_uid: str
    frame: int | None  # 1-based frame number for multi-frame instances, else None
    position: np.ndarray  # Image Position (Patient), LPS mm
    orientation: np.ndarray  # Image Orientation (Patient): row cosine, column cosine
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) = PixelSpacing
    rows: int
    columns: int
    slope: float
    intercept: float
    dataset: Dataset

    @property
    def source(self) -> tuple[str, int | None]:
        """The (SOP Instance UID, frame) that TID 1500 image references cite."""
        return (self.sop_instance_uid, self.frame)


def _floats(value: Any, n: int, what: str, uid: str) -> np.ndarray:  # any header value; checked below
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"instance {uid}: {what} is missing or not numeric", code="missing_geometry") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise GeometryError(f"instance {uid}: {what} must have {n} finite values", code="missing_geometry")
    return arr


def _rescale(item: Dataset) -> tuple[float, float]:
    slope = item.get("RescaleSlope")
    intercept = item.get("RescaleIntercept")
    s = 1.0 if slope in (None, "") else float(slope)
    b = 0.0 if intercept in (None, "") else float(intercept)
    return s, b


def _functional_group(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """Item of functional-group macro ``keyword`` for frame ``index`` (0-based), per-frame first."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        seq = per_frame[index].get(keyword)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(keyword)
        if seq:
            return seq[0]
    return None


def slice_refs(ds: Dataset) -> list[SliceRef]:
    """Split one instance into its 2-D images with their geometry (single- or multi-frame)."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        raise InputError(
            "an instance has an empty SOP Instance UID (Type 1, PS3.3 C.12.1); it cannot be referenced",
            code="missing_uid",
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise GeometryError(f"instance {uid}: Rows/Columns missing", code="missing_geometry")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise GeometryError(f"instance {uid}: only single-sample (grey) images can be stacked", code="not_greyscale")

    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        refs = []
        for f in range(n_frames):
            pos_item = _functional_group(ds, f, "PlanePositionSequence")
            ori_item = _functional_group(ds, f, "PlaneOrientationSequence")
            pm_item = _functional_group(ds, f, "PixelMeasuresSequence")
            if pos_item is None or ori_item is None or pm_item is None:
                raise GeometryError(
                    f"instance {uid} frame {f + 1}: Plane Position, Plane Orientation or Pixel Measures "
                    "functional group missing (PS3.3 C.7.6.16.2)",
                    code="missing_geometry",
                )
            pvt = _functional_group(ds, f, "PixelValueTransformationSequence")
            slope, intercept = _rescale(pvt) if pvt is not None else _rescale(ds)
            ps = _floats(pm_item.get("PixelSpacing"), 2, "PixelSpacing", uid)
            refs.append(
                SliceRef(
                    sop_instance_uid=uid,
                    frame=f + 1,
                    position=_floats(pos_item.get("ImagePositionPatient"), 3, "ImagePositionPatient", uid),
                    orientation=_floats(ori_item.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", uid),
                    pixel_spacing=(float(ps[0]), float(ps[1])),
                    rows=rows,
                    columns=cols,
                    slope=slope,
                    intercept=intercept,
                    dataset=ds,
                )
            )
        return refs

    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise GeometryError(
            f"instance {uid}: multi-frame object without functional groups cannot be placed in space",
            code="unsupported_multiframe",
        )
    ps = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing", uid)
    slope, intercept = _rescale(ds)
    return [
        SliceRef(
            sop_instance_uid=uid,
            frame=None,
            position=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", uid),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", uid),
            pixel_spacing=(float(ps[0]), float(ps[1])),
            rows=rows,
            columns=cols,
            slope=slope,
            intercept=intercept,
            dataset=ds,
        )
    ]


# ---------------------------------------------------------------------------------------
# Geometry analysis
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackGeometry:
    """The validated, sorted arrangement of a series' images (no pixels)."""

    refs: tuple[SliceRef, ...]  # sorted ascending along the normal
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    normal: np.ndarray
    distances_mm: np.ndarray  # normal . (IPP_k - IPP_0), ascending, starts at 0
    inplane_offsets_mm: np.ndarray  # (n, 2): row . (IPP_k - IPP_0), column . (IPP_k - IPP_0)
    gaps_mm: np.ndarray  # diff(distances_mm)
    sheared: bool
    regular: bool
    grid_deviation_mm: float  # max distance of a slice from the uniform grid through first and last
    gantry_tilt_deg: float | None  # GantryDetectorTilt of the first image, if present

    @property
    def median_gap_mm(self) -> float:
        """The typical slice gap; NaN for a single slice."""
        return float(np.median(self.gaps_mm)) if len(self.gaps_mm) else float("nan")

    @property
    def shear_angle_deg(self) -> float:
        """Angle between the stacking direction and the slice normal."""
        if len(self.refs) < 2 or self.distances_mm[-1] <= 0:
            return 0.0
        lateral = float(np.linalg.norm(self.inplane_offsets_mm[-1]))
        return math.degrees(math.atan2(lateral, float(self.distances_mm[-1])))


def _shear_tolerance(pixel_spacing: tuple[float, float]) -> float:
    """In-plane offset (mm) above which slice origins count as sheared.

    2 % of the smaller pixel spacing (but at least 0.01 mm): well above the rounding of
    16-character DS values, well below anything that moves a voxel.
    """
    return max(0.01, 0.02 * min(pixel_spacing))


def analyse_geometry(datasets: Sequence[Dataset]) -> StackGeometry:
    """Validate one series' headers and sort its images along the slice normal."""
    if not datasets:
        raise GeometryError("no instances were given for the series", code="empty_series")

    series_uids = {str(ds.get("SeriesInstanceUID", "") or "") for ds in datasets}
    if "" in series_uids:
        raise InputError(
            "an instance has an empty Series Instance UID (Type 1, PS3.3 C.7.3.1)", code="missing_uid"
        )
    if len(series_uids) != 1:
        raise GeometryError(
            f"instances of {len(series_uids)} series were given; a volume is built from one series",
            code="mixed_series",
        )
    series_uid = next(iter(series_uids))
    for_uids = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in datasets}
    if "" in for_uids:
        raise GeometryError(
            f"series {series_uid}: an instance has no Frame of Reference UID", code="missing_frame_of_reference"
        )
    if len(for_uids) != 1:
        raise GeometryError(
            f"series {series_uid} spans {len(for_uids)} frames of reference", code="mixed_frame_of_reference"
        )
    modalities = {str(ds.get("Modality", "") or "") for ds in datasets}
    if len(modalities) != 1:
        raise GeometryError(f"series {series_uid} mixes modalities {sorted(modalities)}", code="mixed_modality")

    sop_uids = [str(ds.get("SOPInstanceUID", "") or "") for ds in datasets]
    if len(set(sop_uids)) != len(sop_uids):
        raise GeometryError(
            f"series {series_uid}: the same SOP Instance UID was given more than once", code="duplicate_sop_instance"
        )

    refs: list[SliceRef] = []
    for ds in datasets:
        refs.extend(slice_refs(ds))

    first = refs[0]
    for r in refs[1:]:
        if not np.allclose(r.orientation, first.orientation, atol=ORIENTATION_ATOL):
            raise GeometryError(
                f"series {series_uid}: images have different orientations ({r.sop_instance_uid}); "
                "a series with several orientations cannot be stacked",
                code="mixed_orientation",
            )
        if (r.rows, r.columns) != (first.rows, first.columns):
            raise GeometryError(
                f"series {series_uid}: images differ in Rows/Columns ({r.rows}x{r.columns} vs "
                f"{first.rows}x{first.columns})",
                code="mixed_matrix",
            )
        if not np.allclose(r.pixel_spacing, first.pixel_spacing, atol=SPACING_ATOL_MM):
            raise GeometryError(
                f"series {series_uid}: images differ in Pixel Spacing", code="mixed_pixel_spacing"
            )

    row = first.orientation[:3].copy()
    col = first.orientation[3:].copy()
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(float(row @ col)) > 1e-3
    ):
        raise GeometryError(
            f"series {series_uid}: Image Orientation (Patient) is not two orthonormal cosines",
            code="invalid_orientation",
        )
    row /= np.linalg.norm(row)
    col -= (col @ row) * row
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)

    d = np.array([float(normal @ r.position) for r in refs])
    order = np.argsort(d, kind="stable")
    refs = [refs[i] for i in order]
    origin = refs[0].position
    rel = np.array([r.position - origin for r in refs])
    dist = rel @ normal
    gaps = np.diff(dist)

    dup = np.nonzero(gaps < DUPLICATE_TOL_MM)[0]
    if len(dup):
        k = int(dup[0])
        raise GeometryError(
            f"series {series_uid}: {len(dup)} pair(s) of images at the same position along the slice normal "
            f"(e.g. {refs[k].sop_instance_uid} and {refs[k + 1].sop_instance_uid}); the series holds several "
            "acquisitions, phases or time points and must be split first",
            code="duplicate_slice_positions",
        )

    offsets = np.stack([rel @ row, rel @ col], axis=1)
    sheared = bool(np.max(np.abs(offsets)) > _shear_tolerance(first.pixel_spacing)) if len(refs) > 1 else False
    regular = True
    grid_dev = 0.0
    if len(gaps) >= 2:
        med = float(np.median(gaps))
        step = float(dist[-1]) / (len(dist) - 1)
        grid_dev = float(np.max(np.abs(dist - step * np.arange(len(dist)))))
        regular = bool(np.all(np.abs(gaps - med) <= GAP_RTOL * med)) or bool(
            grid_dev <= GRID_RTOL * step and np.all(np.abs(gaps - step) <= GAP_JITTER_MAX_RTOL * step)
        )

    tilt_raw = first.dataset.get("GantryDetectorTilt")
    tilt = float(tilt_raw) if tilt_raw not in (None, "") else None
    return StackGeometry(
        refs=tuple(refs),
        row_cosine=row,
        column_cosine=col,
        normal=normal,
        distances_mm=dist,
        inplane_offsets_mm=offsets,
        gaps_mm=gaps,
        sheared=sheared,
        regular=regular,
        grid_deviation_mm=grid_dev,
        gantry_tilt_deg=tilt,
    )


# ---------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------
def _decoded(ds: Dataset, cache: dict[int, np.ndarray]) -> np.ndarray:
    """Stored values of an instance, shape (frames, rows, cols); re-reads headers-only datasets."""
    key = id(ds)
    if key in cache:
        return cache[key]
    src = ds
    uid = str(ds.get("SOPInstanceUID", ""))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        filename = getattr(ds, "filename", None)
        if not isinstance(filename, (str, Path)) or not Path(filename).is_file():
            raise InputError(
                f"instance {uid} was read without pixel data and its file is not available", code="pixels_unavailable"
            )
        src = pydicom.dcmread(str(filename))
    try:
        arr = src.pixel_array
    except Exception as exc:  # decoder plugins raise many types (RuntimeError, NotImplementedError, ...)
        ts = getattr(getattr(src, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InputError(
            f"instance {uid}: pixel data could not be decoded (transfer syntax {ts}): {exc}",
            code="pixel_decode_failed",
        ) from exc
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    cache[key] = arr
    return arr


def load_slices(refs: Sequence[SliceRef]) -> np.ndarray:
    """Rescaled float32 stack ``[k, row, column]`` of the given images (per-image slope/intercept)."""
    cache: dict[int, np.ndarray] = {}
    first = refs[0]
    out = np.empty((len(refs), first.rows, first.columns), dtype=np.float32)
    for k, r in enumerate(refs):
        frames = _decoded(r.dataset, cache)
        index = 0 if r.frame is None else r.frame - 1
        if index >= frames.shape[0] or frames.shape[1:] != (r.rows, r.columns):
            raise InputError(
                f"instance {r.sop_instance_uid}: pixel data shape {frames.shape} does not match its header",
                code="pixel_shape_mismatch",
            )
        out[k] = (frames[index].astype(np.float64) * r.slope + r.intercept).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeBuild:
    """A built volume plus how it was built.

    ``sources`` and ``source_distances_mm`` list the input images in sorted order with
    their distance along the normal from the first; for a volume built without
    resampling they coincide with ``volume.slice_sources``.  A resampled volume has empty
    ``volume.slice_sources`` (its slices are interpolated, no instance is the source of
    one) and a flag saying why.
    """

    volume: Volume
    flags: tuple[Flag, ...]
    resampled: bool
    sources: tuple[tuple[str, int | None], ...]
    source_distances_mm: tuple[float, ...]
    geometry: StackGeometry


def build_volume_report(
    datasets: Sequence[Dataset],
    *,
    tilt: TiltPolicy = "resample",
    irregular: TiltPolicy = "refuse",
    fill_value: float | None = None,
) -> VolumeBuild:
    """Validate, sort and stack one series; see the module docstring for the checks.

    ``tilt``: what to do with a sheared stack (gantry tilt): ``"refuse"`` raises
    ``GeometryError(code="gantry_tilt")``; ``"resample"`` de-shears onto an orthogonal grid.
    ``irregular``: the same choice for an unsheared stack with missing slices or variable
    spacing (``irregular_slice_spacing``).  Refusing is the default because a missing slice
    usually means an incomplete transfer, which interpolation would hide.  A sheared stack
    that is resampled is also resampled across uneven gaps (tilted head CTs often change
    slice thickness mid-series, as ``ct-gantry-tilt`` does); both flags are then recorded.
    ``fill_value``: value for output voxels no input slice covers when resampling
    (default: the minimum of the series, i.e. air/outside-FOV padding for CT).
    """
    geo = analyse_geometry(datasets)
    first = geo.refs[0]
    ds0 = first.dataset
    meta = {
        "frame_of_reference_uid": str(ds0.FrameOfReferenceUID),
        "series_instance_uid": str(ds0.SeriesInstanceUID),
        "modality": str(ds0.get("Modality", "") or ""),
    }
    sources = tuple(r.source for r in geo.refs)
    dists = tuple(float(v) for v in geo.distances_mm)
    row_sp, col_sp = first.pixel_spacing  # PixelSpacing = [between rows, between columns]
    flags: list[Flag] = []

    if geo.sheared:
        angle = geo.shear_angle_deg
        tilt_txt = f"GantryDetectorTilt {geo.gantry_tilt_deg:+.2f} deg, " if geo.gantry_tilt_deg else ""
        if tilt == "refuse":
            raise GeometryError(
                f"series {meta['series_instance_uid']}: the slice stack is sheared ({tilt_txt}stack "
                f"{angle:.2f} deg off the slice normal), as from a tilted gantry; it cannot be used as an "
                "orthogonal volume",
                code="gantry_tilt",
            )
    elif not geo.regular and irregular == "refuse":
        med = geo.median_gap_mm
        bad = np.nonzero(np.abs(geo.gaps_mm - med) > GAP_RTOL * med)[0]
        examples = ", ".join(f"{geo.gaps_mm[i]:.3f} mm after image {i + 1}" for i in bad[:3])
        raise GeometryError(
            f"series {meta['series_instance_uid']}: irregular slice spacing along the normal (median "
            f"{med:.3f} mm; {len(bad)} gap(s) differ by more than {GAP_RTOL:.0%}: {examples}); "
            "slices are missing or the spacing varies",
            code="irregular_slice_spacing",
        )

    stack = load_slices(geo.refs)

    if not geo.sheared and geo.regular:
        n = len(geo.refs)
        if n > 1:
            step = float(geo.distances_mm[-1]) / (n - 1)
        else:
            st = ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness")
            step = float(st) if st not in (None, "") and float(st) > 0 else 1.0
            flags.append(
                Flag("single_slice_volume", f"series {meta['series_instance_uid']} has one image; slice step {step} mm")
            )
        if n > 2 and not np.all(np.abs(geo.gaps_mm - geo.median_gap_mm) <= GAP_RTOL * geo.median_gap_mm):
            flags.append(
                Flag(
                    "slice_spacing_jitter",
                    f"series {meta['series_instance_uid']}: slice gaps vary from {geo.gaps_mm.min():.3f} to "
                    f"{geo.gaps_mm.max():.3f} mm but no slice is more than {geo.grid_deviation_mm:.3f} mm off a "
                    f"uniform {step:.4f} mm grid; stacked without resampling",
                )
            )
        affine = np.eye(4)
        affine[:3, 0] = geo.row_cosine * col_sp
        affine[:3, 1] = geo.column_cosine * row_sp
        affine[:3, 2] = geo.normal * step
        affine[:3, 3] = first.position
        vol = Volume(array=stack, affine=affine, slice_sources=sources, **meta)
        return VolumeBuild(vol, tuple(flags), False, sources, dists, geo)

    # sheared (tilt == "resample") or irregular (irregular == "resample")
    fill = float(np.min(stack)) if fill_value is None else float(fill_value)
    array, affine, out_step = _resample_parallel_slices(stack, geo, fill)
    if geo.sheared:
        flags.append(
            Flag(
                "gantry_tilt_resampled",
                f"series {meta['series_instance_uid']}: sheared stack (GantryDetectorTilt "
                f"{geo.gantry_tilt_deg if geo.gantry_tilt_deg is not None else 'absent'}, stack "
                f"{geo.shear_angle_deg:.2f} deg off the normal) de-sheared and resampled (linear, physical "
                f"space) onto an orthogonal grid with {out_step:.3f} mm slice spacing",
            )
        )
    if not geo.regular:
        flags.append(
            Flag(
                "irregular_spacing_resampled",
                f"series {meta['series_instance_uid']}: slice gaps from {geo.gaps_mm.min():.3f} to "
                f"{geo.gaps_mm.max():.3f} mm resampled (linear) to a uniform {out_step:.3f} mm",
            )
        )
    log.info("series %s resampled onto an orthogonal grid %s", meta["series_instance_uid"], array.shape)
    vol = Volume(array=array, affine=affine, slice_sources=(), **meta)
    return VolumeBuild(vol, tuple(flags), True, sources, dists, geo)


def build_volume(
    datasets: Sequence[Dataset],
    *,
    tilt: TiltPolicy = "resample",
    irregular: TiltPolicy = "refuse",
    flags: list[Flag] | None = None,
) -> Volume:
    """Build the volume of one series (see :func:`build_volume_report`).

    Flags raised while building (e.g. ``gantry_tilt_resampled``) are appended to
    ``flags`` when a list is given; use :func:`build_volume_report` for the full record.
    """
    built = build_volume_report(datasets, tilt=tilt, irregular=irregular)
    if flags is not None:
        flags.extend(built.flags)
    return built.volume


def _resample_parallel_slices(
    stack: np.ndarray, geo: StackGeometry, fill: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Resample parallel, possibly sheared and unevenly spaced slices onto an orthogonal grid.

    All slices share one orientation, so in the frame ``(u, v, w)`` = (row cosine, column
    cosine, normal) anchored at the first slice's origin, slice k is the plane
    ``w = w_k`` with its pixel (i, j) at ``(u_k + i*dc, v_k + j*dr)``.  Linear interpolation
    in physical space then separates exactly into

    1. in plane: each slice is resampled with SimpleITK (linear interpolator, physical
       coordinates: 2-D image with origin ``(u_k, v_k)``) onto one common in-plane grid whose
       extent is the union of all slices (no data is cropped); this removes the shear;
    2. along the normal: the output plane at ``w`` interpolates linearly between the two
       input planes that bracket it (their true, possibly uneven, positions).

    The output grid keeps the pixel spacing and the first slice's pixel lattice, spans
    ``w_0 .. w_last`` and uses the median input gap (adjusted to fit the span exactly) as slice spacing.  Voxels no slice covers
    get ``fill``.  Returns the array ``[k, j, i]``, its affine and the slice spacing.
    """
    n, rows, cols = stack.shape
    row_sp, col_sp = geo.refs[0].pixel_spacing
    du, dv = col_sp, row_sp  # step along the row direction (between columns), along the column direction
    offs = geo.inplane_offsets_mm
    w = geo.distances_mm

    # in-plane lattice aligned with the first slice's pixels, covering every slice
    u0 = du * math.floor(float(offs[:, 0].min()) / du + 1e-6)
    v0 = dv * math.floor(float(offs[:, 1].min()) / dv + 1e-6)
    u1 = float(offs[:, 0].max()) + (cols - 1) * du
    v1 = float(offs[:, 1].max()) + (rows - 1) * dv
    nu = int(math.ceil((u1 - u0) / du - 1e-6)) + 1
    nv = int(math.ceil((v1 - v0) / dv - 1e-6)) + 1

    span = float(w[-1] - w[0])
    med = float(np.median(np.diff(w)))
    n_out = max(1, int(round(span / med)) + 1)
    step = span / (n_out - 1) if n_out > 1 else med

    reference = sitk.Image(nu, nv, sitk.sitkFloat32)
    reference.SetOrigin((u0, v0))
    reference.SetSpacing((du, dv))

    cache: dict[int, np.ndarray] = {}

    def plane(k: int) -> np.ndarray:
        if k not in cache:
            if len(cache) > 2:
                cache.pop(min(cache))
            img = sitk.GetImageFromArray(np.ascontiguousarray(stack[k]))  # [row j, column i] -> x=i, y=j
            img.SetOrigin((float(offs[k, 0]), float(offs[k, 1])))
            img.SetSpacing((du, dv))
            res = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32)
            cache[k] = sitk.GetArrayFromImage(res)
        return cache[k]

    out = np.empty((n_out, nv, nu), dtype=np.float32)
    for m in range(n_out):
        wm = w[0] + m * step
        k = int(np.searchsorted(w, wm, side="right") - 1)
        k = min(max(k, 0), n - 1)
        if k == n - 1 or abs(wm - w[k]) < 1e-6:
            out[m] = plane(k)
            continue
        t = float((wm - w[k]) / (w[k + 1] - w[k]))
        out[m] = (1.0 - t) * plane(k) + t * plane(k + 1)

    origin = geo.refs[0].position + u0 * geo.row_cosine + v0 * geo.column_cosine
    affine = np.eye(4)
    affine[:3, 0] = geo.row_cosine * du
    affine[:3, 1] = geo.column_cosine * dv
    affine[:3, 2] = geo.normal * step
    affine[:3, 3] = origin
    return out, affine, step
