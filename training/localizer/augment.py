"""Crop-grid augmentation of HCL-AL's training recipe, with the rotation defect fixed.

HCL-AL (Gao et al. 2025) jitters the crop centre by up to ±3 mm, rotates the crop
with probability 0.5 about an axis drawn uniformly on the sphere by 0-10°, and scales it
isotropically with probability 0.5 by a ratio in [0.8, 1.2] (crop spacing / ratio); no
flips.  Its rotation turns the crop *direction* but keeps the *origin*, so the crop
centre swings away from the lesion (bug T1: mean 16 mm, up to 41 mm for the coarse crop).
Here the grid is rotated about the (jittered) crop centre: the voxel ``size/2`` that the
unaugmented crop puts on the lesion centre (convention B3) still lands on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """One crop-grid perturbation: world shift (mm), rotation (3x3, columns = crop axes), spacing ratio."""

    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    ratio: float = 1.0

    @property
    def is_identity(self) -> bool:
        return not any(self.shift_mm) and self.ratio == 1.0 and bool(np.array_equal(self.rotation, np.eye(3)))


@dataclass(frozen=True)
class AugmentationConfig:
    """HCL-AL's published values (§15)."""

    jitter_mm: float = 3.0
    p_rotate: float = 0.5
    max_angle_deg: float = 10.0
    p_scale: float = 0.5
    ratio_range: tuple[float, float] = (0.8, 1.2)


def rotation_matrix(axis: Sequence[float] | np.ndarray, angle_rad: float) -> np.ndarray:
    """Rodrigues' rotation about a unit ``axis``."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1.0 - math.cos(angle_rad)) * (k @ k)


def sample_augmentation(rng: np.random.Generator, cfg: AugmentationConfig = AugmentationConfig()) -> Augmentation:
    shift = tuple(float(v) for v in rng.uniform(-cfg.jitter_mm, cfg.jitter_mm, size=3))
    rot = np.eye(3)
    if rng.uniform() < cfg.p_rotate:
        axis = rng.standard_normal(3)  # isotropic Gaussian direction = uniform on the sphere
        rot = rotation_matrix(axis, math.radians(float(rng.uniform(0.0, cfg.max_angle_deg))))
    ratio = float(rng.uniform(*cfg.ratio_range)) if rng.uniform() < cfg.p_scale else 1.0
    return Augmentation(shift, rot, ratio)  # type: ignore[arg-type]


def crop_grid(centre: Sequence[float], spacing: Sequence[float], size: Sequence[int], aug: Augmentation
              ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) of an augmented crop, rotated about its own centre.

    Unaugmented this is the inference grid: origin ``centre - size*spacing/2``, identity
    direction (crop.py, B3).  With a rotation R the origin is ``c - R·(size*spacing/2)``, so
    the voxel at index ``size/2`` stays on ``c`` (T1 fixed).
    """
    sp = np.asarray(spacing, dtype=np.float64) / aug.ratio
    c = np.asarray(centre, dtype=np.float64) + np.asarray(aug.shift_mm)
    half = np.asarray(size, dtype=np.float64) * sp / 2.0
    origin = c - aug.rotation @ half
    return tuple(float(v) for v in origin), tuple(float(v) for v in sp), tuple(float(v) for v in aug.rotation.ravel())
