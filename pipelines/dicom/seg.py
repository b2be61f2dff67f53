"""Read DICOM Segmentation objects and place their segments on a target image grid.

Supported objects (PS3.3 A.51 Segmentation IOD, C.8.20 Segmentation modules):

* Segmentation Storage ``1.2.840.10008.5.1.4.1.1.66.4``, BINARY and FRACTIONAL
  (PROBABILITY or OCCUPANCY), with or without omitted empty frames;
* Label Map Segmentation Storage ``1.2.840.10008.5.1.4.1.1.66.7`` (pixel value = segment
  number).

Pixels and geometry are read with highdicom (``Segmentation.get_volume``), one segment at a
time, because segments may overlap (a single label map cannot hold them).  When highdicom
cannot read an object (e.g. Siemens syngo.via VA11A SEGs without Segmented Property codes,
or early 3D Slicer SEGs whose frame tables it cannot index), a small fallback parser reads
the Per-Frame / Shared Functional Groups (C.7.6.16) directly: plane position, orientation,
pixel measures and referenced segment number per frame, and the bit-packed pixel data.

Lesion masks are binary.  FRACTIONAL values (probability or occupancy, rescaled by
``MaximumFractionalValue``) are thresholded at :data:`FRACTIONAL_THRESHOLD` = 0.5
(value >= 0.5 is inside) on the SEG's own grid, before any resampling.

Masks are placed on a target :class:`~pipelines.dicom.volume.Volume` **by physical
geometry** (patient LPS mm in the shared Frame of Reference), never by source-instance
references alone, so a SEG drawn on the CT can be measured on the PET:

* ``index_aligned``: the SEG voxel centres coincide with target voxel centres (same
  spacing, axes equal up to permutation and sign, integer offset): voxels are copied;
* ``subvoxel_coverage``: otherwise each target voxel is split into up to 8x8x8 sub-points,
  each sub-point takes the SEG value of the SEG voxel that contains it (box model), and
  the target voxel is inside when the covered fraction is >= 0.5 (dicom-guide section 6:
  "fraction of each PET voxel covered by the CT mask, threshold 0.5").

Every mask is kept cropped to its bounding box (:class:`RegionMask`), so the cost of
reading, splitting and mapping is linear in the SEG size and never allocates a
full-volume array per segment or lesion.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from scipy import ndimage

from pipelines.dicom.volume import Volume
from pipelines.errors import LocusError, SegmentationError
from pipelines.findings import CodedValue, Flag

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASSES = (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE)

FRACTIONAL_THRESHOLD = 0.5
"""FRACTIONAL SEG values >= this (after rescaling by MaximumFractionalValue) are lesion."""

COVERAGE_THRESHOLD = 0.5
"""A target voxel is inside a resampled mask when at least this fraction of it is covered."""

MAX_SUBSAMPLES_PER_AXIS = 8
_ALIGN_TOL_VOXEL = 0.02  # |index - round(index)| accepted as "the same voxel centre"
_MATRIX_TOL = 1e-3
_MAX_POINTS_PER_BATCH = 1 << 20  # bounds the memory of one sub-sampling batch (~50 MB)

# 26-connectivity (faces, edges and corners), the usual choice for PET lesion splitting.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

Mode = Literal["segments", "components"]
Reader = Literal["auto", "highdicom", "fallback"]


# ---------------------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentInfo:
    """One item of the Segment Sequence (PS3.3 C.8.20.2, Table C.8.20-4)."""

    number: int
    label: str
    description: str | None
    property_category: CodedValue | None
    property_type: CodedValue | None
    anatomic_regions: tuple[CodedValue, ...]
    tracking_id: str | None
    tracking_uid: str | None
    algorithm_type: str | None
    algorithm_name: str | None
    flags: tuple[Flag, ...] = ()


@dataclass(frozen=True)
class SourceRegion:
    """A segment (or one connected component of it) on the SEG's own voxel grid.

    ``mask`` is the thresholded binary mask cropped to its bounding box; ``offset`` is the
    ``(k, j, i)`` index of ``mask[0, 0, 0]`` in the grid described by ``affine`` (index
    ``(i, j, k)`` -> LPS mm, the :class:`Volume` convention).
    """

    segment_number: int
    component: int | None
    mask: np.ndarray
    offset: tuple[int, int, int]
    affine: np.ndarray
    grid_shape: tuple[int, int, int]  # (k, j, i) shape of the whole SEG grid

    @property
    def voxel_count(self) -> int:
        """Number of voxels in the region."""
        return int(np.count_nonzero(self.mask))

    def voxel_indices_ijk(self) -> np.ndarray:
        """(N, 3) integer ``(i, j, k)`` indices of the mask voxels in the SEG grid."""
        kji = np.argwhere(self.mask) + np.asarray(self.offset)
        return kji[:, ::-1].astype(np.float64)


@dataclass(frozen=True)
class RegionMask:
    """A segment or component placed on a target grid, cropped to its bounding box.

    ``mask[a, b, c]`` is target voxel ``(k0 + a, j0 + b, i0 + c)`` with
    ``offset = (k0, j0, i0)``.  An empty mask has shape ``(0, 0, 0)``.
    """

    segment_number: int
    component: int | None
    mask: np.ndarray
    offset: tuple[int, int, int]
    target_shape: tuple[int, int, int]
    method: str  # "index_aligned" or "subvoxel_coverage"
    source_voxel_count: int
    source_voxels_outside_target: int

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index slices of the mask's bounding box in the full grid."""
        (k, j, i), (nk, nj, ni) = self.offset, self.mask.shape
        return (slice(k, k + nk), slice(j, j + nj), slice(i, i + ni))

    @property
    def voxel_count(self) -> int:
        """Number of voxels in the region."""
        return int(np.count_nonzero(self.mask))

    def dense(self) -> np.ndarray:
        """The mask as a full boolean array of the target shape (for small volumes and tests)."""
        out = np.zeros(self.target_shape, dtype=bool)
        if self.mask.size:
            out[self.slices] = self.mask
        return out

    def voxel_indices_kji(self) -> np.ndarray:
        """Full-grid (k, j, i) indices of the region's voxels."""
        return np.argwhere(self.mask) + np.asarray(self.offset)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------
def _coded(item: Dataset | None) -> CodedValue | None:
    if item is None:
        return None
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    if not value:
        return None
    return CodedValue(
        value=str(value),
        scheme=str(item.get("CodingSchemeDesignator", "")),
        meaning=str(item.get("CodeMeaning", "")),
    )


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _segment_info(item: Dataset) -> SegmentInfo:
    number = int(item.SegmentNumber)
    category = _coded(_first(item, "SegmentedPropertyCategoryCodeSequence"))
    ptype = _coded(_first(item, "SegmentedPropertyTypeCodeSequence"))
    flags: list[Flag] = []
    if category is None or ptype is None:
        flags.append(
            Flag(
                "seg_missing_property_codes",
                f"segment {number} has no Segmented Property "
                f"{'Category' if category is None else 'Type'} code (Type 1 in PS3.3 C.8.20.2); "
                "accepted without a coded lesion type",
            )
        )
    regions = tuple(c for c in (_coded(x) for x in item.get("AnatomicRegionSequence", [])) if c)
    tid = item.get("TrackingID")
    tuid = item.get("TrackingUID")
    return SegmentInfo(
        number=number,
        label=str(item.get("SegmentLabel", "")),
        description=str(item.SegmentDescription) if item.get("SegmentDescription") else None,
        property_category=category,
        property_type=ptype,
        anatomic_regions=regions,
        tracking_id=str(tid) if tid else None,
        tracking_uid=str(tuid) if tuid else None,
        algorithm_type=str(item.SegmentAlgorithmType) if item.get("SegmentAlgorithmType") else None,
        algorithm_name=str(item.SegmentAlgorithmName) if item.get("SegmentAlgorithmName") else None,
        flags=tuple(flags),
    )


class SegObject:
    """A parsed SEG: descriptions, Frame of Reference and per-segment masks on its own grid.

    Build it with :func:`read_segments`.  Per-segment masks are decoded lazily (once) and
    cached cropped to their bounding box.
    """

    def __init__(self, ds: Dataset, *, reader: Reader = "auto") -> None:
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in SEG_SOP_CLASSES:
            raise SegmentationError(
                f"SOP Class {sop_class or '(missing)'} is not a Segmentation Storage class", code="not_a_segmentation"
            )
        self.sop_class_uid = sop_class
        self.sop_instance_uid = str(ds.SOPInstanceUID)
        self.series_instance_uid = str(ds.get("SeriesInstanceUID", ""))
        self.study_instance_uid = str(ds.get("StudyInstanceUID", ""))
        self.frame_of_reference_uid = str(ds.get("FrameOfReferenceUID", "") or "")
        self.segmentation_type = str(ds.get("SegmentationType", "")).upper()
        if sop_class == LABEL_MAP_SEGMENTATION_STORAGE and not self.segmentation_type:
            self.segmentation_type = "LABELMAP"
        if self.segmentation_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
            raise SegmentationError(
                f"SEG {self.sop_instance_uid}: unsupported Segmentation Type {self.segmentation_type!r}",
                code="unsupported_segmentation_type",
            )
        self.fractional_type = str(ds.SegmentationFractionalType) if ds.get("SegmentationFractionalType") else None
        items = ds.get("SegmentSequence") or []
        if not items:
            raise SegmentationError(f"SEG {self.sop_instance_uid} has no Segment Sequence", code="seg_no_segments")
        # Segment Number 0 exists only in label maps, where it describes the background
        # (pixel value 0; highdicom writes it coded DCM 125040 "Background"): not a lesion.
        self.segments: tuple[SegmentInfo, ...] = tuple(
            sorted((_segment_info(it) for it in items if int(it.SegmentNumber) != 0), key=lambda s: s.number))
        if not self.segments:
            raise SegmentationError(f"SEG {self.sop_instance_uid} has only a background segment",
                                    code="seg_no_segments")
        self.referenced_series_uids: tuple[str, ...] = tuple(
            str(it.SeriesInstanceUID) for it in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in it
        )
        self.flags: list[Flag] = []
        if self.segmentation_type == "FRACTIONAL":
            self.flags.append(
                Flag(
                    "seg_fractional_thresholded",
                    f"FRACTIONAL ({self.fractional_type}) segmentation thresholded at >= {FRACTIONAL_THRESHOLD}",
                )
            )
        self._ds = ds
        self._hd: hd.seg.Segmentation | None = None
        self._fallback: _FallbackFrames | None = None
        self._labelmap: tuple[np.ndarray, np.ndarray, list] | None = None
        self._cache: dict[int, SourceRegion] = {}
        self._frame_table: tuple[tuple[np.ndarray, np.ndarray] | None, hd.VolumeGeometry | None] | None = None
        _check_frame_count(ds, self.sop_instance_uid)
        self.reader = "fallback" if reader == "fallback" else "highdicom"
        if reader != "fallback":
            try:
                self._hd = hd.seg.Segmentation.from_dataset(ds, copy=True)
            except Exception as exc:  # highdicom raises many types on non-conformant objects
                if reader == "highdicom":
                    raise SegmentationError(
                        f"highdicom cannot read SEG {self.sop_instance_uid}: {exc}", code="seg_unreadable"
                    ) from exc
                self._switch_to_fallback(exc)

    # -- descriptions ---------------------------------------------------------------
    @property
    def segment_numbers(self) -> tuple[int, ...]:
        """The segment numbers the SEG defines."""
        return tuple(s.number for s in self.segments)

    def segment(self, number: int) -> SegmentInfo:
        """The segment with ``number``; raises a SEG error for an unknown one."""
        for s in self.segments:
            if s.number == number:
                return s
        raise SegmentationError(
            f"SEG {self.sop_instance_uid} has no segment {number} (has {list(self.segment_numbers)})",
            code="seg_unknown_segment",
        )

    @property
    def dataset(self) -> Dataset:
        """The SEG dataset as received (evidence for the SR)."""
        return self._ds

    # -- masks on the SEG grid ------------------------------------------------------------
    def _switch_to_fallback(self, exc: Exception) -> None:
        log.warning("SEG %s: highdicom failed (%s: %s); using the functional-group parser",
                    self.sop_instance_uid, type(exc).__name__, exc)
        self.reader = "fallback"
        self._hd = None
        self.flags.append(
            Flag("seg_fallback_parser", f"highdicom could not read the SEG ({type(exc).__name__}: {exc}); "
                 "read with the Per-Frame Functional Groups parser")
        )

    def source_mask(self, number: int) -> SourceRegion:
        """Segment ``number`` as a binary mask on the SEG's own grid (cached)."""
        self.segment(number)
        if number not in self._cache:
            if self.reader == "highdicom":
                try:
                    self._cache[number] = self._hd_mask(number)
                except SegmentationError:
                    raise
                except Exception as exc:
                    self._switch_to_fallback(exc)
            if number not in self._cache:
                try:
                    if self._fallback is None:
                        self._fallback = _FallbackFrames(self._ds, self.segmentation_type)
                    arr, aff = self._fallback.segment_grid(number)
                except SegmentationError:
                    raise
                except Exception as exc:  # malformed attributes or undecodable pixel data
                    raise SegmentationError(
                        f"SEG {self.sop_instance_uid} segment {number} cannot be decoded: "
                        f"{type(exc).__name__}: {exc}", code="seg_unreadable") from exc
                self._cache[number] = _crop(number, None, arr, aff)
        return self._cache[number]

    def _hd_mask(self, number: int) -> SourceRegion:
        assert self._hd is not None
        if self.segmentation_type == "LABELMAP":
            if self._labelmap is None:  # one decode for all segments: label maps cannot overlap
                vol = self._hd.get_volume(combine_segments=True, relabel=False)
                labels = np.asarray(vol.array)
                self._labelmap = (labels, _hd_affine(vol.affine), ndimage.find_objects(labels.astype(np.int64)))
            labels, aff, boxes = self._labelmap
            box = boxes[number - 1] if number - 1 < len(boxes) else None
            if box is None:
                return _empty(number, aff, labels.shape)
            return SourceRegion(number, None, labels[box] == number, _starts(box), aff, _shape3(labels.shape))
        # Decode only the slab of volume positions holding this segment's frames: the
        # volume geometry spans all frames of the SEG, and decoding it whole for every
        # segment would cost (segments x volume).
        span = self._slice_span(number)
        if span == (0, 0):
            return _empty(number, np.eye(4), (0, 0, 0))
        start, end = span if span is not None else (None, None)
        vol = self._hd.get_volume(segment_numbers=[number], combine_segments=False, rescale_fractional=True,
                                  slice_start=start, slice_end=end, as_indices=True)
        arr = np.asarray(vol.array)
        if arr.ndim == 4:
            arr = arr[..., 0]
        mask = arr >= FRACTIONAL_THRESHOLD if self.segmentation_type == "FRACTIONAL" else arr > 0
        return _crop(number, None, mask, _hd_affine(vol.affine))

    def _slice_span(self, number: int) -> tuple[int, int] | None:
        """Volume positions ``[start, end)`` of the frames of segment ``number``.

        ``(0, 0)`` when the segment has no frame; ``None`` when unknown (decode all).
        """
        assert self._hd is not None
        if self._frame_table is None:
            try:
                geometry = self._hd.get_volume_geometry()
                self._frame_table = (_frame_table(self._ds), geometry)
            except Exception:  # unusual frame layout: let get_volume decide
                self._frame_table = (None, None)
        table, geometry = self._frame_table
        if table is None or geometry is None:
            return None
        positions, numbers = table
        pos = positions[numbers == number]
        if pos.size == 0:
            return (0, 0)
        inv = np.linalg.inv(np.asarray(geometry.affine, dtype=np.float64))
        k = pos @ inv[0, :3] + inv[0, 3]  # highdicom index 0 = volume position
        return int(np.floor(k.min() + 0.5)), int(np.floor(k.max() + 0.5)) + 1

    def source_regions(self, segment_numbers: list[int] | tuple[int, ...] | None = None,
                       mode: Mode = "segments") -> list[SourceRegion]:
        """Masks on the SEG grid, one per segment, or one per 26-connected component.

        Components are numbered 1.. by decreasing voxel count on the SEG grid, ties broken
        by the centroid's patient z, y, x (LPS mm): the numbering depends neither on the
        grid they are measured on nor on the order in which the SEG stores its frames.
        """
        if mode not in ("segments", "components"):
            raise ValueError(f"mode must be 'segments' or 'components', not {mode!r}")
        numbers = self.segment_numbers if segment_numbers is None else tuple(segment_numbers)
        out: list[SourceRegion] = []
        for n in numbers:
            reg = self.source_mask(n)
            if mode == "segments":
                out.append(reg)
                continue
            if reg.mask.size == 0:
                continue
            labels, count = ndimage.label(reg.mask, structure=CONNECTIVITY_26)
            parts: list[tuple[tuple[float, ...], np.ndarray, tuple[int, int, int]]] = []
            for lab, box in enumerate(ndimage.find_objects(labels), start=1):
                if box is None:
                    continue
                sub = labels[box] == lab
                off = _add(reg.offset, _starts(box))
                kji = np.argwhere(sub) + np.asarray(off)
                centre = reg.affine[:3, :3] @ kji.mean(axis=0)[::-1] + reg.affine[:3, 3]
                key = (-float(kji.shape[0]), *(round(float(v), 4) for v in centre[::-1]))
                parts.append((key, sub, off))
            parts.sort(key=lambda p: p[0])
            for c, (_, sub, off) in enumerate(parts, start=1):
                out.append(SourceRegion(n, c, sub, off, reg.affine, reg.grid_shape))
            log.debug("SEG %s segment %d: %d components", self.sop_instance_uid, n, count)
        return out


def _check_frame_count(ds: Dataset, uid: str) -> None:
    """Refuse a Number of Frames the object does not hold, before anything is sized by it.

    A forged Number of Frames (e.g. 19000101 on a 3-frame SEG) made highdicom build
    per-frame tables for 19 million frames: minutes of CPU and gigabytes for a 4 kB object
    (found by tests/fuzz).  PS3.3 C.7.6.16: one Per-Frame Functional Groups item per frame;
    PS3.5 8.1.1: native Pixel Data holds Rows x Columns x frames x Bits Allocated bits.
    """
    nf = int(ds.get("NumberOfFrames", 1) or 1)
    if nf < 1:
        raise SegmentationError(f"SEG {uid}: Number of Frames {nf}", code="seg_malformed")
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and len(per) != nf:
        raise SegmentationError(f"SEG {uid}: {len(per)} per-frame items for {nf} frames", code="seg_malformed")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" in ds and (syntax is None or not UID(str(syntax)).is_compressed):
        bits = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * nf * int(ds.get("BitsAllocated", 1) or 1)
        if len(ds.PixelData) < (bits + 7) // 8:
            raise SegmentationError(
                f"SEG {uid}: Pixel Data holds {len(ds.PixelData)} bytes, {nf} frames need {(bits + 7) // 8}",
                code="seg_malformed",
            )


def read_segments(seg: Dataset | str | os.PathLike[str], *, reader: Reader = "auto") -> SegObject:
    """Parse a SEG dataset or file.  ``reader="fallback"`` forces the functional-group parser."""
    if isinstance(seg, (str, os.PathLike)):
        try:
            seg = pydicom.dcmread(Path(seg))
        except Exception as exc:
            raise SegmentationError(f"cannot read SEG file {Path(seg).name}: {exc}", code="seg_unreadable") from exc
    try:
        return SegObject(seg, reader=reader)
    except LocusError:
        raise
    except Exception as exc:
        # pydicom decodes values lazily and raises many types on a broken element (a US
        # of odd length, a multi-valued Segment Number, an unknown VR...): a property of
        # the received object, reported with a code (found by tests/fuzz).
        raise SegmentationError(f"SEG attributes cannot be decoded: {type(exc).__name__}: {exc}",
                                code="seg_malformed") from exc


def _hd_affine(affine: np.ndarray) -> np.ndarray:
    """highdicom's affine maps (slice, row, column) indices; ours maps (i=column, j=row, k=slice)."""
    return np.asarray(affine, dtype=np.float64)[:, [2, 1, 0, 3]]


def _starts(box: tuple[slice, ...]) -> tuple[int, int, int]:
    return (int(box[0].start), int(box[1].start), int(box[2].start))


def _add(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[int, int, int]:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _empty(number: int, affine: np.ndarray, grid_shape: tuple[int, ...]) -> SourceRegion:
    return SourceRegion(number, None, np.zeros((0, 0, 0), bool), (0, 0, 0), affine, _shape3(grid_shape))


def _crop(number: int, component: int | None, mask: np.ndarray, affine: np.ndarray) -> SourceRegion:
    mask = np.asarray(mask, dtype=bool)
    boxes = ndimage.find_objects(mask.astype(np.uint8)) if mask.size else []
    if not boxes or boxes[0] is None:
        return _empty(number, affine, mask.shape)
    box = boxes[0]
    return SourceRegion(number, component, mask[box].copy(), _starts(box), affine, _shape3(mask.shape))


# ---------------------------------------------------------------------------------------
# Fallback: Per-Frame / Shared Functional Groups parser (dicom-guide section 4)
# ---------------------------------------------------------------------------------------
def _fg(per_frame: Dataset | None, shared: Dataset | None, seq: str, attr: str) -> Any:  # element value, any VR
    for group in (per_frame, shared):
        if group is None:
            continue
        item = _first(group, seq)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _frame_table(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Image Position (Patient) and Referenced Segment Number of every frame (no pixels)."""
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per = ds.PerFrameFunctionalGroupsSequence
    pos = np.array([[float(v) for v in p.PlanePositionSequence[0].ImagePositionPatient] for p in per])
    nums = np.array([int(_fg(p, shared, "SegmentIdentificationSequence",
                                 "ReferencedSegmentNumber")) for p in per])
    return pos, nums


@dataclass
class _FallbackFrames:
    """Frames of a SEG read straight from the functional groups (no highdicom)."""

    ds: Dataset
    segmentation_type: str
    frames: np.ndarray = field(init=False)
    positions: np.ndarray = field(init=False)
    segment_of_frame: np.ndarray = field(init=False)
    row_cos: np.ndarray = field(init=False)
    col_cos: np.ndarray = field(init=False)
    spacing: tuple[float, float] = field(init=False)  # (row spacing, column spacing)
    thickness: float = field(init=False)

    def __post_init__(self) -> None:
        ds = self.ds
        uid = ds.SOPInstanceUID
        nf = int(ds.get("NumberOfFrames", 1) or 1)
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        per = list(ds.get("PerFrameFunctionalGroupsSequence", []))
        if per and len(per) != nf:
            raise SegmentationError(f"SEG {uid}: {len(per)} per-frame items for {nf} frames", code="seg_malformed")
        per_items: list[Dataset | None] = per if per else [None] * nf
        orient = {tuple(np.round(np.asarray(_fg(p, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
                                            or ds.get("ImageOrientationPatient") or [np.nan] * 6, float), 5))
                  for p in per_items}
        if len(orient) != 1 or any(math.isnan(v) for v in next(iter(orient))):
            raise SegmentationError(f"SEG {uid}: missing or varying Image Orientation (Patient)", code="seg_geometry")
        iop = np.asarray(next(iter(orient)))
        self.row_cos, self.col_cos = iop[:3], iop[3:]
        ps = _fg(per_items[0], shared, "PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing")
        if ps is None:
            raise SegmentationError(f"SEG {uid}: no Pixel Spacing", code="seg_geometry")
        self.spacing = (float(ps[0]), float(ps[1]))
        st = (_fg(per_items[0], shared, "PixelMeasuresSequence", "SpacingBetweenSlices")
              or _fg(per_items[0], shared, "PixelMeasuresSequence", "SliceThickness") or ds.get("SliceThickness"))
        self.thickness = float(st) if st else 1.0
        pos = []
        seg_nums = []
        for f, p in enumerate(per_items):
            ipp = _fg(p, shared if nf == 1 else None, "PlanePositionSequence", "ImagePositionPatient")
            if ipp is None and nf == 1:
                ipp = ds.get("ImagePositionPatient")
            if ipp is None:
                raise SegmentationError(f"SEG {uid}: frame {f + 1} has no Image Position (Patient)",
                                        code="seg_geometry")
            pos.append([float(v) for v in ipp])
            if self.segmentation_type != "LABELMAP":
                ref = _fg(p, shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
                if ref is None:
                    raise SegmentationError(f"SEG {uid}: frame {f + 1} has no Referenced Segment Number",
                                            code="seg_malformed")
                seg_nums.append(int(ref))
        self.positions = np.asarray(pos)
        self.segment_of_frame = np.asarray(seg_nums, dtype=np.int64)
        self.frames = self._decode(nf)

    def _decode(self, nf: int) -> np.ndarray:
        ds = self.ds
        rows, cols = int(ds.Rows), int(ds.Columns)
        native = not ds.file_meta.TransferSyntaxUID.is_compressed
        if self.segmentation_type == "BINARY" and int(ds.BitsAllocated) == 1 and native:
            # Frames are bit-packed back to back and may straddle bytes (PS3.5 8.1.1, 8.2):
            # unpack the whole stream, least significant bit first, then cut per frame.
            bits = np.unpackbits(np.frombuffer(ds.PixelData, dtype=np.uint8), bitorder="little")
            need = nf * rows * cols
            if bits.size < need:
                raise SegmentationError(f"SEG {ds.SOPInstanceUID}: pixel data too short", code="seg_malformed")
            return bits[:need].reshape(nf, rows, cols).astype(bool)
        arr = np.asarray(ds.pixel_array).reshape(nf, rows, cols)
        if self.segmentation_type == "FRACTIONAL":
            maxv = float(ds.get("MaximumFractionalValue", 255) or 255)
            return arr.astype(np.float32) / maxv >= FRACTIONAL_THRESHOLD
        if self.segmentation_type == "BINARY":
            return arr > 0
        return arr  # LABELMAP: segment numbers

    def segment_grid(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """Stack the frames of one segment on a regular grid: ``([k, j, i] bool, affine)``."""
        uid = self.ds.SOPInstanceUID
        if self.segmentation_type == "LABELMAP":
            idx = np.arange(self.frames.shape[0])
        else:
            idx = np.flatnonzero(self.segment_of_frame == number)
        if idx.size == 0:
            return np.zeros((0, 0, 0), bool), np.eye(4)
        normal = np.cross(self.row_cos, self.col_cos)
        pos = self.positions[idx]
        d = pos @ normal
        order = np.argsort(d, kind="stable")
        idx, pos, d = idx[order], pos[order], d[order]
        uniq, inverse = _cluster(d)
        if uniq.size == 1:
            step = normal * self.thickness
            kpos = np.zeros(idx.size, dtype=int)
        else:
            gaps = np.diff(uniq)
            base = gaps.min()
            mult = gaps / base
            if np.any(np.abs(mult - np.round(mult)) > 0.01 * np.maximum(1, mult)):
                raise SegmentationError(
                    f"SEG {uid} segment {number}: frame positions are not on a regular grid "
                    f"(gaps {np.round(gaps, 3).tolist()} mm)", code="seg_geometry_irregular")
            kuniq = np.concatenate([[0], np.cumsum(np.round(mult).astype(int))])
            kpos = kuniq[inverse]
            first = pos[inverse == 0].mean(axis=0)
            last = pos[inverse == uniq.size - 1].mean(axis=0)
            step = (last - first) / kuniq[-1]  # may be oblique for a tilted stack
        origin = pos[inverse == 0].mean(axis=0)
        expected = origin + np.outer(kpos, step)
        if np.abs(pos - expected).max() > 1e-2 * max(min(self.spacing), 1e-3) + 1e-3:
            raise SegmentationError(
                f"SEG {uid} segment {number}: frames are not stacked on one straight line of planes",
                code="seg_geometry_irregular")
        nk = int(kpos.max()) + 1
        rows, cols = self.frames.shape[1:]
        out = np.zeros((nk, rows, cols), dtype=bool)
        for f, k in zip(idx, kpos):
            fr = self.frames[f]
            out[k] |= (fr == number) if self.segmentation_type == "LABELMAP" else fr.astype(bool)
        aff = np.eye(4)
        aff[:3, 0] = self.row_cos * self.spacing[1]
        aff[:3, 1] = self.col_cos * self.spacing[0]
        aff[:3, 2] = step
        aff[:3, 3] = origin
        return out, aff


def _cluster(d: np.ndarray, tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Group sorted plane distances closer than ``tol`` mm (several frames on one plane)."""
    groups = np.concatenate([[0], np.cumsum(np.diff(d) > tol)])
    uniq = np.array([d[groups == g].mean() for g in range(groups[-1] + 1)])
    return uniq, groups


# ---------------------------------------------------------------------------------------
# Mapping onto a target grid
# ---------------------------------------------------------------------------------------
def check_frame_of_reference(seg: SegObject, target: Volume) -> None:
    """Refuse a SEG that is not in the target images' Frame of Reference (PS3.3 C.7.4.1).

    Positions in different Frames of Reference are unrelated even when they coincide
    numerically, so the comparison is on the UIDs, before any geometry.
    """
    if not seg.frame_of_reference_uid:
        raise SegmentationError(
            f"SEG {seg.sop_instance_uid} has no Frame of Reference UID; it cannot be placed on "
            f"{target.modality or 'the'} images (Frame of Reference {target.frame_of_reference_uid})",
            code="frame_of_reference_mismatch",
        )
    if seg.frame_of_reference_uid != target.frame_of_reference_uid:
        raise SegmentationError(
            f"SEG {seg.sop_instance_uid} is in Frame of Reference {seg.frame_of_reference_uid} but the "
            f"{target.modality or 'target'} series {target.series_instance_uid} is in Frame of Reference "
            f"{target.frame_of_reference_uid or '(none)'}; refusing to map it by position",
            code="frame_of_reference_mismatch",
        )


def segment_masks_on(seg: SegObject, target: Volume, segment_numbers: list[int] | tuple[int, ...] | None = None,
                     mode: Mode = "segments") -> list[RegionMask]:
    """Place segments (or their 26-connected components) on ``target``'s grid by geometry."""
    check_frame_of_reference(seg, target)
    return [map_region(r, target) for r in seg.source_regions(segment_numbers, mode)]


def map_region(region: SourceRegion, target: Volume) -> RegionMask:
    """Map one SEG-grid mask onto ``target`` (exact copy when aligned, else sub-voxel coverage)."""
    shape = _shape3(target.array.shape)
    n_src = region.voxel_count
    if n_src == 0:
        return RegionMask(region.segment_number, region.component, np.zeros((0, 0, 0), bool), (0, 0, 0),
                          shape, "index_aligned", 0, 0)
    # affine of the cropped source box: index (i, j, k) of the crop -> LPS
    src_aff = region.affine.copy()
    src_aff[:3, 3] = region.affine[:3, :3] @ np.asarray(region.offset[::-1], float) + region.affine[:3, 3]
    m = np.linalg.inv(target.affine) @ src_aff  # crop index -> target index
    outside = _count_outside(region, m, shape)
    aligned = _aligned(m, region.grid_shape, region.mask.shape)
    if aligned is not None:
        mask, offset = _paste_aligned(region.mask, aligned, shape)
        method = "index_aligned"
    else:
        mask, offset = _coverage(region.mask, m, target, src_aff)
        method = "subvoxel_coverage"
    return RegionMask(region.segment_number, region.component, mask, offset, shape, method,
                      n_src, outside)


def _count_outside(region: SourceRegion, m: np.ndarray, shape: tuple[int, ...]) -> int:
    kji = np.argwhere(region.mask)
    t = kji[:, ::-1] @ m[:3, :3].T + m[:3, 3]  # target (i, j, k)
    lim = np.asarray(shape[::-1], float) - 0.5
    inside = np.all((t >= -0.5) & (t < lim), axis=1)
    return int(kji.shape[0] - np.count_nonzero(inside))


def _aligned(m: np.ndarray, grid_shape_kji: tuple[int, ...], crop_shape_kji: tuple[int, ...]
             ) -> tuple[list[int], list[int], np.ndarray] | None:
    """If crop index -> target index is a signed axis permutation plus an integer shift, return it.

    Returns ``(perm, sign, shift)`` with target axis ``a`` (i, j, k order) = ``sign[a] *
    source axis perm[a] + shift[a]``.  Axes of length 1 in the source only need to land on
    a plane (their step length does not matter: a single frame has no slice spacing).
    """
    n_ijk = grid_shape_kji[::-1]
    r = m[:3, :3]
    perm = [-1, -1, -1]
    sign = [1, 1, 1]
    used: set[int] = set()
    for b in range(3):
        if n_ijk[b] == 1:
            continue
        col = r[:, b]
        a = int(np.argmax(np.abs(col)))
        if abs(abs(col[a]) - 1) > _MATRIX_TOL or np.abs(np.delete(col, a)).max() > _MATRIX_TOL or a in used:
            return None
        perm[a], sign[a] = b, int(np.sign(col[a]))
        used.add(a)
    for b in range(3):
        if n_ijk[b] == 1:
            col = r[:, b]
            free = [a for a in range(3) if a not in used]
            a = max(free, key=lambda x: abs(col[x]))
            if abs(col[a]) < 1e-6 or np.abs(np.delete(col, a)).max() > _MATRIX_TOL * abs(col[a]):
                return None
            perm[a], sign[a] = b, 1
            used.add(a)
    shift = m[:3, 3]
    # every corner of the crop (not only its origin) must land on a target voxel centre, so
    # a small spacing mismatch accumulating over a long axis is caught
    ext = [float(n - 1) for n in crop_shape_kji[::-1]]
    corners = np.array([[x, y, z] for x in (0.0, ext[0]) for y in (0.0, ext[1]) for z in (0.0, ext[2])])
    t = corners @ r.T + shift
    if np.abs(t - np.round(t)).max() > _ALIGN_TOL_VOXEL:
        return None
    return perm, sign, np.round(shift).astype(int)


def _paste_aligned(mask: np.ndarray, aligned: tuple[list[int], list[int], np.ndarray],
                   shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, int, int]]:
    perm, sign, shift = aligned
    src_ijk = mask.transpose(2, 1, 0)  # [i, j, k]
    arr = np.transpose(src_ijk, perm)  # target axis a <- source axis perm[a]
    for a in range(3):
        if sign[a] < 0:
            arr = np.flip(arr, axis=a)
    start = [int(shift[a]) if sign[a] > 0 else int(shift[a]) - arr.shape[a] + 1 for a in range(3)]
    arr_kji = arr.transpose(2, 1, 0)
    start_kji = start[::-1]
    lo = [max(0, s) for s in start_kji]
    hi = [min(n, s + m) for s, m, n in zip(start_kji, arr_kji.shape, shape)]
    if any(h <= lo_i for lo_i, h in zip(lo, hi)):
        return np.zeros((0, 0, 0), bool), (0, 0, 0)
    sub = arr_kji[tuple(slice(lo_i - s, h - s) for lo_i, h, s in zip(lo, hi, start_kji))]
    return _tight(np.ascontiguousarray(sub), _shape3(tuple(lo)))


def _tight(mask: np.ndarray, offset: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    boxes = ndimage.find_objects(mask.astype(np.uint8)) if mask.size else []
    if not boxes or boxes[0] is None:
        return np.zeros((0, 0, 0), bool), (0, 0, 0)
    box = boxes[0]
    return mask[box].copy(), _add(_shape3(offset), _starts(box))


def _coverage(mask: np.ndarray, m: np.ndarray, target: Volume, src_aff: np.ndarray
              ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Fraction of each target voxel covered by the source mask (box model), >= 0.5."""
    shape_kji = target.array.shape
    n_kji = np.asarray(mask.shape)
    # target index box enclosing the source crop (voxel edges), one voxel margin
    corners = np.array([[x, y, z] for x in (-0.5, n_kji[2] - 0.5) for y in (-0.5, n_kji[1] - 0.5)
                        for z in (-0.5, n_kji[0] - 0.5)])
    t = corners @ m[:3, :3].T + m[:3, 3]
    lo_ijk = np.maximum(np.floor(t.min(axis=0) + 0.5).astype(int) - 1, 0)
    hi_ijk = np.minimum(np.ceil(t.max(axis=0) - 0.5).astype(int) + 2, np.asarray(shape_kji[::-1]))
    if np.any(hi_ijk <= lo_ijk):
        return np.zeros((0, 0, 0), bool), (0, 0, 0)
    # sub-samples per target axis: sub-sample pitch <= the finest source spacing
    tgt_sp = np.asarray(target.spacing)
    src_min = min(float(np.linalg.norm(src_aff[:3, a])) for a in range(3))
    nsub = np.clip(np.ceil(tgt_sp / max(src_min, 1e-6) - 1e-6).astype(int), 1, MAX_SUBSAMPLES_PER_AXIS)
    offs = [((np.arange(n) + 0.5) / n) - 0.5 for n in nsub]
    sub = np.stack(np.meshgrid(*offs, indexing="ij"), axis=-1).reshape(-1, 3)  # (S, 3) in i, j, k
    inv = np.linalg.inv(m)  # target index -> crop index
    ni, nj, nk = (hi_ijk - lo_ijk)
    out = np.zeros((nk, nj, ni), dtype=bool)
    ii, jj = np.meshgrid(np.arange(lo_ijk[0], hi_ijk[0]), np.arange(lo_ijk[1], hi_ijk[1]), indexing="xy")
    plane = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(float)  # (P, 2) rows j, cols i order
    per_batch = max(1, _MAX_POINTS_PER_BATCH // sub.shape[0])
    flat = out.reshape(nk, -1)
    for kk in range(nk):
        for p0 in range(0, plane.shape[0], per_batch):
            cen = plane[p0:p0 + per_batch]
            centres = np.column_stack([cen, np.full(cen.shape[0], lo_ijk[2] + kk, float)])  # (P, 3)
            pts = (centres[:, None, :] + sub[None, :, :]).reshape(-1, 3)
            src = pts @ inv[:3, :3].T + inv[:3, 3]  # crop (i, j, k), continuous
            idx = np.floor(src + 0.5).astype(np.int64)  # the source voxel containing the point
            ok = np.all((idx >= 0) & (idx < n_kji[::-1]), axis=1)
            vals = np.zeros(idx.shape[0], dtype=bool)
            vals[ok] = mask[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
            frac = vals.reshape(cen.shape[0], sub.shape[0]).mean(axis=1)
            flat[kk, p0:p0 + cen.shape[0]] = frac >= COVERAGE_THRESHOLD
    return _tight(out, (int(lo_ijk[2]), int(lo_ijk[1]), int(lo_ijk[0])))
