"""Rasterise the body model (and lesions) to CT, PET and label grids.

Imaging model, deliberately simple and stated so nobody mistakes it for a simulator:

* **Sampling.** Tissue values are painted at voxel centres of a grid refined so that no
  sub-voxel exceeds ``MAX_SUBVOXEL_MM`` and then block-averaged back: coarse grids
  (the unit-test preset) still show partial-volume mixing at boundaries.
* **Resolution.** A Gaussian point-spread function (FWHM ``CT_FWHM_MM`` and
  ``PET_FWHM_MM``; typical of clinical CT and of a post-filtered OSEM PET) applied on the
  refined grid before averaging.
* **Noise.** CT: white Gaussian noise added before the PSF (so it has the PSF's fine
  grain), scaled to a final standard deviation of ``CT_NOISE_HU``.  PET: Gaussian with
  variance proportional to the local activity (``sd = PET_COV * sqrt(SUV *
  PET_NOISE_REF_SUV)``, i.e. ~10 % in the liver), correlated over about half the PSF,
  clipped at zero.
* **Labels** are not blurred: the structure label of a voxel is the last structure (in
  painting order) containing its centre, so a label map agrees exactly with
  :meth:`training.phantom.anatomy.Anatomy.owner` at voxel centres.

Grids are axis-aligned in LPS (identity direction cosines), indexed ``[k, j, i]`` as in
:class:`pipelines.dicom.volume.Volume`.  Work proceeds in z-slabs and per-structure
bounding boxes, so the whole-body preset (512 x 512 x 600 CT) stays within a few GB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from training.phantom.anatomy import Anatomy
from training.phantom.shapes import Ellipsoid

MAX_SUBVOXEL_MM = 5.0
CT_FWHM_MM = 1.0
PET_FWHM_MM = 6.5
CT_NOISE_HU = 12.0
PET_COV = 0.10
PET_NOISE_REF_SUV = 2.0
HU_MIN, HU_MAX = -1024, 3071
_SLAB = 16


@dataclass(frozen=True)
class Grid:
    """Axis-aligned voxel grid: ``shape`` (nk, nj, ni), ``spacing`` (dx, dy, dz) mm, ``origin`` of voxel 0."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates (float64) along x (i), y (j) and z (k)."""
        nk, nj, ni = self.shape
        return tuple(self.origin[a] + np.arange(n) * self.spacing[a]  # type: ignore[return-value]
                     for a, n in ((0, ni), (1, nj), (2, nk)))

    def refined(self, factors: tuple[int, int, int]) -> Grid:
        """Grid with each voxel split into ``factors`` (fx, fy, fz) sub-voxels covering the same space."""
        sp = tuple(s / f for s, f in zip(self.spacing, factors, strict=True))
        org = tuple(o - s / 2 + s2 / 2 for o, s, s2 in zip(self.origin, self.spacing, sp, strict=True))
        nk, nj, ni = self.shape
        fx, fy, fz = factors
        return Grid((nk * fz, nj * fy, ni * fx), sp, org)  # type: ignore[arg-type]

    def subvoxel_factors(self) -> tuple[int, int, int]:
        return tuple(max(1, math.ceil(s / MAX_SUBVOXEL_MM - 1e-9)) for s in self.spacing)  # type: ignore[return-value]

    def nearest_index(self, xyz: Sequence[float]) -> tuple[int, int, int]:
        """(k, j, i) of the voxel whose centre is nearest to a world point (clipped to the grid)."""
        idx = [int(round((xyz[a] - self.origin[a]) / self.spacing[a])) for a in range(3)]
        nk, nj, ni = self.shape
        return (min(max(idx[2], 0), nk - 1), min(max(idx[1], 0), nj - 1), min(max(idx[0], 0), ni - 1))

    def voxel_center(self, kji: Sequence[int]) -> np.ndarray:
        k, j, i = kji
        return np.array([self.origin[0] + i * self.spacing[0], self.origin[1] + j * self.spacing[1],
                         self.origin[2] + k * self.spacing[2]])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Extent of the voxel centres (float64 lo, hi)."""
        nk, nj, ni = self.shape
        lo = np.asarray(self.origin, float)
        return lo, lo + np.array([ni - 1, nj - 1, nk - 1]) * np.asarray(self.spacing)


@dataclass(frozen=True)
class LesionShape:
    """What the renderer needs of a lesion: world ellipsoid, CT number, SUV, label value."""

    label: int
    ellipsoid: Ellipsoid
    hu: float
    suv: float


def _ranges(axis: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    return int(np.searchsorted(axis, lo, side="left")), int(np.searchsorted(axis, hi, side="right"))


def paint(anatomy: Anatomy, grid: Grid, *, values: bool, labels: bool,
          lesions: Sequence[LesionShape] = ()) -> dict[str, np.ndarray]:
    """Paint structures (and lesions, for values) at the voxel centres of ``grid``.

    Returns a dict with ``hu`` and ``suv`` (float32) when ``values``, ``labels`` (uint8 or
    uint16 structure labels) when ``labels``.
    """
    nk, _nj, _ni = grid.shape
    out: dict[str, np.ndarray] = {}
    if values:
        out["hu"] = np.full(grid.shape, -1000.0, dtype=np.float32)
        out["suv"] = np.zeros(grid.shape, dtype=np.float32)
    if labels:
        out["labels"] = np.zeros(grid.shape, dtype=np.uint8 if len(anatomy.structures) < 255 else np.uint16)
    xs, ys, zs = grid.axes()
    sc = anatomy.scale
    # body-frame axes, float32 exactly as Anatomy.to_body computes them
    bx, by, bz = ((xs / sc[0]).astype(np.float32), (ys / sc[1]).astype(np.float32),
                  (zs / sc[2]).astype(np.float32))
    wx, wy, wz = xs.astype(np.float32), ys.astype(np.float32), zs.astype(np.float32)
    bounds = [s.shape.bounds() for s in anatomy.structures]
    for k0 in range(0, nk, _SLAB):
        k1 = min(nk, k0 + _SLAB)
        for n, s in enumerate(anatomy.structures):
            lo, hi = bounds[n]
            a0, a1 = _ranges(bz[k0:k1], lo[2], hi[2])
            if a0 >= a1:
                continue
            i0, i1 = _ranges(bx, lo[0], hi[0])
            j0, j1 = _ranges(by, lo[1], hi[1])
            if i0 >= i1 or j0 >= j1:
                continue
            ka, kb = k0 + a0, k0 + a1
            m = s.shape.contains_grid(bx[i0:i1], by[j0:j1], bz[ka:kb])
            if not m.any():
                continue
            box = (slice(ka, kb), slice(j0, j1), slice(i0, i1))
            if labels:
                out["labels"][box][m] = n + 1
            if values:
                out["hu"][box][m] = s.hu
                out["suv"][box][m] = s.suv
                if s.core is not None:
                    c = s.core.contains_grid(bx[i0:i1], by[j0:j1], bz[ka:kb]) & m
                    out["hu"][box][c] = s.core_hu
                    out["suv"][box][c] = s.core_suv
        if values:
            for les in lesions:
                lo, hi = les.ellipsoid.bounds()
                a0, a1 = _ranges(wz[k0:k1], lo[2], hi[2])
                i0, i1 = _ranges(wx, lo[0], hi[0])
                j0, j1 = _ranges(wy, lo[1], hi[1])
                if a0 >= a1 or i0 >= i1 or j0 >= j1:
                    continue
                box = (slice(k0 + a0, k0 + a1), slice(j0, j1), slice(i0, i1))
                m = les.ellipsoid.contains_grid(wx[i0:i1], wy[j0:j1], wz[k0 + a0:k0 + a1])
                out["hu"][box][m] = les.hu
                out["suv"][box][m] = les.suv
    return out


def lesion_label_map(grid: Grid, lesions: Sequence[LesionShape]) -> np.ndarray:
    """uint8/uint16 map of lesion label values at voxel centres (0 = no lesion); lesions must not overlap."""
    dtype = np.uint8 if len(lesions) < 255 else np.uint16
    out = np.zeros(grid.shape, dtype=dtype)
    xs, ys, zs = (a.astype(np.float32) for a in grid.axes())
    for les in lesions:
        m, box = lesion_mask(grid, les.ellipsoid, (xs, ys, zs))
        if m is not None:
            out[box][m] = les.label
    return out


def lesion_mask(grid: Grid, ell: Ellipsoid, axes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray | None, tuple[slice, slice, slice]]:
    """Mask of voxel centres inside ``ell`` within its bounding box, and that box (k, j, i slices)."""
    xs, ys, zs = axes if axes is not None else (a.astype(np.float32) for a in grid.axes())
    lo, hi = ell.bounds()
    i0, i1 = _ranges(xs, lo[0], hi[0])
    j0, j1 = _ranges(ys, lo[1], hi[1])
    k0, k1 = _ranges(zs, lo[2], hi[2])
    box = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
    if i0 >= i1 or j0 >= j1 or k0 >= k1:
        return None, box
    return ell.contains_grid(xs[i0:i1], ys[j0:j1], zs[k0:k1]), box


def _sigma_vox(fwhm_mm: float, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
    """Gaussian sigma in voxels, (z, y, x) order; axes where it is negligible get 0."""
    s = [fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / sp for sp in spacing]
    return tuple(0.0 if v < 0.15 else v for v in (s[2], s[1], s[0]))  # type: ignore[return-value]


def _block_mean(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    fx, fy, fz = factors
    if (fx, fy, fz) == (1, 1, 1):
        return a
    nk, nj, ni = a.shape
    return a.reshape(nk // fz, fz, nj // fy, fy, ni // fx, fx).mean(axis=(1, 3, 5), dtype=np.float32)


def _noise_gain(sigma: tuple[float, float, float]) -> float:
    """Standard deviation of unit white noise after scipy's Gaussian filter with ``sigma`` (truncate 3)."""
    g = 1.0
    for s in sigma:
        if s > 0:
            r = int(3.0 * s + 0.5)
            w = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
            w /= w.sum()
            g *= float(np.sqrt((w * w).sum()))
    return g


def _blur(a: np.ndarray, sigma: tuple[float, float, float]) -> np.ndarray:
    """Gaussian filter (truncate 3); in place slab by slab when there is no blur along z (bounded memory)."""
    if not any(sigma):
        return a
    if sigma[0] > 0:
        return ndimage.gaussian_filter(a, sigma, mode="nearest", truncate=3.0)
    for k0 in range(0, a.shape[0], 32):
        a[k0:k0 + 32] = ndimage.gaussian_filter(a[k0:k0 + 32], sigma, mode="nearest", truncate=3.0)
    return a


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, float, float]
                      ) -> np.ndarray:
    n = rng.standard_normal(size=shape, dtype=np.float32)
    if any(sigma):
        n = ndimage.gaussian_filter(n, sigma, mode="wrap", truncate=3.0)
        n /= np.float32(_noise_gain(sigma))
    return n


def render_ct(anatomy: Anatomy, grid: Grid, lesions: Sequence[LesionShape], rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """CT in HU (int16, clipped to [-1024, 3071]) and the structure label map on ``grid``."""
    f = grid.subvoxel_factors()
    if f == (1, 1, 1):
        p = paint(anatomy, grid, values=True, labels=True, lesions=lesions)
        labels = p["labels"]
    else:
        p = paint(anatomy, grid.refined(f), values=True, labels=False, lesions=lesions)
        labels = paint(anatomy, grid, values=False, labels=True)["labels"]
    fine_spacing = tuple(s / k for s, k in zip(grid.spacing, f, strict=True))
    hu = p.pop("hu")
    del p
    # White noise added before the PSF blur and the block average, scaled so that the final
    # standard deviation is CT_NOISE_HU; the PSF gives it a realistic fine-grain correlation.
    sigma = _sigma_vox(CT_FWHM_MM, fine_spacing)  # type: ignore[arg-type]
    amp = np.float32(CT_NOISE_HU * math.sqrt(f[0] * f[1] * f[2]) / _noise_gain(sigma))
    for k0 in range(0, hu.shape[0], 32):  # slab-wise: bounded memory, same stream order
        sl = hu[k0:k0 + 32]
        sl += rng.standard_normal(size=sl.shape, dtype=np.float32) * amp
    hu = _blur(hu, sigma)
    hu = _block_mean(hu, f)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    np.rint(hu, out=hu)
    return hu.astype(np.int16), labels


def render_pet(anatomy: Anatomy, grid: Grid, lesions: Sequence[LesionShape], rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """PET in SUVbw (float32, >= 0) and the structure label map on ``grid``."""
    f = grid.subvoxel_factors()
    if f == (1, 1, 1):
        p = paint(anatomy, grid, values=True, labels=True, lesions=lesions)
        labels = p["labels"]
    else:
        p = paint(anatomy, grid.refined(f), values=True, labels=False, lesions=lesions)
        labels = paint(anatomy, grid, values=False, labels=True)["labels"]
    fine_spacing = tuple(s / k for s, k in zip(grid.spacing, f, strict=True))
    suv = p.pop("suv")
    del p
    suv = _blur(suv, _sigma_vox(PET_FWHM_MM, fine_spacing))  # type: ignore[arg-type]
    suv = _block_mean(suv, f)
    np.maximum(suv, 0.0, out=suv)
    noise = _correlated_noise(rng, suv.shape, _sigma_vox(PET_FWHM_MM / 2.0, grid.spacing))
    suv += noise * np.float32(PET_COV) * np.sqrt(suv * np.float32(PET_NOISE_REF_SUV))
    np.maximum(suv, 0.0, out=suv)
    return suv.astype(np.float32, copy=False), labels
