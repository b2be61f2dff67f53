"""A study's volumes and lesion label map rebuilt from its DICOM instances, for a training dataset.

The stages are the analysis's own (:mod:`pipelines.analysis`): inventory -> volumes -> SUV ->
SEG segments, with the same functions and defaults, so the exported CT, SUV and lesion masks
are exactly what the analysis measured.  The label map is drawn on the PET grid (the grid of
the SUV channel and of the measurements): each lesion is its SEG segment (or 26-connected
component) placed on that grid with :func:`pipelines.dicom.seg.map_region`, the mapping the
measurement used, so a lesion's voxel count in the mask equals its measured voxel count.

A voxel can hold one label only (HCL-AL's multi-label mask; Gao et al. 2025): where SEG
segments overlap, the lesion listed first keeps the voxel and the overlap is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import Dataset

from pipelines.datasets.hclal_layout import label_dtype
from pipelines.dicom.inventory import take_inventory
from pipelines.dicom.seg import Mode, SegObject, SourceRegion, check_frame_of_reference, map_region, read_segments
from pipelines.dicom.series import build_volume_report
from pipelines.dicom.suv import suv_or_fallback
from pipelines.dicom.volume import Volume
from pipelines.errors import InputError
from pipelines.findings import Flag, SuvInfo, SuvKind


@dataclass
class RebuiltStudy:
    """CT (HU), PET as SUV, the SEG objects, and what the rebuild noticed."""

    study_instance_uid: str
    ct: Volume | None
    suv: Volume
    suv_info: SuvInfo
    segs: dict[str, SegObject]  # by SOP Instance UID
    flags: list[Flag] = field(default_factory=list)


def rebuild_study(items: Sequence[str | Path | Dataset], *, tilt: Literal["refuse", "resample"] = "resample",
                  require: SuvKind | None = SuvKind.SUV_BW) -> RebuiltStudy:
    """Rebuild the analysis inputs of one study (raises :class:`InputError` with a code).

    ``require``: the SUV kind the PET must convert to (HCL-AL's SUV channel is SUVbw,
    HCL-AL, Gao et al. 2025); a study that only yields Bq/mL is refused (``suv_unavailable``)
    rather than written as if it were SUV.  ``None`` accepts the analysis's fallback.
    """
    inv = take_inventory(items)
    flags = list(inv.flags)
    if not inv.segs:
        raise InputError("the study holds no SEG object: no lesion masks", code="no_seg")
    pet_build = build_volume_report(inv.pet_headers, tilt=tilt)
    flags.extend(pet_build.flags)
    ct: Volume | None = None
    if inv.ct is not None:
        ct_build = build_volume_report(inv.ct_headers or [], tilt=tilt)
        flags.extend(ct_build.flags)
        ct = ct_build.volume
    conversion = suv_or_fallback(inv.pet_headers)
    if require is not None and conversion.info.kind != require:
        reasons = "; ".join(f.message for f in conversion.info.flags) or conversion.info.kind.value
        raise InputError(f"PET cannot be expressed as {require.value} ({reasons})", code="suv_unavailable")
    suv = conversion.apply(pet_build.volume)
    segs = {}
    for header in inv.seg_headers:
        seg = read_segments(_with_pixels(header))
        segs[seg.sop_instance_uid] = seg
    return RebuiltStudy(inv.study_instance_uid, ct, suv, conversion.info, segs, flags)


def _with_pixels(ds: Dataset) -> Dataset | str:
    """SEG headers are read without pixel data; the file is re-read for the frames."""
    if "PixelData" in ds or "FloatPixelData" in ds:
        return ds
    filename = getattr(ds, "filename", None)
    if not filename:
        raise InputError(f"SEG {ds.get('SOPInstanceUID', '?')} has no pixel data and no file", code="seg_unreadable")
    return str(filename)


@dataclass(frozen=True)
class LesionKey:
    """Which SEG region a lesion is (the analysis's lesion identity) and the label it gets."""

    lesion_id: str
    seg_sop_uid: str
    segment_number: int
    component: int | None
    label: int


@dataclass
class LabelMap:
    """The lesion label map on the target grid, with per-lesion voxel counts."""

    labels: Volume
    voxels: dict[str, int]  # lesion_id -> voxels carrying its label
    overlaps: dict[str, int]  # lesion_id -> voxels it lost to an earlier lesion
    missing: dict[str, str]  # lesion_id -> why it has no voxel in the map


def lesion_label_map(target: Volume, segs: dict[str, SegObject], lesions: Sequence[LesionKey]) -> LabelMap:
    """Paint each lesion's SEG region onto ``target``'s grid with its label (first come, first kept)."""
    values = [k.label for k in lesions]
    if len(set(values)) != len(values) or any(v <= 0 for v in values):
        raise ValueError(f"lesion labels must be distinct positive integers, got {values}")
    shape = target.array.shape
    out = np.zeros(shape, dtype=label_dtype(max(values, default=0)))
    voxels: dict[str, int] = {}
    overlaps: dict[str, int] = {}
    missing: dict[str, str] = {}
    regions_cache: dict[tuple[str, int, str], list[SourceRegion]] = {}
    for key in lesions:
        seg = segs.get(key.seg_sop_uid)
        if seg is None:
            missing[key.lesion_id] = f"SEG {key.seg_sop_uid} is not in the study's instances"
            continue
        check_frame_of_reference(seg, target)
        mode: Mode = "segments" if key.component is None else "components"
        cache_key = (key.seg_sop_uid, key.segment_number, mode)
        if cache_key not in regions_cache:
            regions_cache[cache_key] = seg.source_regions([key.segment_number], mode)
        region = next((r for r in regions_cache[cache_key] if r.component == key.component), None)
        if region is None or region.voxel_count == 0:
            missing[key.lesion_id] = (f"segment {key.segment_number}"
                                      f"{'' if key.component is None else f' component {key.component}'} "
                                      f"of SEG {key.seg_sop_uid} has no voxels")
            continue
        placed = map_region(region, target)
        if placed.voxel_count == 0:
            missing[key.lesion_id] = "no voxel of the target grid is at least half covered by the lesion"
            continue
        view = out[placed.slices]
        free = placed.mask & (view == 0)
        view[free] = key.label
        voxels[key.lesion_id] = int(np.count_nonzero(free))
        lost = placed.voxel_count - voxels[key.lesion_id]
        if lost:
            overlaps[key.lesion_id] = lost
        if voxels[key.lesion_id] == 0:
            del voxels[key.lesion_id]
            missing[key.lesion_id] = "every voxel of the lesion already belongs to an earlier lesion"
    labels = Volume(array=out, affine=target.affine.copy(), frame_of_reference_uid=target.frame_of_reference_uid,
                    modality="SEG")
    return LabelMap(labels, voxels, overlaps, missing)
