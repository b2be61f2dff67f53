"""LeCL: MoCo v3's contrastive loss with lesion-bearing samples as extra, up-weighted negatives.

MoCo v3 (Chen, Xie, He, ICCV 2021, Alg. 1): with L2-normalised queries ``q`` and keys ``k``
and ``l_ij = q_i·k_j / τ``, the loss of query ``i`` is the InfoNCE
``−l_ii + log Σ_j exp(l_ij)`` (the own key is the positive), averaged and multiplied by ``2τ``;
the total is symmetric, ``ctr(q₁, k₂) + ctr(q₂, k₁)``.

LeCL (Ligero et al., MICCAI 2025; arXiv 2411.16803) adds, for each query, the keys of the
lesion-bearing samples ``𝓛`` (other than its own positive) a second time to the denominator,
weighted by λ, so that abnormal slices act as hard negatives.  Two readings exist:

* ``"paper"`` (default, the formula written in the CLEAR paper):
  ``loss_i = −l_ii + log( Σ_j exp(l_ij) + λ · Σ_{j∈𝓛, j≠i} exp(l_ij) )`` — λ multiplies the
  exponential (a λ-times heavier copy of each lesion key);
* ``"code"`` (upstream's implementation):
  ``loss_i = −l_ii + log( Σ_j exp(l_ij) + Σ_{j∈𝓛, j≠i} exp(λ · l_ij) )`` — λ multiplies the
  logit (a copy of each lesion key at temperature τ/λ).

Both agree at λ = 1.  In both the positive is excluded from the lesion term (it is not a
negative; upstream overwrites it with −∞ too).  With λ ≤ 0 or no lesion sample in the batch
the plain MoCo v3 term is returned.  Computation is in float64 with ``logsumexp`` (upstream
computes in float64 too), so large λ·l does not overflow.  Every query gets the extra
negatives, lesion-bearing or not (as both readings are written).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Variant = Literal["paper", "code"]
VARIANTS: tuple[str, ...] = ("paper", "code")


def lecl_loss(q: torch.Tensor, k: torch.Tensor, lesion: torch.Tensor, *, temperature: float = 1.0,
              weight: float = 1.0, variant: Variant = "paper", normalize: bool = True) -> torch.Tensor:  # fmt: skip
    """One direction of the LeCL loss, ``ctr(q, k)``, for ``q``/``k`` ``[N, d]`` and ``lesion`` ``[N]`` bool.

    Key ``j`` is the positive of query ``j`` (single process: no cross-device gathering).
    Returns a scalar (already multiplied by ``2τ`` as MoCo v3 does).
    """
    if variant not in VARIANTS:
        raise ValueError(f"LeCL variant must be one of {VARIANTS}, got {variant!r}")
    if q.shape != k.shape or q.ndim != 2 or lesion.shape != (q.shape[0],):
        raise ValueError(f"LeCL needs q, k [N, d] and lesion [N]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(lesion.shape)}")  # fmt: skip
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    qd, kd = q.double(), k.double()
    if normalize:
        qd, kd = F.normalize(qd, dim=1), F.normalize(kd, dim=1)
    logits = qd @ kd.T / temperature  # [N, N]
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    positive = logits.diagonal()
    lesion = lesion.to(device=logits.device, dtype=torch.bool)
    if weight > 0 and bool(lesion.any()):
        extra_mask = lesion[None, :].expand(n, n) & ~eye  # lesion keys other than the own positive
        if variant == "paper":
            extra = logits + math.log(weight)  # log(λ · exp(l)) = l + log λ
        else:
            extra = logits * weight  # exp(λ · l)
        extra = extra.masked_fill(~extra_mask, float("-inf"))
        denom = torch.logsumexp(torch.cat([logits, extra], dim=1), dim=1)
    else:
        denom = torch.logsumexp(logits, dim=1)
    return ((denom - positive).mean() * (2 * temperature)).to(q.dtype)


def symmetric_lecl_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, lesion: torch.Tensor,
                        **kwargs: object) -> torch.Tensor:  # fmt: skip
    """MoCo v3's symmetrised total ``ctr(q₁, k₂) + ctr(q₂, k₁)``."""
    return lecl_loss(q1, k2, lesion, **kwargs) + lecl_loss(q2, k1, lesion, **kwargs)  # type: ignore[arg-type]
