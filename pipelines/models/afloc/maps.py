"""Phrase → localization map, the published recipe (AFLoc, YH0517/AFLoc 940e3d7 ``eval/common.py:114-182, 240-283``).

1. raw map ``M[i,j] = Σ_c E[i,j,c]·t[c]`` — layer3 local embeddings (19×19) against the
   **report** embedding of the phrase, unnormalised;
2. ``scipy.ndimage.gaussian_filter`` on the float32 map, σ = 1.5 patches, mode ``reflect``,
   truncate 4.0 (SciPy itself, as upstream);
3. PyTorch bilinear to 224×224, ``align_corners=False`` (the stored reference map);
4. optionally the evaluation margin: the outer 14 pixels set to NaN;
5. min–max to [−1, 1] over the non-NaN pixels.

The result is relative evidence, not a presence score: min–max always stretches to the full
range, so every phrase has a peak even when the finding is absent (see MODEL_CARD.md, Maps).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from pipelines.errors import ModelError

SIGMA = 1.5
MAP_SIZE = 224
#: ``set_margin`` defaults: ``(224 − int(448·224/512)) / 2`` = 14 pixels each side (``eval/common.py``).
MARGIN = (MAP_SIZE - int(448 * MAP_SIZE / 512)) // 2
#: ``numpy.arange(0.1, 0.6, 0.1)`` — the exact floats (0.30000000000000004 included), strict ``>``.
THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.arange(0.1, 0.6, 0.1))


def raw_map(local: torch.Tensor, report: torch.Tensor) -> np.ndarray:
    """``local`` ``[D,19,19]`` (or ``[1,D,19,19]``) · ``report`` ``[D]`` → float32 ``[19,19]``."""
    if local.ndim == 4:
        if local.shape[0] != 1:
            raise ModelError("raw_map takes one image's local embeddings", code="afloc_map_input")
        local = local[0]
    iel = local.permute(1, 2, 0)  # [19, 19, D]: row, column, channel (inference.py:45-50)
    m = iel @ report.reshape(-1, 1).to(iel.dtype)
    return m[..., 0].detach().cpu().numpy().astype(np.float32, copy=False)


def smooth(raw: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """Gaussian σ (patch units), reflect, truncate 4, float32 in → float32 out (SciPy, as upstream)."""
    return gaussian_filter(np.asarray(raw, dtype=np.float32), sigma=(sigma, sigma))


def upsample(smoothed: np.ndarray, size: int = MAP_SIZE) -> np.ndarray:
    """PyTorch bilinear, ``align_corners=False``, to ``size``² float32 (the reference's stored map)."""
    t = torch.from_numpy(np.ascontiguousarray(smoothed, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def set_margin(m: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    """Blank a border to NaN as the evaluation protocol does, so min-max and thresholds ignore the padded edge."""
    out = np.array(m, dtype=np.float32, copy=True)
    if margin > 0:
        out[:margin, :] = np.nan
        out[-margin:, :] = np.nan
        out[:, :margin] = np.nan
        out[:, -margin:] = np.nan
    return out


def minmax(m: np.ndarray) -> np.ndarray:
    """``(m − min)/(max − min)·2 − 1`` over non-NaN pixels; NaN stay NaN.

    A constant map has no relative evidence: upstream returns a flattened array there (a bug in
    ``eval/common.py``); Locus raises instead of producing a map.
    """
    lo, hi = np.nanmin(m), np.nanmax(m)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi == lo:
        raise ModelError("localization map is constant; no relative evidence to show", code="afloc_flat_map")
    return (m - lo) / (hi - lo) * 2 - 1


def stored_map(local: torch.Tensor, report: torch.Tensor) -> np.ndarray:
    """Steps 1–3: the unnormalised float32 ``[224,224]`` map the reference stores per image and phrase."""
    return upsample(smooth(raw_map(local, report)))


def localization_map(local: torch.Tensor, report: torch.Tensor, *, margin: bool) -> np.ndarray:
    """The full recipe: float32 ``[224,224]`` in [−1, 1].

    ``margin=True`` is the evaluation protocol (``inference.py:84``: 14-pixel NaN border before
    min–max); ``margin=False`` normalises the whole map (display).  No default: the two differ
    inside the frame too, because the border changes min and max.
    """
    up = stored_map(local, report)
    return minmax(set_margin(up) if margin else up)


def masks(m: np.ndarray) -> dict[float, np.ndarray]:
    """``map > thr`` (strict; NaN is never selected) for the five reference thresholds (``eval/common.py``)."""
    with np.errstate(invalid="ignore"):
        return {thr: np.asarray(m > thr) for thr in THRESHOLDS}
