"""Where a token of the HLIP grid lies in the patient (LPS), through the preprocessing's own geometry.

Token order (ItemizedCLIP, arXiv 2512.11141): token ``i = d·(h_n·w_n) + h·w_n + w`` with ``(d, h, w)``
the patch-grid indices along the model input's axes 3, 4, 5 — ``[B, N, C, D, H, W]`` — which
the chest preprocessing (:mod:`pipelines.models.study_encoder.preprocess`) fills as
``(z, y, x)`` of the canonical array (identity direction cosines, +x = patient left,
+y = posterior, +z = superior).  Token ``(d, h, w)`` covers crop voxels
``[pd·d, pd·d + pd) × [ph·h, ph·h + ph) × [pw·w, pw·w + pw)``.

The crop voxel → patient mapping is the one the preprocessing recorded in
:class:`~pipelines.models.study_encoder.preprocess.PreparedInput` (``crop_lps_min`` /
``crop_lps_max``: the LPS of the crop's first and last voxel centres, computed there from the
pad/crop offsets, the ``align_corners=False`` resampling map ``src = (i + 0.5)·n0/n − 0.5`` and
the canonical origin and spacing — §6 "Mapping a token back").  It is linear per axis, so the
affine here is exact, including crops that start in the zero padding.

Maps are returned in the input's axis order ``[d, h, w]`` = ``[z, y, x]``, i.e. directly as a
:class:`~pipelines.dicom.volume.Volume` array ``[k, j, i]`` whose affine maps token indices to
the LPS of the token **centre**; :meth:`TokenGrid.upsample` gives the nearest-neighbour
``pd × ph × pw`` block version on the crop grid (the upstream display rule, §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.dicom.volume import Volume
from pipelines.errors import ModelError
from pipelines.models.study_encoder.preprocess import PreparedInput


def crop_affine_lps(prepared: PreparedInput) -> np.ndarray:
    """4×4 affine of the preprocessed crop: index ``(i, j, k)`` = ``(x, y, z)`` of ``[z, y, x]`` → LPS mm."""
    d, h, w = prepared.tensor.shape[-3:]
    lo, hi = np.asarray(prepared.crop_lps_min, dtype=np.float64), np.asarray(prepared.crop_lps_max, dtype=np.float64)
    n = np.array([w, h, d], dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = np.diag((hi - lo) / np.maximum(n - 1, 1))  # canonical crop: identity direction cosines
    aff[:3, 3] = lo
    return aff


@dataclass(frozen=True)
class TokenGrid:
    """The patch-token grid of one preprocessed input, placed in patient LPS."""

    grid: tuple[int, int, int]  # (d, h, w) tokens along (z, y, x)
    patch: tuple[int, int, int]  # (pd, ph, pw) crop voxels per token
    crop_affine: np.ndarray  # crop voxel index (x, y, z) → LPS
    frame_of_reference_uid: str = ""

    @classmethod
    def from_prepared(cls, prepared: PreparedInput, patch: tuple[int, int, int], frame_of_reference_uid: str = "",
                      ) -> TokenGrid:  # fmt: skip
        """The token grid of a prepared input, checking the crop is a whole number of patches."""
        size = tuple(int(s) for s in prepared.tensor.shape[-3:])
        if any(s % p for s, p in zip(size, patch, strict=True)):
            raise ModelError(f"crop {size} is not a multiple of the patch {patch}", code="hlip_input_shape")
        grid = tuple(s // p for s, p in zip(size, patch, strict=True))
        patch_dhw = tuple(int(p) for p in patch)
        return cls(grid, patch_dhw, crop_affine_lps(prepared), frame_of_reference_uid)  # type: ignore[arg-type]

    @property
    def n_tokens(self) -> int:
        """Number of patch tokens."""
        return int(np.prod(self.grid))

    @property
    def affine(self) -> np.ndarray:
        """Token index ``(w, h, d)`` → LPS of the token centre (a :class:`Volume` affine for ``[d, h, w]`` maps)."""
        pd, ph, pw = self.patch
        scale = np.diag([pw, ph, pd, 1.0])
        scale[:3, 3] = [(pw - 1) / 2, (ph - 1) / 2, (pd - 1) / 2]  # centre of the first block, in crop voxels
        return self.crop_affine @ scale

    def reshape(self, token_values: np.ndarray) -> np.ndarray:
        """``[..., L]`` token values (null slot already removed) → ``[..., d, h, w]`` in the input's axis order."""
        arr = np.asarray(token_values)
        if arr.shape[-1] != self.n_tokens:
            raise ModelError(f"{arr.shape[-1]} token values for a {self.grid} grid", code="map_shape")
        return arr.reshape(*arr.shape[:-1], *self.grid)

    def token_centre_lps(self, dhw: tuple[int, int, int] | np.ndarray) -> np.ndarray:
        """LPS mm ``[..., 3]`` of the centre of token(s) ``(d, h, w)``."""
        dhw = np.atleast_2d(np.asarray(dhw, dtype=np.float64))
        ijk = dhw[:, ::-1]  # (w, h, d) = (x, y, z) index order of the affine
        out = ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
        return out

    def token_box_lps(self, dhw: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) LPS corners of the voxel edges the token covers (crop voxel-edge convention)."""
        d, h, w = dhw
        pd, ph, pw = self.patch
        first = np.array([w * pw - 0.5, h * ph - 0.5, d * pd - 0.5, 1.0])
        last = np.array([(w + 1) * pw - 0.5, (h + 1) * ph - 0.5, (d + 1) * pd - 0.5, 1.0])
        a, b = (self.crop_affine @ first)[:3], (self.crop_affine @ last)[:3]
        return np.minimum(a, b), np.maximum(a, b)

    def token_volume(self, token_map: np.ndarray, *, series_instance_uid: str = "") -> Volume:
        """A ``[d, h, w]`` map as a :class:`Volume` on the token grid (one voxel per token, centre-placed)."""
        arr = np.asarray(token_map)
        if arr.shape != self.grid:
            raise ModelError(f"map of shape {arr.shape} for a {self.grid} grid", code="map_shape")
        return Volume(np.ascontiguousarray(arr), self.affine.copy(), frame_of_reference_uid=self.frame_of_reference_uid,
                      series_instance_uid=series_instance_uid, modality="OT")  # fmt: skip

    def upsample(self, token_map: np.ndarray, *, series_instance_uid: str = "") -> Volume:
        """Nearest-neighbour block upsampling to the crop grid (each token → one ``pd×ph×pw`` block)."""
        arr = np.asarray(token_map)
        if arr.shape != self.grid:
            raise ModelError(f"map of shape {arr.shape} for a {self.grid} grid", code="map_shape")
        pd, ph, pw = self.patch
        up = np.repeat(np.repeat(np.repeat(arr, pd, axis=0), ph, axis=1), pw, axis=2)
        return Volume(np.ascontiguousarray(up), self.crop_affine.copy(),
                      frame_of_reference_uid=self.frame_of_reference_uid, series_instance_uid=series_instance_uid,
                      modality="OT")  # fmt: skip

    def peak(self, token_map: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
        """``((d, h, w), LPS centre)`` of the largest value (first in token order on ties)."""
        arr = np.asarray(token_map)
        if arr.shape != self.grid:
            raise ModelError(f"map of shape {arr.shape} for a {self.grid} grid", code="map_shape")
        d, h, w = (int(v) for v in np.unravel_index(int(np.argmax(arr)), self.grid))
        return (d, h, w), self.token_centre_lps((d, h, w))[0]

    def to_json(self) -> dict[str, object]:
        """The grid as JSON, stored beside the maps so they can be placed again."""
        return {"grid_dhw": list(self.grid), "patch_dhw": list(self.patch),
                "token_affine_lps": np.round(self.affine, 6).tolist(),
                "frame_of_reference_uid": self.frame_of_reference_uid}  # fmt: skip
