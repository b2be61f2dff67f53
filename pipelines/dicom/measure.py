"""Per-lesion PET/CT measurements from SEG segments: SUV statistics, volume, TLG, CT HU, extent.

Definitions (all on the native PET grid; the SEG mask is first placed on that grid by
:func:`pipelines.dicom.seg.map_region`):

* **SUVmax / SUVmean**: maximum and mean of the PET voxel values (SUV, or Bq/mL on the
  fallback) over the lesion's PET voxels.
* **SUVpeak** (PERCIST 1.0, Wahl et al. J Nucl Med 2009; QIBA FDG-PET/CT profile): the
  maximum, over the centres of the lesion's PET voxels, of the mean SUV in a sphere of
  1 mL (radius ``(3000 / 4 pi)^(1/3)`` = 6.2035 mm) centred there.  The sphere is a
  fixed kernel built in millimetres from the PET affine: each voxel is weighted by the
  fraction of its volume inside the sphere (voxels straddling the surface are split into
  8x8x8 sub-samples), so the kernel's volume is 1 mL whatever the voxel size.  Voxels
  inside the sphere count whether or not they belong to the lesion; kernel voxels
  outside the image are dropped and the weights renormalised (flagged
  ``suv_peak_sphere_truncated``).
* **Volume** (mL) = PET voxel count x |det(affine)| / 1000: the volume of the sender's SEG
  segment on the PET grid.  No SUV threshold is applied, so it is a metabolic tumour volume
  only as far as the segmentation is one; a threshold-based MTV (SUV >= 2.5, or >= 41 % of
  SUVmax) is not computed.
* **TLG** = SUVmean x volume.
* **CT mean HU**: mean CT value over the lesion placed on the CT grid.
* **Bounding box and centroid** are computed on the grid the mask was drawn on (the SEG's
  own grid), the most faithful description of the annotation: centroid = affine x mean
  voxel index; box = min/max in LPS mm of the 8 corners of the index box padded by half a
  voxel (voxel-edge convention), so its size is the extent of the voxels, not of their
  centres.

Cost is linear in the number of lesions and in their size: every lesion is handled on its
own bounding box (masks are kept cropped, see :class:`pipelines.dicom.seg.RegionMask`),
SUVpeak is evaluated only at the lesion's voxels (lesion voxels x kernel voxels), and no
per-lesion pass over the whole volume is made.  Overlapping segments are measured
independently because each has its own mask.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import generate_uid

from pipelines.dicom.seg import Mode, RegionMask, SegObject, SourceRegion, check_frame_of_reference, map_region
from pipelines.dicom.volume import Volume
from pipelines.errors import SegmentationError
from pipelines.findings import BoundingBox, Flag, Lesion, LesionMeasurements

log = logging.getLogger(__name__)

SUVPEAK_VOLUME_ML = 1.0
SUVPEAK_RADIUS_MM = (3.0 * SUVPEAK_VOLUME_ML * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # 6.2035 mm
_KERNEL_SUBSAMPLES = 8


# ---------------------------------------------------------------------------------------
# SUVpeak kernel
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SphereKernel:
    """A sphere as voxel offsets ``(dk, dj, di)`` with partial-volume weights summing to 1."""

    offsets_kji: np.ndarray
    weights: np.ndarray
    volume_ml: float  # sum of covered voxel fractions x voxel volume


def sphere_kernel(affine: np.ndarray, radius_mm: float = SUVPEAK_RADIUS_MM,
                  subsamples: int = _KERNEL_SUBSAMPLES) -> SphereKernel:
    """Sphere of ``radius_mm`` on the grid of ``affine`` (4x4 or 3x3; any orientation or shear)."""
    a3 = np.asarray(affine, dtype=np.float64)[:3, :3]
    key = tuple(np.round(a3, 6).ravel().tolist())
    return _sphere_kernel_cached(key, round(float(radius_mm), 6), int(subsamples))


@functools.lru_cache(maxsize=32)
def _sphere_kernel_cached(key: tuple[float, ...], radius: float, subsamples: int) -> SphereKernel:
    a3 = np.asarray(key, dtype=np.float64).reshape(3, 3)
    inv = np.linalg.inv(a3)
    reach = np.ceil(radius * np.linalg.norm(inv, axis=1) + 0.5).astype(int)  # index half-extent per (i, j, k)
    grids = np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij")
    ijk = np.stack([g.ravel() for g in grids], axis=1).astype(np.float64)  # candidate voxel offsets
    centre_mm = np.linalg.norm(ijk @ a3.T, axis=1)
    half_diag = 0.5 * max(np.linalg.norm(a3 @ np.array(s)) for s in
                          [(1, 1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1)])
    frac = np.where(centre_mm <= radius - half_diag, 1.0, 0.0)
    edge = np.flatnonzero((centre_mm > radius - half_diag) & (centre_mm < radius + half_diag))
    if edge.size:
        s = (np.arange(subsamples) + 0.5) / subsamples - 0.5
        sub = np.stack(np.meshgrid(s, s, s, indexing="ij"), axis=-1).reshape(-1, 3)
        pts = (ijk[edge][:, None, :] + sub[None, :, :]) @ a3.T  # (E, S, 3) mm
        frac[edge] = (np.linalg.norm(pts, axis=2) <= radius).mean(axis=1)
    keep = frac > 0
    w = frac[keep]
    voxel_ml = abs(float(np.linalg.det(a3))) / 1000.0
    return SphereKernel(
        offsets_kji=ijk[keep][:, ::-1].astype(np.int64),
        weights=w / w.sum(),
        volume_ml=float(w.sum() * voxel_ml),
    )


def suv_peak_at(values: np.ndarray, voxels_kji: np.ndarray, kernel: SphereKernel) -> tuple[float, float, int]:
    """Max over ``voxels_kji`` of the kernel-weighted mean of ``values`` centred there.

    Returns ``(peak, covered_weight, argmax)``: ``covered_weight`` is the share of the
    kernel that lay inside the image at the peak position (1.0 unless truncated).
    """
    shape = np.asarray(values.shape)
    flat = values.ravel()
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    base = voxels_kji.astype(np.int64)
    lin0 = base @ strides
    acc = np.zeros(base.shape[0], dtype=np.float64)
    wsum = np.zeros(base.shape[0], dtype=np.float64)
    lo = base.min(axis=0)
    hi = base.max(axis=0)
    for off, w in zip(kernel.offsets_kji, kernel.weights):
        lin = lin0 + int(off @ strides)
        if np.all(lo + off >= 0) and np.all(hi + off < shape):  # whole lesion shifted stays inside
            acc += w * flat[lin]
            wsum += w
            continue
        pos = base + off
        ok = np.all((pos >= 0) & (pos < shape), axis=1)
        acc[ok] += w * flat[lin[ok]]
        wsum[ok] += w
    means = acc / wsum
    best = int(np.argmax(means))
    return float(means[best]), float(wsum[best]), best


# ---------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------
def bounding_box_mm(affine: np.ndarray, index_min_ijk: np.ndarray, index_max_ijk: np.ndarray) -> BoundingBox:
    """Axis-aligned LPS box of the voxels from ``index_min`` to ``index_max`` (voxel edges)."""
    lo = np.asarray(index_min_ijk, float) - 0.5
    hi = np.asarray(index_max_ijk, float) + 0.5
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    mm = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    a, b = mm.min(axis=0), mm.max(axis=0)
    c, size = (a + b) / 2, b - a
    return BoundingBox(center_mm=(float(c[0]), float(c[1]), float(c[2])),
                       size_mm=(float(size[0]), float(size[1]), float(size[2])))


def centroid_mm(affine: np.ndarray, indices_ijk: np.ndarray) -> tuple[float, float, float]:
    """Affine x mean voxel index (the centre of mass of a uniform-density mask)."""
    mean = np.asarray(indices_ijk, float).mean(axis=0)
    p = np.asarray(affine)[:3, :3] @ mean + np.asarray(affine)[:3, 3]
    return (float(p[0]), float(p[1]), float(p[2]))


# ---------------------------------------------------------------------------------------
# Per-region statistics
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PetStats:
    """PET statistics of one lesion region (TID 1500 measurements)."""
    voxel_count: int
    volume_ml: float
    suv_max: float | None
    suv_mean: float | None
    suv_peak: float | None
    tlg: float | None
    suv_peak_kernel_coverage: float | None
    suv_peak_centre_mm: tuple[float, float, float] | None


def pet_statistics(pet: Volume, region: RegionMask, kernel: SphereKernel | None = None) -> PetStats:
    """SUVmax, SUVmean, SUVpeak, volume and TLG of one region placed on the PET grid."""
    n = region.voxel_count
    volume_ml = n * pet.voxel_volume_mm3 / 1000.0
    if n == 0:
        return PetStats(0, 0.0, None, None, None, None, None, None)
    vals = np.asarray(pet.array[region.slices][region.mask], dtype=np.float64)
    suv_mean = float(vals.mean())
    kernel = kernel or sphere_kernel(pet.affine)
    vox = region.voxel_indices_kji()
    peak, cover, best = suv_peak_at(pet.array, vox, kernel)
    centre = pet.index_to_lps(vox[best][::-1])[0]
    return PetStats(
        voxel_count=n,
        volume_ml=float(volume_ml),
        suv_max=float(vals.max()),
        suv_mean=suv_mean,
        suv_peak=peak,
        tlg=float(suv_mean * volume_ml),
        suv_peak_kernel_coverage=cover,
        suv_peak_centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
    )


def ct_statistics(ct: Volume, region: RegionMask) -> tuple[float | None, int]:
    """Mean CT value (HU) and voxel count of one region placed on the CT grid."""
    n = region.voxel_count
    if n == 0:
        return None, 0
    return float(np.asarray(ct.array[region.slices][region.mask], dtype=np.float64).mean()), n


# ---------------------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------------------
@dataclass
class LesionSet:
    """Lesions of one SEG, plus flags about the SEG as a whole."""

    lesions: list[Lesion] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)


def lesion_id(segment_number: int, component: int | None) -> str:
    """The lesion's stable id in reports: segment number, plus component when split."""
    return f"S{segment_number}" if component is None else f"S{segment_number}C{component}"


def _tracking(seg: SegObject, region: SourceRegion, lid: str) -> tuple[str, str]:
    """Tracking Identifier / UID (TID 1500 row 10-11): the SEG's when given, else derived.

    Derived UIDs are deterministic (hash of the SEG SOP Instance UID, segment and
    component), so re-analysing the same SEG yields the same tracking UIDs.
    """
    info = seg.segment(region.segment_number)
    base_id = info.tracking_id or (f"{lid} {info.label}".strip() if info.label else lid)
    if region.component is None:
        uid = info.tracking_uid or generate_uid(
            entropy_srcs=[seg.sop_instance_uid, f"segment {region.segment_number}"])
        return base_id[:64], uid
    tid = f"{info.tracking_id} C{region.component}" if info.tracking_id else base_id
    uid = generate_uid(entropy_srcs=[seg.sop_instance_uid, f"segment {region.segment_number}",
                                     f"component {region.component}"])
    return tid[:64], uid


def measure_lesions(seg: SegObject, pet: Volume, *, ct: Volume | None = None, mode: Mode = "segments",
                    segment_numbers: Sequence[int] | None = None) -> LesionSet:
    """Measure every segment (or 26-connected component) of ``seg`` on ``pet`` (and ``ct``).

    ``pet.array`` holds SUV (or Bq/mL on the SUV fallback).  The SEG must be in the PET's
    Frame of Reference (else :class:`SegmentationError` ``frame_of_reference_mismatch``).
    A CT in another Frame of Reference is not used for HU (set flag
    ``ct_frame_of_reference_mismatch``) rather than failing the whole study.
    """
    check_frame_of_reference(seg, pet)
    out = LesionSet(flags=list(seg.flags))
    use_ct = ct
    if ct is not None:
        try:
            check_frame_of_reference(seg, ct)
        except SegmentationError as exc:
            out.flags.append(Flag("ct_frame_of_reference_mismatch", f"CT HU not measured: {exc.reason}"))
            use_ct = None
    kernel = sphere_kernel(pet.affine)
    regions = seg.source_regions(None if segment_numbers is None else list(segment_numbers), mode)
    measured_segments = {r.segment_number for r in regions if r.voxel_count}
    for n in (segment_numbers or seg.segment_numbers):
        if n not in measured_segments:
            out.flags.append(Flag("segment_empty", f"segment {n} of SEG {seg.sop_instance_uid} has no voxels"))
    for region in regions:
        if region.voxel_count == 0:
            continue
        out.lesions.append(_lesion(seg, region, pet, use_ct, kernel))
    log.info("SEG %s: %d lesions measured on PET series %s (mode %s)", seg.sop_instance_uid,
             len(out.lesions), pet.series_instance_uid, mode)
    return out


def _lesion(seg: SegObject, region: SourceRegion, pet: Volume, ct: Volume | None, kernel: SphereKernel) -> Lesion:
    info = seg.segment(region.segment_number)
    lid = lesion_id(region.segment_number, region.component)
    flags = list(info.flags)
    on_pet = map_region(region, pet)
    stats = pet_statistics(pet, on_pet, kernel)
    if on_pet.method != "index_aligned":
        flags.append(Flag("seg_resampled_to_pet",
                          "mask drawn on another grid; PET voxels at least 50% covered by the mask were used "
                          "(sub-voxel box-model coverage)"))
    if on_pet.source_voxels_outside_target:
        flags.append(Flag("seg_outside_pet", f"{on_pet.source_voxels_outside_target} of "
                          f"{on_pet.source_voxel_count} SEG voxels lie outside the PET field of view"))
    if stats.voxel_count == 0:
        flags.append(Flag("lesion_below_pet_resolution",
                          "no PET voxel is at least half covered by the lesion; SUV not measured"))
    elif stats.suv_peak_kernel_coverage is not None and stats.suv_peak_kernel_coverage < 0.999:
        flags.append(Flag("suv_peak_sphere_truncated",
                          f"the SUVpeak sphere extends outside the PET image "
                          f"({100 * (1 - stats.suv_peak_kernel_coverage):.1f}% of its weight)"))
    ct_hu: float | None = None
    ct_n: int | None = None
    if ct is not None:
        on_ct = map_region(region, ct)
        ct_hu, ct_n = ct_statistics(ct, on_ct)
        if ct_n == 0:
            flags.append(Flag("lesion_outside_ct", "the lesion covers no CT voxel; CT HU not measured"))
    idx = region.voxel_indices_ijk()
    bbox = bounding_box_mm(region.affine, idx.min(axis=0), idx.max(axis=0))
    tracking_id, tracking_uid = _tracking(seg, region, lid)
    return Lesion(
        lesion_id=lid,
        seg_sop_instance_uid=seg.sop_instance_uid,
        segment_number=region.segment_number,
        component=region.component,
        segment_label=info.label,
        property_category=info.property_category,
        property_type=info.property_type,
        tracking_id=tracking_id,
        tracking_uid=tracking_uid,
        measurements=LesionMeasurements(
            voxel_count=stats.voxel_count,
            volume_ml=stats.volume_ml,
            suv_max=stats.suv_max,
            suv_mean=stats.suv_mean,
            suv_peak=stats.suv_peak,
            tlg=stats.tlg,
            ct_mean_hu=ct_hu,
            ct_voxel_count=ct_n,
        ),
        bbox=bbox,
        centroid_mm=centroid_mm(region.affine, idx),
        frame_of_reference_uid=seg.frame_of_reference_uid,
        flags=tuple(flags),
    )
