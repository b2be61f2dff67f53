"""Deterministic lesion placement in labelled phantom structures, with ground truth.

A lesion is a solid ellipsoid (random size, axis ratios and orientation) with uniform
FDG uptake and a CT number that depends on its host (hypodense in liver, soft-tissue
nodule in lung, lytic or sclerotic in bone).  Placement rules, all checked
analytically with :meth:`Anatomy.owner` so they hold on every grid:

* the centre, and the voxel centre nearest to it on every output grid (CT and PET),
  belong to the host structure: the label map at the lesion centre names its site;
* points at half the radius along each principal axis belong to the host, so most of
  the lesion lies inside it (bone lesions may expand the cortex, as they do);
* the whole lesion box lies inside every grid, with at least one voxel on each, so
  a SEG drawn on either grid holds the complete lesion;
* lesions do not touch each other (bounding spheres 2 mm apart), so one label map can
  hold them all and every SEG segment is one connected lesion.

Ground truth per lesion (:class:`LesionTruth`): label value (= SEG segment number),
host structure, library site id, centre, radii and axes, axis-aligned box in LPS mm,
uptake, CT number, analytic volume, tracking UID.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.errors import InputError
from training.phantom.anatomy import Anatomy, Structure
from training.phantom.render import Grid, LesionShape, lesion_mask
from training.phantom.shapes import Ellipsoid

_TRIES_PER_LESION = 400
_POINTS_PER_TRY = 48


@dataclass(frozen=True)
class LesionTruth:
    """Ground truth of one synthetic lesion; coordinates are LPS mm in the phantom's Frame of Reference."""

    label: int  # value in the lesion label maps and SEG segment number (1-based)
    structure: str  # host structure of the body model
    site_id: str  # Locus anatomy library site id of the host
    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]  # rows: principal axes (unit vectors) matching radii_mm
    box_min_mm: tuple[float, float, float]  # axis-aligned box of the ellipsoid
    box_max_mm: tuple[float, float, float]
    suv: float  # uptake (SUVbw) before blur and noise
    hu: float  # CT number before blur and noise
    kind: str  # "soft_tissue", "lytic", "sclerotic"
    volume_ml: float  # analytic ellipsoid volume
    tracking_uid: str
    tracking_id: str

    @property
    def ellipsoid(self) -> Ellipsoid:
        return Ellipsoid(self.center_mm, self.radii_mm, np.asarray(self.axes, dtype=float).T)

    def shape(self) -> LesionShape:
        return LesionShape(self.label, self.ellipsoid, self.hu, self.suv)


def _xyz(v: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _lesion_values(s: Structure, rng: np.random.Generator) -> tuple[float, float, str]:
    """(SUV, HU, kind) for a lesion hosted by ``s``."""
    suv = float(math.exp(rng.uniform(math.log(3.0), math.log(18.0))))
    if suv < 2.0 * s.suv:
        suv = 2.0 * s.suv * float(rng.uniform(1.0, 1.5))
    if s.group == "bone":
        if rng.uniform() < 0.5:
            return suv, float(rng.uniform(40.0, 120.0)), "lytic"
        return suv, float(rng.uniform(700.0, 1100.0)), "sclerotic"
    return suv, float(rng.uniform(28.0, 42.0)), "soft_tissue"


def candidate_structures(anatomy: Anatomy, grids: Sequence[Grid], sites: Sequence[str] | None = None
                         ) -> list[Structure]:
    """Lesion hosts inside every grid's field of view; ``sites`` restricts by structure name or site id."""
    out = []
    for s in anatomy.structures:
        if s.site_id is None:
            continue
        if sites is not None:
            if s.name not in sites and s.site_id not in sites:
                continue
        elif s.lesion_weight <= 0:
            continue
        lo, hi = anatomy.world_bounds(s)
        if all(np.all(hi >= g.bounds()[0]) and np.all(lo <= g.bounds()[1]) for g in grids):
            out.append(s)
    return out


def place_lesions(anatomy: Anatomy, n: int, rng: np.random.Generator, grids: Sequence[Grid], *,
                  radius_range_mm: tuple[float, float], uid: Callable[[str], str],
                  sites: Sequence[str] | None = None) -> tuple[LesionTruth, ...]:
    """Place ``n`` lesions; with ``sites``, lesion i goes into ``sites[i % len(sites)]``.

    Raises :class:`InputError` (``phantom_lesion_placement``) when a lesion cannot be placed,
    e.g. a requested site outside the field of view or too small for the radius range.
    """
    if n < 0:
        raise InputError("the number of lesions must be >= 0", code="phantom_lesion_placement")
    pool = candidate_structures(anatomy, grids, sites)
    if n and not pool:
        raise InputError(f"no lesion host structure lies in the field of view (sites={sites})",
                         code="phantom_lesion_placement")
    placed: list[LesionTruth] = []
    for idx in range(n):
        if sites is not None:
            want = sites[idx % len(sites)]
            hosts = [s for s in pool if want in (s.name, s.site_id)]
            if not hosts:
                raise InputError(f"site {want!r} has no structure in the field of view",
                                 code="phantom_lesion_placement")
        else:
            hosts = pool
        weights = np.array([max(s.lesion_weight, 1e-6) for s in hosts])
        lesion = _place_one(anatomy, idx + 1, hosts, weights / weights.sum(), rng, grids, placed,
                            radius_range_mm, uid)
        if lesion is None:
            raise InputError(f"could not place lesion {idx + 1} after {_TRIES_PER_LESION} tries "
                             f"(radius range {radius_range_mm} mm, {len(hosts)} candidate structures)",
                             code="phantom_lesion_placement")
        placed.append(lesion)
    return tuple(placed)


def _inside_grids(lo: np.ndarray, hi: np.ndarray, grids: Sequence[Grid]) -> bool:
    for g in grids:
        glo, ghi = g.bounds()
        if np.any(lo < glo) or np.any(hi > ghi):
            return False
    return True


def _place_one(anatomy: Anatomy, label: int, hosts: list[Structure], p: np.ndarray, rng: np.random.Generator,
               grids: Sequence[Grid], placed: list[LesionTruth], radius_range: tuple[float, float],
               uid: Callable[[str], str]) -> LesionTruth | None:
    rmin, rmax = radius_range
    for _ in range(_TRIES_PER_LESION):
        s = hosts[int(rng.choice(len(hosts), p=p))]
        host = anatomy.label_of(s.name)
        hi_r = min(rmax, s.lesion_rmax_mm)
        lo_r = min(rmin, hi_r)
        r = float(math.exp(rng.uniform(math.log(lo_r), math.log(hi_r))))
        radii = np.array([r, r * rng.uniform(0.7, 1.0), r * rng.uniform(0.6, 1.0)])
        rot = _random_rotation(rng)
        ell0 = Ellipsoid((0.0, 0.0, 0.0), tuple(radii), rot)
        half = ell0.bounds()[1]
        lo, hi = anatomy.world_bounds(s)
        for g in grids:  # keep the whole lesion inside every grid
            glo, ghi = g.bounds()
            lo, hi = np.maximum(lo, glo + half), np.minimum(hi, ghi - half)
        if np.any(lo >= hi):
            continue
        pts = lo + rng.uniform(size=(_POINTS_PER_TRY, 3)) * (hi - lo)
        ok = np.flatnonzero(anatomy.owner(pts) == host)
        for c in pts[ok[:4]]:
            if any(np.linalg.norm(c - np.asarray(q.center_mm)) < max(q.radii_mm) + radii.max() + 2.0
                   for q in placed):
                continue
            probe = [c + sgn * 0.5 * radii[a] * rot[:, a] for a in range(3) for sgn in (-1.0, 1.0)]
            probe += [g.voxel_center(g.nearest_index(c)) for g in grids]
            if not np.all(anatomy.owner(np.array(probe)) == host):
                continue
            ell = Ellipsoid(tuple(float(v) for v in c), tuple(float(v) for v in radii), rot)  # type: ignore[arg-type]
            blo, bhi = ell.bounds()
            if not _inside_grids(blo, bhi, grids):
                continue
            if any((m := lesion_mask(g, ell)[0]) is None or not m.any() for g in grids):
                continue
            suv, hu, kind = _lesion_values(s, rng)
            return LesionTruth(
                label=label, structure=s.name, site_id=str(s.site_id),
                center_mm=_xyz(c), radii_mm=_xyz(radii),
                axes=(_xyz(rot[:, 0]), _xyz(rot[:, 1]), _xyz(rot[:, 2])),
                box_min_mm=_xyz(blo), box_max_mm=_xyz(bhi),
                suv=suv, hu=hu, kind=kind, volume_ml=float(4.0 / 3.0 * math.pi * np.prod(radii) / 1000.0),
                tracking_uid=uid(f"lesion/{label}"), tracking_id=f"Lesion {label}",
            )
    return None
