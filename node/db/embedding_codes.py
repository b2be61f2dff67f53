"""int8 codes of study embeddings with a guaranteed cosine error bound (the search's first pass).

Exact search over 100,000 x 512 float32 vectors is dominated by reading them (~200 MB; about
0.6 s from PostgreSQL).  The packs therefore also hold, per vector ``v`` (float32, dim ``d``):

* ``codes``: int8 ``c = round(v / s)`` with the symmetric per-vector scale ``s = max|v_i| / 127``
  (stored as float32, so ``s * c`` is exact in float64);
* ``norm``: ``|v|`` (float32, nearest);
* ``residual_norm``: ``|v - s * c|`` rounded **up** to float32.

A query reads those (a quarter of the bytes) and gets, for every candidate, an interval that
provably contains the score the exact float32 path (:func:`node.similarity.cosine`) computes:
with ``q̂ = q / |q|`` and ``v = s c + r``, ``cos(v, q) = (s / |v|) (c · q̂) + (r · q̂) / |v|`` and
``|r · q̂| <= |r|`` (Cauchy-Schwarz), so the real cosine lies within ``|r| / |v|`` of the
estimate.  Floating-point rounding is bounded with the standard inner-product bound
``|fl(x · y) - x · y| <= γ_d Σ|x_i y_i|``, ``γ_d = d u / (1 - d u)``, ``u = 2^-24`` (Higham,
*Accuracy and Stability of Numerical Algorithms*, §3.1; it holds for any summation order,
SIMD or FMA included), applied both to the float32 reference score and to the estimate, and
then doubled.  Vectors whose float32 norm could under- or overflow get an unbounded interval
(always re-scored exactly); zero vectors score exactly 0, as :func:`node.similarity.cosine`
defines.

This module is the format's single definition: the pack writer, :func:`verify
<node.db.embedding_packs.verify>` and the search all use it (migration 0003 carries a frozen copy
of :func:`quantize` for its backfill; ``verify`` checks the two agree bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Largest code magnitude: symmetric int8 (-127..127; -128 is never produced).
CODE_MAX = 127
#: Unit roundoff of float32.
U32 = 2.0**-24
#: |v| (and |q|) outside this range is not bounded (float32 |v|^2 could leave the normal range).
SAFE_NORM = (1e-15, 1e15)


@dataclass(frozen=True)
class Codes:
    """Quantized copy of ``[n, d]`` float32 vectors (arrays little-endian as stored)."""

    codes: np.ndarray  # int8 [n, d]
    scales: np.ndarray  # float32 [n]
    norms: np.ndarray  # float32 [n]
    residual_norms: np.ndarray  # float32 [n], rounded up; +inf where v is not finite


def quantize(vectors: np.ndarray) -> Codes:
    """The int8 codes of each row (deterministic: the same vector always gives the same bytes)."""
    v = np.asarray(vectors, dtype=np.float32).astype(np.float64)
    n, _ = v.shape
    finite = np.asarray(np.isfinite(v).all(axis=1)) if n else np.ones(0, bool)
    v = np.where(finite[:, None], v, 0.0)
    peak = np.abs(v).max(axis=1) if v.size else np.zeros(n)
    scales = (peak / CODE_MAX).astype(np.float32)
    s = scales.astype(np.float64)
    codes = np.clip(np.rint(v / np.where(s > 0, s, 1.0)[:, None]), -CODE_MAX, CODE_MAX)
    residual = v - s[:, None] * codes
    res = np.sqrt(np.einsum("ij,ij->i", residual, residual)) * (1 + 1e-12)  # float64 sum error, far below
    res32 = res.astype(np.float32)
    res32 = np.where(res32.astype(np.float64) < res, np.nextafter(res32, np.float32(np.inf)), res32)
    res32 = np.where(finite, res32, np.float32(np.inf)).astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v)).astype(np.float32)
    return Codes(codes.astype(np.int8), scales, norms, res32)


def query_direction(query: np.ndarray) -> np.ndarray | None:
    """``q / |q|`` as float32, or None when the query cannot be bounded (zero, tiny, huge or not finite)."""
    q = np.asarray(query, dtype=np.float64)
    qn = float(np.sqrt(q @ q)) if np.isfinite(q).all() else float("nan")
    if not SAFE_NORM[0] <= qn <= SAFE_NORM[1]:
        return None
    return (q / qn).astype(np.float32)


def code_dots(codes: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``c · q̂`` per row in float32 (int8 → float32 is exact; the rounding is bounded in :func:`bounds`)."""
    return codes.astype(np.float32) @ direction


def bounds(dots: np.ndarray, scales: np.ndarray, norms: np.ndarray, residual_norms: np.ndarray,
           dim: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(lo, hi)`` per candidate, float64, containing the exact float32 cosine score.

    ``dots`` from :func:`code_dots`; the query was accepted by :func:`query_direction`.
    """
    gamma = dim * U32 / (1 - dim * U32)
    n = norms.astype(np.float64)
    ok = (n >= SAFE_NORM[0]) & (n <= SAFE_NORM[1]) & np.isfinite(residual_norms)
    safe_n = np.where(ok, n, 1.0)
    est = scales.astype(np.float64) / safe_n * dots.astype(np.float64)
    h = residual_norms.astype(np.float64) / safe_n * (1 + 4 * U32)  # stored |v| is within u of the real one
    # estimate: dot rounding γ_d |c||q̂|, q̂ and |v| rounding a few u, with s|c| <= |v| + |r|; reference
    # score: γ_d for the dot, γ_d/2 + u for each norm, u for the product and the quotient.  Doubled.
    margin = 2 * ((1 + np.where(ok, h, 0.0)) * (gamma + 6 * U32) + 2 * gamma + 8 * U32) + 4 * U32 * np.abs(est)
    lo = np.where(ok, est - h - margin, -np.inf)
    hi = np.where(ok, est + h + margin, np.inf)
    zero = (n == 0) & (residual_norms == 0)  # an all-zero vector: cosine() scores it exactly 0
    return np.where(zero, 0.0, lo), np.where(zero, 0.0, hi)
