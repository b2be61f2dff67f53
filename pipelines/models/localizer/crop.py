"""Fixed physical crops around a lesion, in the axis order the HCL-AL weights expect.

The contract (HCL-AL, Gao et al. 2025; reference ``image_crop`` and ``FixedNormalizer``):

* Resampling happens in SimpleITK physical space (LPS mm) with ``ResampleImageFilter``,
  whatever the source grid or direction, each channel independently from its own grid.
* Output grid: ``crop_size`` voxels (x, y, z) at ``spacing`` mm, identity direction, origin
  ``centre − crop_size·spacing/2`` per axis.  The requested centre therefore lands on voxel
  ``size/2``: a −½ output-voxel shift versus a truly centred crop (B3).  This is the
  training convention and is kept in **both** geometry modes.
* Interpolation from the checkpoint (``linear`` for CT and SUV, ``nn`` for the mask);
  everything outside the source is ``0`` (B4: CT is padded with 0 HU, not −1000, also kept;
  Locus reports the fraction of the crop outside the scan instead).
* ``GetArrayFromImage`` gives ``[z, y, x]``; the network wants ``[x, y, z]``
  (x patient right→left, y anterior→posterior, z inferior→superior).
* Normalisation ``(v − mean)/(std + 1e-8)`` in float32, clipped to [−1, 1] where set.

Geometry-mode difference here: ``hcl-al`` mode rounds the centre and spacing to float32
before computing the origin, exactly as the reference does (``np.asarray(..., float32)``);
``corrected`` mode keeps float64 (a sub-micrometre difference, but bit-exact parity needs it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipelines.models.checkpoints import Normalizer

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nn": sitk.sitkNearestNeighbor}


@dataclass(frozen=True)
class CropGeometry:
    """Spacing and size of a model input crop."""
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]

    def half(self) -> CropGeometry:
        """Same field of view at half spacing and double size (mask fallback, §5 step 4)."""
        return CropGeometry(
            spacing=tuple(s / 2 for s in self.spacing),  # type: ignore[arg-type]
            size=tuple(2 * n for n in self.size),  # type: ignore[arg-type]
        )


def crop_origin(centre: Sequence[float], geom: CropGeometry, *, compat: bool) -> tuple[float, float, float]:
    """World origin (voxel 0 centre) of a crop centred on ``centre`` (LPS mm)."""
    if compat:
        c = np.asarray(centre, dtype=np.float32)
        sp = np.asarray(geom.spacing, dtype=np.float32)
        sz = np.asarray(geom.size, dtype=np.int32)
        # numpy promotes int32·float32 to float64, as in the reference
        return tuple(float(c[i] - (sz[i] * sp[i] / 2)) for i in range(3))  # type: ignore[return-value]
    return tuple(float(c) - n * s / 2 for c, n, s in zip(centre, geom.size, geom.spacing))  # type: ignore[return-value]


def crop_spacing(geom: CropGeometry, *, compat: bool) -> tuple[float, float, float]:
    """The crop spacing; in HCL-AL mode rounded through float32 as the published code does."""
    if compat:
        return tuple(float(v) for v in np.asarray(geom.spacing, dtype=np.float32))  # type: ignore[return-value]
    return tuple(float(v) for v in geom.spacing)  # type: ignore[return-value]


def crop_image(
    image: sitk.Image,
    origin: Sequence[float],
    spacing: Sequence[float],
    size: Sequence[int],
    interpolation: str,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` onto an identity-direction grid (pixel type kept)."""
    f = sitk.ResampleImageFilter()
    f.SetSize([int(n) for n in size])
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputOrigin([float(o) for o in origin])
    f.SetOutputDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    f.SetInterpolator(_INTERPOLATORS[interpolation])
    f.SetDefaultPixelValue(default_value)
    return f.Execute(image)


def crop_around(
    image: sitk.Image, centre: Sequence[float], geom: CropGeometry, interpolation: str, *, compat: bool
) -> sitk.Image:
    """A crop of ``image`` centred on ``centre`` (LPS mm) with the stage's geometry."""
    return crop_image(
        image, crop_origin(centre, geom, compat=compat), crop_spacing(geom, compat=compat), geom.size, interpolation
    )


def to_xyz(image: sitk.Image) -> np.ndarray:
    """``[x, y, z]`` float32 array of a crop (transpose of SimpleITK's ``[z, y, x]``)."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0), dtype=np.float32)


def normalize(values: np.ndarray, norm: Normalizer) -> np.ndarray:
    """Reference ``intensity_normalize`` in float32."""
    out = (values.astype(np.float32) - np.float32(norm.mean)) / np.float32(norm.stddev + 1e-8)
    if norm.clip:
        out = np.clip(out, np.float32(-1), np.float32(1))
    return out.astype(np.float32, copy=False)


def as_float32(image: sitk.Image) -> sitk.Image:
    """The image as float32 (the network's input type), without a copy when it already is."""
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def _inside_axis(coords: np.ndarray, image: sitk.Image, axis: int) -> np.ndarray | None:
    """Per-axis inside test for images whose direction is a signed permutation, else None."""
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    col = np.flatnonzero(np.abs(d[axis, :]) > 1 - 1e-6)
    if col.size != 1:
        return None
    k = int(col[0])
    idx = d[axis, k] * (coords - image.GetOrigin()[axis]) / image.GetSpacing()[k]
    return (idx >= -0.5) & (idx < image.GetSize()[k] - 0.5)


def outside_fraction(images: Sequence[sitk.Image], origin: Sequence[float], geom: CropGeometry) -> float:
    """Fraction of crop voxel centres that fall outside any of ``images`` (0-filled there).

    A point is inside an image when its continuous index lies in ``[-0.5, size-0.5)`` on
    every axis (ITK's buffer test).  Separable, hence cheap, for axis-aligned directions;
    oblique directions fall back to a per-point computation.
    """
    axes = [np.asarray(origin[a], dtype=np.float64) + np.arange(geom.size[a]) * geom.spacing[a] for a in range(3)]
    inside = [np.ones(geom.size[a], dtype=bool) for a in range(3)]
    oblique: list[sitk.Image] = []
    for img in images:
        per_axis = [_inside_axis(axes[a], img, a) for a in range(3)]
        if any(p is None for p in per_axis):
            oblique.append(img)
            continue
        for a in range(3):
            inside[a] &= per_axis[a]
    total = int(np.prod(geom.size))
    if not oblique:
        return 1.0 - float(np.prod([int(v.sum()) for v in inside])) / total
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    ok = (inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]).reshape(-1)
    for img in oblique:
        d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
        idx = (grid - np.asarray(img.GetOrigin())) @ d / np.asarray(img.GetSpacing())
        ok &= np.all((idx >= -0.5) & (idx < np.asarray(img.GetSize()) - 0.5), axis=1)
    return 1.0 - float(ok.sum()) / total
