"""Chest-CT preprocessing for the HLIP CT-RATE model, step for step as published.

HLIP v1 (``data/ct_rate/process.py`` + ``zeroshot_ct_rate.py``, HLIP, arXiv 2505.21862):

1. HU (rescale already applied by :mod:`pipelines.dicom.series`), float32 array ``(z, y, x)``.
2. Resample to (3, 1, 1) mm (z, y, x) with ``torch.nn.functional.interpolate`` trilinear
   (``align_corners=False``) to ``int(n · spacing / target)`` voxels per axis.
3. Window [−1150, 350] HU → ``(x + 1150) / 1500`` clipped to [0, 1].
4. Zero-pad symmetrically (``p // 2`` before, the rest after) to at least 112×336×336,
   then crop 112×336×336 starting at ``(n − size) // 2`` (the centre).
5. Normalise with scalar mean 0.449 and std 0.226 (means of the ImageNet triples).
6. Model input ``[1, 1, 1, 112, 336, 336]`` (batch, scans, channel, D, H, W).

Axis order and orientation: upstream reads CT-RATE NIfTI with SimpleITK and does *not*
reorient.  Locus canonicalises every CT to the array a SimpleITK DICOM series reader gives
for a standard axial acquisition: ``array[k, j, i]`` with i → patient left (+x LPS),
j → posterior (+y), k → superior (+z), i.e. identity direction cosines.  Whether CT-RATE's
NIfTI arrays have exactly this orientation has **not been validated on a CT-RATE case**
(hlip-compat §9 step 3, §15): :data:`ORIENTATION_VALIDATED` records that, and the encoder
flags its outputs until it is.

Departure from upstream, recorded in the crop description: for whole-body CTs the crop
window in z (and in-plane) may be centred on a given point (the lungs, see :mod:`.thorax`)
instead of the volume centre; padding and sizes are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.dicom.volume import Volume
from pipelines.errors import GeometryError, InputError

#: Version of this implementation; stored with every embedding (bump when outputs can change).
PREPROCESSING_VERSION = "locus-hlip-chestct-1"
#: The canonical orientation has not been checked against a CT-RATE reference case yet.
ORIENTATION_VALIDATED = False

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ChestCtParams:
    """Published chest-CT preprocessing constants (HLIP v1 ``--input-info -1150 350 crop``)."""

    spacing_zyx: tuple[float, float, float] = (3.0, 1.0, 1.0)
    window: tuple[float, float] = (-1150.0, 350.0)
    size_zyx: tuple[int, int, int] = (112, 336, 336)
    mean: float = float(np.float32(sum(_IMAGENET_MEAN) / 3))
    std: float = float(np.float32(sum(_IMAGENET_STD) / 3))


CHEST_CT = ChestCtParams()


@dataclass(frozen=True)
class CanonicalCt:
    """A CT in the canonical array convention (see module docstring)."""

    array: np.ndarray  # float32 [z, y, x] = [I→S, A→P, R→L]
    spacing_zyx: tuple[float, float, float]
    origin_lps: tuple[float, float, float]  # centre of voxel (0, 0, 0)
    axes: str  # how the source axes were permuted/flipped, for the record
    obliquity_deg: float  # largest angle between an array axis and its patient axis


@dataclass(frozen=True)
class PreparedInput:
    """The model input built from a CT, with where its crop lies in the patient."""
    tensor: torch.Tensor  # [1, 1, 1, D, H, W] float32, normalised
    crop_lps_min: tuple[float, float, float]  # LPS mm of the crop box's first voxel centre (x, y, z)
    crop_lps_max: tuple[float, float, float]
    description: dict[str, Any]


def canonicalize(volume: Volume, *, max_obliquity_deg: float = 30.0) -> CanonicalCt:
    """Permute and flip the voxel axes so the array is ``[S↑, P, L]`` with identity directions.

    Only axis permutations and flips are applied (no interpolation); a sheared volume (gantry
    tilt) or one whose axes are more than ``max_obliquity_deg`` from the patient axes is
    refused, because "axial" is then undefined for the model.
    """
    if not volume.is_orthogonal():
        raise GeometryError("CT has a sheared geometry (gantry tilt); resample it before encoding",
                            code="sheared_geometry")  # fmt: skip
    direction = volume.direction  # columns: unit i, j, k directions in LPS
    patient_axis = np.argmax(np.abs(direction), axis=0)  # LPS axis (0=x,1=y,2=z) of each of i, j, k
    if sorted(patient_axis.tolist()) != [0, 1, 2]:
        raise GeometryError("CT axes do not map one-to-one onto patient axes", code="oblique_geometry")
    cosines = np.abs(direction[patient_axis, [0, 1, 2]])
    obliquity = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    if obliquity > max_obliquity_deg:
        raise GeometryError(f"CT axes are {obliquity:.1f}° oblique to the patient axes (limit {max_obliquity_deg}°)",
                            code="oblique_geometry")  # fmt: skip
    # numpy axis of each source index axis: i→2, j→1, k→0
    src_np_axis = {0: 2, 1: 1, 2: 0}
    # target numpy axes: 0 ← patient z, 1 ← patient y, 2 ← patient x
    order = [src_np_axis[int(np.where(patient_axis == lps)[0][0])] for lps in (2, 1, 0)]
    arr = np.transpose(volume.array, order)
    spacing = volume.spacing  # i, j, k
    index_axis = {src_np_axis[a]: a for a in range(3)}  # numpy axis → index axis
    flips = []
    for new_np, lps in zip(range(3), (2, 1, 0), strict=True):
        a = index_axis[order[new_np]]
        if direction[lps, a] < 0:
            flips.append(new_np)
    if flips:
        arr = np.flip(arr, axis=tuple(flips))
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    spacing_zyx = tuple(float(spacing[index_axis[order[n]]]) for n in range(3))
    # origin: LPS of the voxel now at [0, 0, 0]
    src_index = [0.0, 0.0, 0.0]
    for new_np in range(3):
        a = index_axis[order[new_np]]
        if new_np in flips:
            src_index[a] = float(volume.array.shape[src_np_axis[a]] - 1)
    origin = volume.index_to_lps(np.array(src_index))[0]
    names = "ijk"
    axes = ",".join(f"{'-' if n in flips else '+'}{names[index_axis[order[n]]]}" for n in range(3))
    return CanonicalCt(arr, spacing_zyx, tuple(float(v) for v in origin), f"[z,y,x]=[{axes}]", obliquity)  # type: ignore[arg-type]


def resample(arr: np.ndarray, spacing_zyx: tuple[float, float, float],
             target_zyx: tuple[float, float, float] = CHEST_CT.spacing_zyx) -> torch.Tensor:  # fmt: skip
    """Trilinear resampling to ``int(n · spacing / target)`` voxels, as upstream (``align_corners=False``)."""
    size = tuple(int(n * s / t) for n, s, t in zip(arr.shape, spacing_zyx, target_zyx, strict=True))
    if min(size) < 1:
        raise InputError(f"CT of shape {arr.shape} is too small to resample to {target_zyx} mm", code="ct_too_small")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    return F.interpolate(x, size=size, mode="trilinear")[0, 0]


def resampled_position(m: np.ndarray | float, n_in: int, n_out: int) -> np.ndarray:
    """Source index of resampled voxel ``m`` (``align_corners=False`` mapping)."""
    return (np.asarray(m, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def window(x: torch.Tensor, hu: tuple[float, float] = CHEST_CT.window) -> torch.Tensor:
    """Map HU to [0, 1] over the window."""
    lo, hi = hu
    return torch.clip((x - lo) / (hi - lo), 0.0, 1.0)


def pad_crop_starts(shape: tuple[int, ...], size: tuple[int, int, int],
                    centre: tuple[float | None, float | None, float | None] = (None, None, None)
                    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:  # fmt: skip
    """(pad-before, crop-start) per axis.  ``centre`` (in unpadded voxel units) overrides the centre crop."""
    pads, starts = [], []
    for n, s, c in zip(shape, size, centre, strict=True):
        pad = max(s - n, 0)
        before = pad // 2
        n_padded = n + pad
        if c is None:
            start = (n_padded - s) // 2
        else:
            start = int(np.floor(c + before - (s - 1) / 2 + 0.5))  # crop centre nearest to c
            start = min(max(start, 0), n_padded - s)
        pads.append(before)
        starts.append(start)
    return tuple(pads), tuple(starts)  # type: ignore[return-value]


def pad_crop(x: torch.Tensor, size: tuple[int, int, int], pads: tuple[int, int, int],
             starts: tuple[int, int, int]) -> torch.Tensor:  # fmt: skip
    """Zero-pad (symmetric, extra voxel after) to at least ``size``, then crop at ``starts``."""
    extra = [max(s - n, 0) for n, s in zip(x.shape, size, strict=True)]
    spec = []
    for axis in (2, 1, 0):  # F.pad order: last axis first
        spec += [pads[axis], extra[axis] - pads[axis]]
    x = F.pad(x[None], spec, mode="constant", value=0.0)[0]
    return x[starts[0] : starts[0] + size[0], starts[1] : starts[1] + size[1], starts[2] : starts[2] + size[2]]


def normalize(x: torch.Tensor, params: ChestCtParams = CHEST_CT) -> torch.Tensor:
    """Standardise with the training mean and std."""
    return (x - params.mean) / params.std


def preprocess_chest_ct(
    volume: Volume,
    *,
    centre_lps: tuple[float | None, float | None, float | None] = (None, None, None),
    params: ChestCtParams = CHEST_CT,
) -> PreparedInput:
    """Turn a CT volume into the HLIP chest-CT model input.

    ``centre_lps`` = (x, y, z) mm; ``None`` components keep the published centre crop on that
    axis.  Returns the tensor plus where the crop lies in patient space.
    """
    ct = canonicalize(volume)
    res = resample(ct.array, ct.spacing_zyx, params.spacing_zyx)
    n_in, n_out = ct.array.shape, tuple(res.shape)
    # requested centre in resampled voxel units, per numpy axis (z, y, x)
    centre_vox: list[float | None] = []
    for ax, lps in zip(range(3), (2, 1, 0), strict=True):
        c = centre_lps[lps]
        if c is None:
            centre_vox.append(None)
            continue
        src = (c - ct.origin_lps[lps]) / ct.spacing_zyx[ax]
        centre_vox.append((src + 0.5) * n_out[ax] / n_in[ax] - 0.5)
    pads, starts = pad_crop_starts(n_out, params.size_zyx, tuple(centre_vox))  # type: ignore[arg-type]
    x = normalize(pad_crop(window(res, params.window), params.size_zyx, pads, starts), params)
    lo, hi = [], []
    for ax in range(3):
        first = starts[ax] - pads[ax]
        last = first + params.size_zyx[ax] - 1
        src_pos = resampled_position(np.array([first, last]), n_in[ax], n_out[ax])
        mm = ct.origin_lps[2 - ax] + src_pos * ct.spacing_zyx[ax]
        lo.append(float(mm[0]))
        hi.append(float(mm[1]))
    description = {
        "preprocessing_version": PREPROCESSING_VERSION,
        "axes": ct.axes,
        "obliquity_deg": round(ct.obliquity_deg, 2),
        "source_spacing_zyx_mm": [round(s, 4) for s in ct.spacing_zyx],
        "resampled_shape_zyx": list(n_out),
        "pad_before_zyx": list(pads),
        "crop_start_zyx": list(starts),
        "crop_mode": ["centre" if c is None else "centred_on_point" for c in centre_vox],
        "window_hu": list(params.window),
        "orientation_validated": ORIENTATION_VALIDATED,
    }
    lo_xyz, hi_xyz = (lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0])
    return PreparedInput(x[None, None, None].contiguous(), lo_xyz, hi_xyz, description)
