"""Coronal and sagittal PET maximum-intensity projections with their geometry.

A MIP is what radiologists read first on a whole-body PET, and the 2-D view AFLoc localizes on
for PET/CT (pipelines/models/afloc/MODEL_CARD.md).  A 2-D peak is only useful if it can be put back in the
patient, so every :class:`Mip` carries, besides the image:

* ``depth`` — per pixel, the voxel index along the projection axis where the maximum was
  found (first occurrence in index order on ties);
* ``index_affine`` — 4×4 mapping ``(row, col, depth, 1)`` → volume voxel index ``(i, j, k, 1)``;
* ``affine`` — 4×4 mapping ``(row, col, depth, 1)`` → patient LPS mm (DICOM PS3.3 C.7.6.2.1.1),
  the volume's own affine composed with ``index_affine``, so it is exact for any voxel order,
  flipped axes included.

Display convention (independent of how the slices were stored): rows run head → feet
(decreasing LPS z); a coronal view has the patient's right on the image left (columns run
toward +x, patient left), a sagittal view has anterior on the image left (columns toward +y,
posterior), as a viewer shows them.  The volume must be orthogonal; each voxel axis is paired
with the LPS axis it is closest to, and the exact affine keeps a slightly oblique volume's
coordinates right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from pipelines.errors import GeometryError

if TYPE_CHECKING:  # the renderer needs only .array and .affine (no SimpleITK/pydicom import at run time)
    from pipelines.dicom.volume import Volume  # noqa: F401


class VolumeLike(Protocol):
    """What a MIP needs: a ``[k, j, i]`` array and the 4×4 index → LPS affine (``pipelines.dicom.volume.Volume``)."""

    array: np.ndarray
    affine: np.ndarray

View = Literal["coronal", "sagittal"]
#: (projection LPS axis, column LPS axis) per view; rows are always LPS z, head first.
_VIEWS: dict[str, tuple[int, int]] = {"coronal": (1, 0), "sagittal": (0, 1)}


@dataclass(frozen=True)
class Mip:
    """A projection image with the geometry that puts any of its pixels back in the patient (voxel index and LPS mm)."""

    view: str
    image: np.ndarray  # [rows, cols] float32: maximum along the projection axis
    depth: np.ndarray  # [rows, cols] int64: voxel index along the projection axis of that maximum
    index_affine: np.ndarray  # 4x4: (row, col, depth, 1) -> (i, j, k, 1)
    affine: np.ndarray  # 4x4: (row, col, depth, 1) -> LPS mm
    pixel_spacing_mm: tuple[float, float]  # (row, column) spacing
    frame_of_reference_uid: str = ""
    series_instance_uid: str = ""

    def pixel_to_index(self, row: float, col: float, depth: float | None = None) -> np.ndarray:
        """Voxel index (i, j, k) of a pixel; ``depth`` defaults to the arg-max depth of that pixel."""
        d = float(self.depth[round(row), round(col)]) if depth is None else float(depth)
        return (self.index_affine @ np.array([row, col, d, 1.0]))[:3]

    def pixel_to_lps(self, row: float, col: float, depth: float | None = None) -> np.ndarray:
        """Patient LPS (mm) of a pixel at ``depth`` (default: where its maximum lies — the back-projection)."""
        d = float(self.depth[round(row), round(col)]) if depth is None else float(depth)
        return (self.affine @ np.array([row, col, d, 1.0]))[:3]

    def lps_to_pixel(self, xyz: np.ndarray) -> np.ndarray:
        """(row, col, depth) of an LPS point (continuous)."""
        v = np.append(np.asarray(xyz, dtype=np.float64), 1.0)
        return (np.linalg.inv(self.affine) @ v)[:3]


def _axis_pairing(affine: np.ndarray) -> tuple[list[int], list[float]]:
    """For LPS axis x, y, z: the voxel axis (0=i, 1=j, 2=k) along it and that axis's sign."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    d = m / np.linalg.norm(m, axis=0, keepdims=True)  # columns: unit i, j, k directions in LPS
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise GeometryError("MIP needs an orthogonal volume (sheared/tilted geometry)", code="sheared_geometry")
    dominant = [int(np.argmax(np.abs(d[:, a]))) for a in range(3)]
    if sorted(dominant) != [0, 1, 2]:
        raise GeometryError("volume axes are too oblique to pair with patient axes for a MIP", code="oblique_geometry")
    voxel_axis = [dominant.index(lps) for lps in range(3)]
    sign = [float(np.sign(d[lps, voxel_axis[lps]])) for lps in range(3)]
    return voxel_axis, sign


def render_mip(volume: VolumeLike, view: View = "coronal") -> Mip:
    """Maximum-intensity projection of ``volume`` (e.g. SUV) in ``view`` with its geometry."""
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {sorted(_VIEWS)}, not {view!r}")
    proj_lps, col_lps = _VIEWS[view]
    affine = np.asarray(volume.affine, dtype=np.float64)
    if affine.shape != (4, 4) or np.asarray(volume.array).ndim != 3:
        raise ValueError("MIP needs a 3-D [k, j, i] array and a 4x4 affine")
    voxel_axis, sign = _axis_pairing(affine)
    arr_ijk = np.asarray(volume.array).transpose(2, 1, 0)  # Volume arrays are [k, j, i]
    shape = arr_ijk.shape
    row_ax, col_ax, dep_ax = voxel_axis[2], voxel_axis[col_lps], voxel_axis[proj_lps]
    flip_row = sign[2] > 0  # rows must run toward decreasing z (head first)
    flip_col = sign[col_lps] < 0  # columns must run toward increasing x (coronal) / y (sagittal)
    view_arr = arr_ijk.transpose(row_ax, col_ax, dep_ax)
    if flip_row:
        view_arr = view_arr[::-1]
    if flip_col:
        view_arr = view_arr[:, ::-1]
    data = np.asarray(view_arr, dtype=np.float32)
    if np.isnan(data).any():
        data = np.where(np.isnan(data), -np.inf, data)
    depth = np.argmax(data, axis=2)
    image = np.take_along_axis(data, depth[..., None], axis=2)[..., 0]
    image = np.where(np.isneginf(image), np.nan, image).astype(np.float32)

    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    m[row_ax, 0] = -1.0 if flip_row else 1.0
    m[row_ax, 3] = shape[row_ax] - 1 if flip_row else 0.0
    m[col_ax, 1] = -1.0 if flip_col else 1.0
    m[col_ax, 3] = shape[col_ax] - 1 if flip_col else 0.0
    m[dep_ax, 2] = 1.0
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return Mip(
        view=view,
        image=image,
        depth=depth.astype(np.int64),
        index_affine=m,
        affine=affine @ m,
        pixel_spacing_mm=(float(spacing[row_ax]), float(spacing[col_ax])),
        frame_of_reference_uid=str(getattr(volume, "frame_of_reference_uid", "")),
        series_instance_uid=str(getattr(volume, "series_instance_uid", "")),
    )


def render_mips(volume: VolumeLike) -> dict[str, Mip]:
    """Coronal and sagittal MIPs of one volume."""
    return {v: render_mip(volume, v) for v in ("coronal", "sagittal")}


def to_uint8(image: np.ndarray, lower: float = 0.0, upper: float = 10.0) -> np.ndarray:
    """Window ``[lower, upper]`` (e.g. SUV 0–10) → 0…255, round half to even; NaN → 0."""
    if not upper > lower:
        raise ValueError("window upper must exceed lower")
    scaled = (np.nan_to_num(np.asarray(image, dtype=np.float64), nan=lower) - lower) * (255.0 / (upper - lower))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
