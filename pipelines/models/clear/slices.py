"""Axial slices of a PET/CT study on one common grid, the input of the CLEAR slice encoder.

CLEAR (Ligero et al., MICCAI 2025; arXiv 2411.16803) treats a 3-D scan as a bag of
2-D axial slices.  Upstream renders each CT slice twice (abdomen and chest window) as PNG;
its HU windows are not published.  Locus renders each axial position **once** as a
three-channel image, so that one encoder forward sees both CT windows and the PET uptake:

====  =========================  ===============================================
ch    source                     value
====  =========================  ===============================================
0     CT, soft-tissue window     HU level 40, width 400 → [-160, 240] HU → [0, 1]
1     CT, lung window            HU level -600, width 1500 → [-1350, 150] HU → [0, 1]
2     PET, SUV                   SUV clipped to [0, ``suv_max``] (10) → [0, 1]; 0 without PET
====  =========================  ===============================================

The values are the intensity rendering; the per-channel ``mean``/``std`` normalisation that
follows belongs to the encoder's registry entry (:class:`SlicePreprocessing`).

Grid (all in patient LPS millimetres, DICOM PS3.3 C.7.6.2.1.1):

* **z**: from the lowest to the highest CT voxel centre along patient z, one slice every
  ``z_spacing_mm``; slice index ``s`` ↔ ``z_mm = z0 + s · z_spacing_mm`` (``s`` grows towards
  the head, whatever order the CT was stored in);
* **in plane**: a square field of view covering the CT's x-y bounding box, centred on it,
  ``size × size`` pixels; pixel ``(r, c)`` has its centre at ``x = x0 + c · d``, ``y = y0 + r · d``
  (rows run anterior → posterior, columns patient right → left: the usual radiological display).

Every grid point is mapped through each volume's own affine (:meth:`Volume.lps_to_index`) and
sampled with linear interpolation (``scipy.ndimage.map_coordinates``, order 1), so stored axis
order, flipped axes and a PET on a different voxel grid are all handled by the same rule.  For
the usual case of axes that are a signed permutation of LPS, the same trilinear values are
computed separably (one axis at a time, ~50× faster); tests compare both paths.
Points outside a volume get air (−1024 HU) or SUV 0.  Sampling is point sampling: no
anti-aliasing filter is applied when the grid is coarser than the source (recorded in the
model card as a known limitation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pipelines.dicom.volume import Volume
from pipelines.errors import GeometryError, InputError

#: Version of the slice rendering (stored with every feature set; bump when pixels can change).
SLICE_RENDERING_VERSION = "locus-clear-slices-1"
CHANNELS = ("ct_soft_tissue_w400_l40", "ct_lung_w1500_l-600", "pet_suv_0_10")
AIR_HU = -1024.0
#: Output slices sampled per ``map_coordinates`` call (bounds the coordinate arrays' memory).
_CHUNK = 8


@dataclass(frozen=True)
class SlicePreprocessing:
    """Everything between the DICOM volumes and the encoder's input tensor (part of the registry entry)."""

    size: int = 224
    z_spacing_mm: float = 3.0
    ct_windows: tuple[tuple[float, float], ...] = ((40.0, 400.0), (-600.0, 1500.0))  # (level, width) HU
    suv_max: float = 10.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    rendering: str = SLICE_RENDERING_VERSION

    def __post_init__(self) -> None:
        if self.size < 8 or self.z_spacing_mm <= 0 or self.suv_max <= 0:
            raise InputError(f"invalid slice preprocessing {self}", code="clear_preprocessing_invalid")
        if len(self.ct_windows) != 2 or any(w <= 0 for _, w in self.ct_windows):
            raise InputError("CLEAR slices need exactly two CT windows of positive width", code="clear_preprocessing_invalid")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError("mean/std must have 3 entries, std > 0", code="clear_preprocessing_invalid")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (lists, not tuples) for the registry entry and the checkpoint, so both compare equal."""
        d = asdict(self)
        d["ct_windows"] = [list(w) for w in self.ct_windows]
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlicePreprocessing:
        """Read preprocessing from a registry entry or checkpoint; malformed input is an input error."""
        try:
            return cls(
                size=int(data["size"]),
                z_spacing_mm=float(data["z_spacing_mm"]),
                ct_windows=tuple((float(level), float(width)) for level, width in data["ct_windows"]),
                suv_max=float(data["suv_max"]),
                mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
                rendering=str(data["rendering"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed slice preprocessing: {exc!r}", code="clear_preprocessing_invalid") from exc


DEFAULT_PREPROCESSING = SlicePreprocessing()


@dataclass(frozen=True)
class SliceGrid:
    """The common axial grid; pixel ``(s, r, c)`` ↔ LPS ``(x0 + c·d, y0 + r·d, z0 + s·dz)``."""

    x0: float
    y0: float
    z0: float
    pixel_mm: float
    z_spacing_mm: float
    size: int
    n_slices: int

    def z_of(self, s: np.ndarray | float) -> np.ndarray:
        """Patient z (LPS mm) of slice index ``s``, fractional indices included."""
        return self.z0 + np.asarray(s, dtype=np.float64) * self.z_spacing_mm

    def slice_of(self, z_mm: np.ndarray | float) -> np.ndarray:
        """Nearest slice index of a patient z (may be outside ``[0, n_slices)``)."""
        return np.rint((np.asarray(z_mm, dtype=np.float64) - self.z0) / self.z_spacing_mm).astype(np.int64)

    def pixel_to_lps(self, s: float, r: float, c: float) -> tuple[float, float, float]:
        """Patient LPS mm of a grid position, so evidence on a slice can be put back in the patient."""
        return (self.x0 + c * self.pixel_mm, self.y0 + r * self.pixel_mm, float(self.z_of(s)))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON of the grid, stored with the features so slices can be mapped back to the patient."""
        return asdict(self)


@dataclass(frozen=True)
class SliceStack:
    """Rendered slices (before normalisation) and where they are."""

    images: np.ndarray  # float32 [S, 3, size, size] in [0, 1], channels = CHANNELS
    grid: SliceGrid
    z_mm: np.ndarray  # float64 [S]
    ct_source_index: np.ndarray  # int32 [S]: nearest CT slice k (row of Volume.slice_sources), -1 outside
    pet_present: bool
    frame_of_reference_uid: str
    ct_series_uid: str
    pet_series_uid: str
    preprocessing: SlicePreprocessing


def _corners_lps(volume: Volume) -> np.ndarray:
    i, j, k = (n - 1 for n in volume.shape_ijk)
    idx = np.array([[a, b, c] for a in (0, i) for b in (0, j) for c in (0, k)], dtype=np.float64)
    return volume.index_to_lps(idx)


def common_grid(ct: Volume, params: SlicePreprocessing = DEFAULT_PREPROCESSING) -> SliceGrid:
    """The axial grid of ``ct`` described in the module docstring."""
    if not ct.is_orthogonal():
        raise GeometryError("CT has a sheared geometry (gantry tilt); resample it first", code="sheared_geometry")
    corners = _corners_lps(ct)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    extent = float(max(hi[0] - lo[0], hi[1] - lo[1]))
    if extent <= 0:
        raise InputError("CT has no in-plane extent", code="ct_too_small")
    d = extent / (params.size - 1)
    cx, cy = (lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2
    n = int(np.floor((hi[2] - lo[2]) / params.z_spacing_mm + 1e-6)) + 1
    return SliceGrid(
        x0=float(cx - d * (params.size - 1) / 2), y0=float(cy - d * (params.size - 1) / 2), z0=float(lo[2]),
        pixel_mm=float(d), z_spacing_mm=params.z_spacing_mm, size=params.size, n_slices=n,
    )  # fmt: skip


def _linear(u: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear-interpolation taps along one axis: (i0, i1, weight of i1, inside) for source positions ``u``."""
    inside = (u >= -1e-6) & (u <= n - 1 + 1e-6)
    uc = np.clip(u, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(uc).astype(np.int64), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (uc - i0).astype(np.float32), inside


def _axis_aligned(volume: Volume) -> tuple[int, int, int] | None:
    """Index axis (i=0, j=1, k=2) along patient x, y, z when the volume's axes are a signed permutation of LPS."""
    d = np.abs(volume.direction)
    axes = tuple(int(a) for a in np.argmax(d, axis=1))
    if sorted(axes) != [0, 1, 2] or np.max(np.abs(d - (d > 0.5))) > 1e-6:
        return None
    return axes  # type: ignore[return-value]


def _sample_separable(volume: Volume, axes: tuple[int, int, int], grid: SliceGrid, s_range: range,
                      fill: float) -> np.ndarray:  # fmt: skip
    """Fast path for axis-aligned volumes: the same trilinear values as :func:`_sample_general`, one axis at a time."""
    n = grid.size
    arr = np.transpose(volume.array, tuple(2 - a for a in (axes[2], axes[1], axes[0])))  # view, [z, y, x] patient axes
    origin = volume.affine[:3, 3]
    step = [volume.affine[p, axes[p]] for p in range(3)]  # signed mm per index along each patient axis
    coords = (grid.x0 + np.arange(n) * grid.pixel_mm, grid.y0 + np.arange(n) * grid.pixel_mm, grid.z_of(np.asarray(s_range)))
    x0, x1, fx, inx = _linear((coords[0] - origin[0]) / step[0], arr.shape[2])
    y0, y1, fy, iny = _linear((coords[1] - origin[1]) / step[1], arr.shape[1])
    z0, z1, fz, inz = _linear((coords[2] - origin[2]) / step[2], arr.shape[0])
    outside = ~(iny[:, None] & inx[None, :])
    out = np.full((len(s_range), n, n), fill, dtype=np.float32)
    for o in range(len(s_range)):
        if not inz[o]:
            continue
        slab = arr[z0[o]].astype(np.float32) * (1 - fz[o]) + arr[z1[o]].astype(np.float32) * fz[o]
        rows = slab[y0] * (1 - fy)[:, None] + slab[y1] * fy[:, None]
        img = rows[:, x0] * (1 - fx)[None, :] + rows[:, x1] * fx[None, :]
        img[outside] = fill
        out[o] = img
    return out


def _sample(volume: Volume, grid: SliceGrid, s_range: range, fill: float) -> np.ndarray:
    """Linear samples of ``volume`` at the grid points of slices ``s_range`` → float32 [len, size, size]."""
    axes = _axis_aligned(volume)
    if axes is not None:
        return _sample_separable(volume, axes, grid, s_range, fill)
    return _sample_general(volume, grid, s_range, fill)


def _sample_general(volume: Volume, grid: SliceGrid, s_range: range, fill: float) -> np.ndarray:
    """Any orthogonal orientation: every grid point through the affine, ``map_coordinates`` order 1."""
    n = grid.size
    r, c = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")
    out = np.empty((len(s_range), n, n), dtype=np.float32)
    arr = volume.array if volume.array.dtype == np.float32 else volume.array.astype(np.float32)
    for a in range(0, len(s_range), _CHUNK):
        ss = np.asarray(s_range[a : a + _CHUNK], dtype=np.float64)
        x = np.broadcast_to(grid.x0 + c * grid.pixel_mm, (len(ss), n, n))
        y = np.broadcast_to(grid.y0 + r * grid.pixel_mm, (len(ss), n, n))
        z = np.broadcast_to(grid.z_of(ss)[:, None, None], (len(ss), n, n))
        ijk = volume.lps_to_index(np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1))
        coords = ijk[:, ::-1].T  # array is [k, j, i]
        vals = ndimage.map_coordinates(arr, coords, order=1, mode="constant", cval=fill, prefilter=False)
        out[a : a + len(ss)] = vals.reshape(len(ss), n, n)
    return out


def _window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2
    return np.clip((hu - lo) / width, 0.0, 1.0).astype(np.float32)


def extract_slices(ct: Volume, pet_suv: Volume | None = None, params: SlicePreprocessing = DEFAULT_PREPROCESSING,
                   *, require_same_frame: bool = True) -> SliceStack:  # fmt: skip
    """Render every axial slice of the common grid (CT windows + SUV) for the slice encoder.

    ``ct`` holds HU (rescale applied), ``pet_suv`` SUV values (see :mod:`pipelines.dicom.suv`).
    The PET must share the CT's Frame of Reference (PS3.3 C.7.4.1): otherwise "the same z" has
    no meaning and the study is refused, unless ``require_same_frame`` is off (phantoms).
    """
    if ct.array.size == 0:
        raise InputError("CT volume is empty", code="ct_too_small")
    if pet_suv is not None:
        if not pet_suv.is_orthogonal():
            raise GeometryError("PET has a sheared geometry", code="sheared_geometry")
        if require_same_frame and ct.frame_of_reference_uid != pet_suv.frame_of_reference_uid:
            raise GeometryError("PET and CT do not share a Frame of Reference UID; slices cannot be aligned",
                                code="frame_of_reference_mismatch")  # fmt: skip
    grid = common_grid(ct, params)
    s_all = range(grid.n_slices)
    hu = _sample(ct, grid, s_all, AIR_HU)
    images = np.empty((grid.n_slices, 3, grid.size, grid.size), dtype=np.float32)
    for ch, (level, width) in enumerate(params.ct_windows):
        images[:, ch] = _window(hu, level, width)
    del hu
    if pet_suv is not None:
        suv = _sample(pet_suv, grid, s_all, 0.0)
        images[:, 2] = np.clip(suv / params.suv_max, 0.0, 1.0)
    else:
        images[:, 2] = 0.0
    z = grid.z_of(np.arange(grid.n_slices))
    # nearest stored CT slice for each grid slice (evidence references point at it)
    centre = np.stack([np.full_like(z, grid.x0 + grid.pixel_mm * (grid.size - 1) / 2),
                       np.full_like(z, grid.y0 + grid.pixel_mm * (grid.size - 1) / 2), z], axis=1)  # fmt: skip
    k = np.rint(ct.lps_to_index(centre)[:, 2]).astype(np.int64)
    k[(k < 0) | (k >= ct.array.shape[0])] = -1
    return SliceStack(
        images=images, grid=grid, z_mm=z, ct_source_index=k.astype(np.int32), pet_present=pet_suv is not None,
        frame_of_reference_uid=ct.frame_of_reference_uid, ct_series_uid=ct.series_instance_uid,
        pet_series_uid=pet_suv.series_instance_uid if pet_suv is not None else "", preprocessing=params,
    )  # fmt: skip


def normalize(images: np.ndarray, params: SlicePreprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    """Per-channel ``(v − mean) / std`` (the last step before the encoder)."""
    mean = np.asarray(params.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(params.std, dtype=np.float32)[:, None, None]
    return (images - mean) / std
