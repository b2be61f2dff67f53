"""Analytic solids for the phantom body model, evaluated on voxel grids or point lists.

Every shape answers one question, ``contains(x, y, z)``: which of these points lie
inside?  ``x``, ``y`` and ``z`` are numpy arrays that broadcast against each other, so
the same code serves a point list (three ``(N,)`` arrays) and an axis-aligned voxel
grid (``(1, 1, ni)``, ``(1, nj, 1)``, ``(nk, 1, 1)``, giving a ``(nk, nj, ni)`` mask in
the ``[k, j, i]`` order of :class:`pipelines.dicom.volume.Volume`).  Coordinates are
patient LPS millimetres (DICOM PS3.3 C.7.6.2.1.1): +x to the patient's left, +y
posterior, +z superior.

Arithmetic is float32 on purpose: the whole-body preset evaluates ~10^9 voxel tests
and float32 halves the memory traffic; coordinates up to 2 m keep ~0.1 µm resolution.
:meth:`Shape.contains_grid` lets composite shapes evaluate each child only inside the
child's own bounding box, which is what keeps ribs (unions of many short capsules)
cheap.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

F = np.float32
_INF = np.float32(np.inf)


def _f(v: ArrayLike) -> np.ndarray:
    return np.asarray(v, dtype=F)


def _sub_range(axis: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Index range [a, b) of a sorted 1-D coordinate array lying within [lo, hi]."""
    a = int(np.searchsorted(axis, lo, side="left"))
    b = int(np.searchsorted(axis, hi, side="right"))
    return a, b


class Shape(abc.ABC):
    """Base class: a closed region of space with an axis-aligned bounding box."""

    @abc.abstractmethod
    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the points (broadcast arrays of LPS mm) inside the shape."""

    @abc.abstractmethod
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) corners, float64 (3,), of a box enclosing the shape."""

    def contains_grid(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        """Mask ``(nk, nj, ni)`` for the grid spanned by sorted 1-D axes xs, ys, zs."""
        out = self.contains(xs[None, None, :], ys[None, :, None], zs[:, None, None])
        return np.broadcast_to(out, (zs.size, ys.size, xs.size))


@dataclass(frozen=True)
class Ellipsoid(Shape):
    """Ellipsoid with semi-axes ``radii`` along the columns of ``rotation`` (identity: x, y, z)."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    rotation: np.ndarray | None = None

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        c = _f(self.center)
        dx, dy, dz = _f(x) - c[0], _f(y) - c[1], _f(z) - c[2]
        r = _f(self.radii)
        if self.rotation is None:
            return (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2 <= 1
        rot = _f(self.rotation)
        acc = np.zeros_like(dx)  # broadcasts up to the full grid on the first addition
        for a in range(3):  # coordinate along the a-th principal axis
            u = (dx * rot[0, a] + dy * rot[1, a] + dz * rot[2, a]) / r[a]
            acc = acc + u * u
        return acc <= 1

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        rot = np.eye(3) if self.rotation is None else np.asarray(self.rotation, float)
        half = np.sqrt(((rot * np.asarray(self.radii, float)[None, :]) ** 2).sum(axis=1))
        c = np.asarray(self.center, float)
        return c - half, c + half


@dataclass(frozen=True)
class Capsule(Shape):
    """All points within ``radius`` of the segment p0-p1 (a cylinder with round caps)."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    radius: float

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        p0, p1 = _f(self.p0), _f(self.p1)
        d = p1 - p0
        dd = F(max(float(d @ d), 1e-12))
        dx, dy, dz = _f(x) - p0[0], _f(y) - p0[1], _f(z) - p0[2]
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / dd, 0, 1)
        ex, ey, ez = dx - t * d[0], dy - t * d[1], dz - t * d[2]
        return ex * ex + ey * ey + ez * ez <= F(self.radius) ** 2

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        p = np.array([self.p0, self.p1], float)
        return p.min(0) - self.radius, p.max(0) + self.radius


@dataclass(frozen=True)
class Box(Shape):
    """Box with half-sizes ``half`` along the columns of ``rotation``."""

    center: tuple[float, float, float]
    half: tuple[float, float, float]
    rotation: np.ndarray | None = None

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        c = _f(self.center)
        dx, dy, dz = _f(x) - c[0], _f(y) - c[1], _f(z) - c[2]
        h = _f(self.half)
        rot = np.eye(3, dtype=F) if self.rotation is None else _f(self.rotation)
        out: np.ndarray | None = None
        for a in range(3):
            u = np.abs(dx * rot[0, a] + dy * rot[1, a] + dz * rot[2, a]) <= h[a]
            out = u if out is None else out & u
        assert out is not None
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        rot = np.eye(3) if self.rotation is None else np.asarray(self.rotation, float)
        half = np.abs(rot * np.asarray(self.half, float)[None, :]).sum(axis=1)
        c = np.asarray(self.center, float)
        return c - half, c + half


@dataclass(frozen=True)
class ZSweep(Shape):
    """A stack of axial ellipses whose centre and semi-axes vary piecewise-linearly with z.

    ``knots`` rows are ``(z, cx, cy, rx, ry)`` with z strictly increasing; outside
    [z_first, z_last] the shape is empty.  Body outlines, limbs, lungs and vertebral
    bodies are all sweeps.
    """

    knots: tuple[tuple[float, float, float, float, float], ...]

    def _params(self, z: np.ndarray) -> tuple[np.ndarray, ...]:
        k = np.asarray(self.knots, float)
        zf = np.asarray(z, dtype=F)
        cols = [np.interp(zf, k[:, 0], k[:, c]).astype(F) for c in range(1, 5)]
        inside = (zf >= k[0, 0]) & (zf <= k[-1, 0])
        return (*cols, inside)

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        cx, cy, rx, ry, inside = self._params(z)
        u = (_f(x) - cx) / rx
        v = (_f(y) - cy) / ry
        return (u * u + v * v <= 1) & inside

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        k = np.asarray(self.knots, float)
        lo = [(k[:, 1] - k[:, 3]).min(), (k[:, 2] - k[:, 4]).min(), k[0, 0]]
        hi = [(k[:, 1] + k[:, 3]).max(), (k[:, 2] + k[:, 4]).max(), k[-1, 0]]
        return np.array(lo), np.array(hi)

    def shrunk(self, d: float, dz: float = 0.0) -> ZSweep:
        """The same sweep with semi-axes reduced by ``d`` mm and z ends trimmed by ``dz``."""
        k = np.asarray(self.knots, float).copy()
        k[:, 3:5] = np.maximum(k[:, 3:5] - d, 1.0)
        k[0, 0] += dz
        k[-1, 0] -= dz
        return ZSweep(tuple((float(z), float(cx), float(cy), float(rx), float(ry)) for z, cx, cy, rx, ry in k))


@dataclass(frozen=True)
class HalfSpace(Shape):
    """Points with ``normal · (p − point) >= 0``; unbounded (only used inside intersections)."""

    point: tuple[float, float, float]
    normal: tuple[float, float, float]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        p, n = _f(self.point), _f(self.normal)
        return (_f(x) - p[0]) * n[0] + (_f(y) - p[1]) * n[1] + (_f(z) - p[2]) * n[2] >= 0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -np.inf), np.full(3, np.inf)

    def flipped(self) -> HalfSpace:
        return HalfSpace(self.point, tuple(-v for v in self.normal))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Union(Shape):
    parts: tuple[Shape, ...]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = self.parts[0].contains(x, y, z)
        for p in self.parts[1:]:
            out = out | p.contains(x, y, z)
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        bs = [p.bounds() for p in self.parts]
        return np.min([b[0] for b in bs], axis=0), np.max([b[1] for b in bs], axis=0)

    def contains_grid(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        out = np.zeros((zs.size, ys.size, xs.size), dtype=bool)
        for p in self.parts:
            lo, hi = p.bounds()
            i0, i1 = _sub_range(xs, lo[0], hi[0])
            j0, j1 = _sub_range(ys, lo[1], hi[1])
            k0, k1 = _sub_range(zs, lo[2], hi[2])
            if i0 < i1 and j0 < j1 and k0 < k1:
                out[k0:k1, j0:j1, i0:i1] |= p.contains_grid(xs[i0:i1], ys[j0:j1], zs[k0:k1])
        return out


@dataclass(frozen=True)
class Intersection(Shape):
    parts: tuple[Shape, ...]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = self.parts[0].contains(x, y, z)
        for p in self.parts[1:]:
            out = out & p.contains(x, y, z)
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        bs = [p.bounds() for p in self.parts]
        return np.max([b[0] for b in bs], axis=0), np.min([b[1] for b in bs], axis=0)

    def contains_grid(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        out = np.broadcast_to(self.parts[0].contains_grid(xs, ys, zs), (zs.size, ys.size, xs.size)).copy()
        for p in self.parts[1:]:
            out &= p.contains_grid(xs, ys, zs)
        return out


@dataclass(frozen=True)
class Difference(Shape):
    """``base`` minus every shape in ``holes``."""

    base: Shape
    holes: tuple[Shape, ...] = field(default_factory=tuple)

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        out = self.base.contains(x, y, z)
        for h in self.holes:
            out = out & ~h.contains(x, y, z)
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.base.bounds()


def polytube(points: Sequence[Sequence[float]], radius: float | Sequence[float]) -> Union:
    """A tube along a polyline: consecutive capsules (radius per segment or one for all)."""
    pts = [tuple(float(v) for v in p) for p in points]
    n = len(pts) - 1
    radii = [float(radius)] * n if isinstance(radius, (int, float, np.number)) else [float(r) for r in radius]
    if len(radii) != n:
        raise ValueError("one radius per segment expected")
    return Union(tuple(Capsule(pts[i], pts[i + 1], radii[i]) for i in range(n)))  # type: ignore[arg-type]


def frame_from_axis(axis: Sequence[float], secondary: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Orthonormal 3x3 matrix whose first column is ``axis`` (normalised).

    The second column is the part of ``secondary`` orthogonal to ``axis``; used to
    orient ellipsoids (heart, spleen, kidneys) by their long axis.
    """
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    s = np.asarray(secondary, float)
    s = s - (s @ a) * a
    if np.linalg.norm(s) < 1e-6:
        s = np.array([1.0, 0.0, 0.0]) - a[0] * a
    s = s / np.linalg.norm(s)
    t = np.cross(a, s)
    return np.stack([a, s, t], axis=1)


def rotation_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
