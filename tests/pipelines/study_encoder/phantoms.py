"""Synthetic CT phantoms with known geometry (HU values, LPS placement)."""

from __future__ import annotations

import numpy as np

from pipelines.dicom.volume import Volume


def axial_affine(spacing_ijk: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = np.diag(spacing_ijk)
    aff[:3, 3] = origin
    return aff


def torso(n_slices: int, dz: float, z0: float, lung_z: tuple[float, float] | None, *, n: int = 96,
          dxy: float = 5.0) -> Volume:  # fmt: skip
    """Elliptic body (40 HU) in air (−1000 HU); two lung ellipsoids (−850 HU) between ``lung_z`` mm."""
    k, j, i = np.meshgrid(np.arange(n_slices), np.arange(n), np.arange(n), indexing="ij")
    x = -(n - 1) / 2 * dxy + i * dxy
    y = -(n - 1) / 2 * dxy + j * dxy
    z = z0 + k * dz
    arr = np.full(k.shape, -1000.0, dtype=np.float32)
    arr[(x / 170) ** 2 + (y / 120) ** 2 <= 1] = 40.0
    if lung_z is not None:
        zc, zh = (lung_z[0] + lung_z[1]) / 2, (lung_z[1] - lung_z[0]) / 2
        for cx in (-70.0, 70.0):
            arr[((x - cx) / 55) ** 2 + ((y + 10) / 70) ** 2 + ((z - zc) / zh) ** 2 <= 1] = -850.0
    origin = (-(n - 1) / 2 * dxy, -(n - 1) / 2 * dxy, z0)
    return Volume(arr, axial_affine((dxy, dxy, dz), origin), series_instance_uid="1.2.3.4", modality="CT")


def flipped_copy(v: Volume) -> Volume:
    """Same patient-space image stored with k reversed and i reversed (different affine, same anatomy)."""
    arr = v.array[::-1, :, ::-1].copy()
    aff = v.affine.copy()
    ni, nk = v.array.shape[2], v.array.shape[0]
    aff[:3, 3] = v.index_to_lps(np.array([ni - 1, 0, nk - 1]))[0]
    aff[:3, 0] *= -1
    aff[:3, 2] *= -1
    return Volume(arr, aff, series_instance_uid=v.series_instance_uid, modality="CT")
