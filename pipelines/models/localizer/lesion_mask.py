"""Lesion boxes and the lesion-mask input channel, in reference and corrected form.

The third input channel must show only the target lesion, binarised (HCL-AL, Gao et al. 2025).
The reference gets there indirectly and with several defects; ``hcl-al`` mode reproduces
them so published outputs can be matched, ``corrected`` mode does the obvious thing.

Boxes (``x, y, z, width, height, depth`` in LPS mm):

* :func:`reference_box` is HCL-AL's ``calc_lesion_bbox``: corner ``origin + D·(min·sp)``,
  size ``|D·((max+1−min)·sp)|``, centre ``corner + size/2``.  That is +½ voxel off per index
  axis (B1) and, for any flipped axis, off by the box size along it (B2).
* :func:`exact_box` is the voxel-edge box: the axis-aligned LPS hull of the outer faces of
  the lesion's voxels (index range ``[min−½, max+½]`` mapped through the affine).

Mask channel, reference box mode (:func:`reference_mask_channel`):

1. nearest-neighbour crop of the (multi-label) mask;
2. 26-connected components over all nonzero voxels, so touching lesions merge (B7);
3. the component whose reference box has the highest IoU > 0 with the query box, binarised;
4. none: re-crop at half spacing / double size, repeat, binarise, "dilate" by one voxel
   with 6-connectivity — where the reference reads its bounding box in x,y,z order but
   indexes the z,y,x array, so for non-cubic crops the dilation misses the lesion — and
   nearest-neighbour back to the model grid;
5. still none: zero the labels found by the *second* CC run in the *first* CC image (B6),
   leaving other lesions' component ids (values > 1) in the channel.

With ``target_label`` (reference mask mode, coarse stage only) the crop of the original
mask is binarised at that value instead (B5).

Corrected mode (:func:`corrected_mask_channel`) crops the lesion's own binary mask, uses the
same mask for both stages, dilates properly in the fallback, and returns an all-zero
channel with a ``mask_missing`` flag when the lesion is not in the crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipelines.models.localizer.crop import CropGeometry, crop_around, to_xyz

_CC26 = np.ones((3, 3, 3), dtype=int)
_CC6 = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class LesionBox:
    """Box centre and extent in LPS mm (HCL-AL ``x, y, z, width, height, depth``)."""

    centre: tuple[float, float, float]
    size: tuple[float, float, float]

    def as_array(self) -> np.ndarray:
        """The box as ``[cx, cy, cz, sx, sy, sz]`` (HCL-AL's ``bbox.csv`` order)."""
        return np.array([*self.centre, *self.size], dtype=np.float64)


@dataclass(frozen=True)
class MaskChannel:
    """The lesion-mask input channel of one crop, with how it was found."""
    values: np.ndarray  # [x, y, z] float32, before normalisation
    matched: bool  # a lesion was identified in the crop
    fallback_used: bool  # the half-spacing re-crop was needed
    residual: bool  # compat B6: no match, other lesions' voxels left in the channel


# -- boxes -----------------------------------------------------------------------------
def _index_bbox_xyz(mask_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    sl = ndimage.find_objects(mask_zyx.astype(np.int8, copy=False))
    if not sl or sl[0] is None:
        return None
    z, y, x = sl[0]
    return np.array([x.start, y.start, z.start]), np.array([x.stop - 1, y.stop - 1, z.stop - 1])


def _world_geometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array(image.GetOrigin(), dtype=np.float64),
        np.array(image.GetSpacing(), dtype=np.float64),
        np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3),
    )


def reference_box_from_bounds(image: sitk.Image, vmin: np.ndarray, vmax: np.ndarray) -> LesionBox:
    """HCL-AL ``world_box_full`` + ``calc_lesion_bbox`` on index bounds (x, y, z order)."""
    origin, spacing, direction = _world_geometry(image)
    corner = origin + direction @ (np.asarray(vmin) * spacing)
    far = origin + direction @ ((np.asarray(vmax) + 1) * spacing)
    size = np.abs(far - corner)
    max_world = corner + size
    centre = (corner + max_world) / 2
    return LesionBox(tuple(float(v) for v in centre), tuple(float(v) for v in size))  # type: ignore[arg-type]


def reference_box(image: sitk.Image, label: float) -> LesionBox | None:
    """``calc_lesion_bbox(image, label)``, including biases B1 and B2; None if absent."""
    bounds = _index_bbox_xyz(sitk.GetArrayViewFromImage(image) == label)
    return None if bounds is None else reference_box_from_bounds(image, *bounds)


def exact_box_from_bounds(image: sitk.Image, vmin: np.ndarray, vmax: np.ndarray) -> LesionBox:
    """The world box of voxel index bounds, to the voxels' outer edges."""
    origin, spacing, direction = _world_geometry(image)
    lo = np.asarray(vmin, dtype=np.float64) - 0.5
    hi = np.asarray(vmax, dtype=np.float64) + 0.5
    corners = np.array([[a[0], b[1], c[2]] for a in (lo, hi) for b in (lo, hi) for c in (lo, hi)])
    world = origin + (corners * spacing) @ direction.T
    wmin, wmax = world.min(axis=0), world.max(axis=0)
    return LesionBox(tuple(float(v) for v in (wmin + wmax) / 2), tuple(float(v) for v in wmax - wmin))  # type: ignore[arg-type]


def exact_box(image: sitk.Image, label: float | None = None) -> LesionBox | None:
    """Voxel-edge box of ``image == label`` (or of all nonzero voxels when label is None)."""
    arr = sitk.GetArrayViewFromImage(image)
    bounds = _index_bbox_xyz(arr != 0 if label is None else arr == label)
    return None if bounds is None else exact_box_from_bounds(image, *bounds)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """3-D IoU of two ``[cx, cy, cz, w, h, d]`` boxes (reference ``box_iou``)."""
    a_min, a_max = a[:3] - a[3:] / 2, a[:3] + a[3:] / 2
    b_min, b_max = b[:3] - b[3:] / 2, b[:3] + b[3:] / 2
    inter = 1.0
    for i in range(3):
        inter *= max(min(a_max[i], b_max[i]) - max(a_min[i], b_min[i]), 0)
    if inter == 0:
        return 0.0
    vol_a = float(np.prod(a_max - a_min))
    vol_b = float(np.prod(b_max - b_min))
    return float(inter / (vol_a + vol_b - inter))


# -- reference (hcl-al) mask channel ----------------------------------------------------------
def _components(crop: sitk.Image) -> np.ndarray:
    """26-connected components of all nonzero voxels, int32 ``[z, y, x]``."""
    labelled, _ = ndimage.label(sitk.GetArrayFromImage(crop).astype(np.int32), structure=_CC26)
    return labelled.astype(np.int32, copy=False)


def _match_component(cc: np.ndarray, crop: sitk.Image, query: np.ndarray) -> tuple[int, list[int]]:
    """Reference ``search_label_by_bbox``: first component with the strictly highest IoU > 0."""
    labels = [int(v) for v in np.unique(cc) if v != 0]
    best, best_iou = 0, 0.0
    slices = ndimage.find_objects(cc)
    for lab in labels:
        z, y, x = slices[lab - 1]
        vmin = np.array([x.start, y.start, z.start])
        vmax = np.array([x.stop - 1, y.stop - 1, z.stop - 1])
        box = reference_box_from_bounds(crop, vmin, vmax)
        iou = box_iou(query, box.as_array())
        if iou > best_iou:
            best, best_iou = lab, iou
    return best, labels


def reference_dilate(binary_zyx: np.ndarray) -> np.ndarray:
    """HCL-AL ``imdilate(img, 1, 1, 6)``, quirk included.

    The reference limits the dilation to the lesion's bounding box grown by one voxel, but
    takes the box in (x, y, z) order and uses it to index the (z, y, x) array.
    """
    fg = binary_zyx == 1
    bounds = _index_bbox_xyz(fg)
    if bounds is None:
        return binary_zyx
    vmin, vmax = bounds
    shape = binary_zyx.shape
    lo = [max(int(vmin[i]) - 1, 0) for i in range(3)]
    hi = [min(int(vmax[i]) + 1, shape[i] - 1) for i in range(3)]
    region = tuple(slice(lo[i], hi[i] + 1) for i in range(3))
    grown = ndimage.binary_dilation(fg, structure=_CC6)
    out = binary_zyx.copy()
    sub = out[region]
    sub[grown[region] & ~fg[region]] = 1
    return out


def reference_mask_channel(
    mask: sitk.Image,
    centre: Sequence[float],
    query: np.ndarray,
    geom: CropGeometry,
    interpolation: str = "nn",
    target_label: int = 0,
) -> MaskChannel:
    """The lesion channel exactly as HCL-AL ``load_crop`` builds it (see module docstring)."""
    crop = crop_around(mask, centre, geom, interpolation, compat=True)
    if target_label:
        values = (sitk.GetArrayViewFromImage(crop) == target_label).astype(np.float32)
        return MaskChannel(values.transpose(2, 1, 0).copy(), True, False, False)
    cc = _components(crop)
    found, _ = _match_component(cc, crop, query)
    if found:
        return MaskChannel((cc == found).astype(np.float32).transpose(2, 1, 0).copy(), True, False, False)
    fine = crop_around(mask, centre, geom.half(), interpolation, compat=True)
    cc2 = _components(fine)
    found2, labels2 = _match_component(cc2, fine, query)
    if found2:
        dilated = sitk.GetImageFromArray(reference_dilate((cc2 == found2).astype(np.int32)))
        dilated.CopyInformation(fine)
        back = crop_around(dilated, centre, geom, "nn", compat=True)
        return MaskChannel(to_xyz(back), True, True, False)
    residual = cc.copy()
    if labels2:
        residual[np.isin(residual, labels2) & (residual != 0)] = 0
    values = residual.astype(np.float32).transpose(2, 1, 0).copy()
    return MaskChannel(values, False, True, bool(values.any()))


# -- corrected mask channel -----------------------------------------------------------------
def corrected_mask_channel(
    lesion: sitk.Image, centre: Sequence[float], geom: CropGeometry, interpolation: str = "nn"
) -> MaskChannel:
    """Crop the lesion's own binary mask; proper fallback; empty channel when absent."""
    crop = crop_around(lesion, centre, geom, interpolation, compat=False)
    values = (sitk.GetArrayViewFromImage(crop) > 0.5).astype(np.float32)
    if values.any():
        return MaskChannel(values.transpose(2, 1, 0).copy(), True, False, False)
    fine = crop_around(lesion, centre, geom.half(), interpolation, compat=False)
    fine_bin = sitk.GetArrayViewFromImage(fine) > 0.5
    if fine_bin.any():
        grown = sitk.GetImageFromArray(ndimage.binary_dilation(fine_bin, structure=_CC6).astype(np.uint8))
        grown.CopyInformation(fine)
        back = crop_around(grown, centre, geom, "nn", compat=False)
        return MaskChannel((to_xyz(back) > 0.5).astype(np.float32), True, True, False)
    return MaskChannel(np.zeros(tuple(geom.size), dtype=np.float32), False, True, False)
