"""ItemizedCLIP training objectives, as ItemizedCLIP, arXiv 2512.11141, training objectives states them (single process).

Every term is a sigmoid (SigLIP-style) binary loss ``−log σ(y·z)`` with ``y ∈ {+1, −1}`` and
logits ``z = s·cos + b``, ``s = exp(logit_scale)`` (the model output, already exponentiated;
the trainer clamps it to ≤ 100 after each step) and ``b = logit_bias``.  Inputs are the
**raw** model outputs — global ``g [B, E]``, items ``t [B·K, E]`` (``K`` per image, row-major),
tokens ``T [B, L, E]`` — and the attention-pooling block is fed raw ``t`` and raw ``T`` (no L2
before it, unlike inference), with an item mask ``m [B, K]`` (padding items 0) and normal
flags ``ν [B]``.

* **Negative sampling** (FLAIR): image ``i`` keeps its ``K`` items and draws one *real* item
  uniformly from every other image; the ``B·K`` flat indices are sorted, so image ``i`` sees
  ``K + B − 1`` items with its own at columns ``i … i+K−1`` (:func:`sample_negatives`).
* **ILA** (item-local alignment): token masking keeps each (image, head, item, token) with
  probability ``p`` (the null slot always); ``v = n(block(t, T, T, mask))``,
  ``z = s·<v, n(t)> + b``, ``y = +1`` on own items; the sum over entries × item mask × normal
  mask is divided by ``B``.
* **UWP** (completeness up-weighting, only when ``comp_upfac > 1``): per image the real
  positive with the lowest logit — upstream's ``argmin(z − 10·mask − 10·y)``, reproduced
  as written (it assumes logits span < 10) — has its weight multiplied by ``comp_upfac``.
* **KTA** (key-token re-alignment): without gradient, the block is run with the ILA mask and
  its head-averaged weights; per (image, item) the top ``k = max(1, ⌊L·θ⌋)`` tokens (null slot
  excluded) are kept, and the block is re-run with only those tokens allowed (all heads);
  same ``z``/``y``/weights as ILA, divided by ``B``.  "Same weights" is read as the ILA weight
  tensor *after* UWP (the contract lists KTA after UWP on the same weights) — recorded here
  because the contract does not say it in so many words.
* **MPS** (global multi-positive): ``z = s·<n(g_i), n(t_jk)> + b`` over all ``B·K`` items,
  ``y = +1`` iff ``j = i``, weight ``m_jk`` × normal mask, sum divided by ``B·K``.
* **IIS** (inter-item separation): within each image the ``K×K`` logits
  ``s·<v_ik, n(t_ik')> + b`` from the ILA pass, ``y = +1`` on the diagonal, −1 elsewhere,
  weight ``m_ik·m_ik'``, sum divided by ``B·K``.
* **Normal check**: pairs (image ``i``, item of another image ``j``) with ``ν_i = ν_j = 1``
  are removed from ILA, KTA and MPS; own pairs never are.

Total = ``ila_fac·ILA + kta_fac·KTA + mps_fac·MPS + iis_fac·IIS``.  The multi-GPU ring terms
(§8 "multi-GPU") are not implemented: Locus trains on one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossConfig:
    """Loss factors and rates; the defaults are the published chest-CT recipe (§8)."""

    ila_fac: float = 1.0  # --ila-fac
    ila_keep: float = 0.95  # --ila-mask-rate: keep probability per (image, head, item, token)
    comp_upfac: float = 1.0  # --comp-upfac (UWP off at 1.0)
    kta_fac: float = 1.0  # KTA weight
    key_token_thresh: float = 0.05  # --key-token-thresh θ (CLI default; the class default 0.1 is overridden)
    mps_fac: float = 0.1  # --mps-fac
    iis_fac: float = 1.0  # --iis-loss
    normal_check: bool = True  # off with --no-normal-check

    def __post_init__(self) -> None:
        if not 0.0 < self.ila_keep <= 1.0:
            raise ValueError(f"ila_keep must lie in (0, 1], not {self.ila_keep}")
        if not 0.0 < self.key_token_thresh <= 1.0:
            raise ValueError(f"key_token_thresh must lie in (0, 1], not {self.key_token_thresh}")
        if self.comp_upfac < 1.0:
            raise ValueError(f"comp_upfac must be >= 1, not {self.comp_upfac}")


#: The published chest-CT recipe (``train_ctrate.sh``): UWP off, MPS 0.1, keep 0.95.
CHEST_CT = LossConfig()
#: The published brain-MRI / head-CT recipe (``train_mri.sh``, ``train_ct.sh``): UWP ×1.5, MPS 0.01, keep 0.9.
MRI_CT = LossConfig(ila_keep=0.9, comp_upfac=1.5, mps_fac=0.01)
RECIPES = {"chest_ct": CHEST_CT, "mri_ct": MRI_CT}


@dataclass(frozen=True)
class LossTerms:
    """The weighted total and every unweighted term (for logging)."""

    total: torch.Tensor
    ila: torch.Tensor
    kta: torch.Tensor
    mps: torch.Tensor
    iis: torch.Tensor


def sigmoid_nll(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``−log σ(y·z)`` elementwise, computed stably as ``softplus(−y·z)``."""
    return F.softplus(-y * z)


def sample_negatives(item_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """FLAIR columns ``[B, K + B − 1]``: own ``K`` item indices plus one real item of every other image, sorted.

    Flat indices into the ``B·K`` items.  An image without any real item (all padding) still
    contributes a padding column, whose item-mask weight is 0.
    """
    b, k = item_mask.shape
    real = item_mask > 0
    draws = []
    for j in range(b):
        choices = torch.nonzero(real[j]).flatten() if bool(real[j].any()) else torch.arange(k)
        draws.append(j * k + int(choices[int(torch.randint(len(choices), (1,), generator=generator))]))
    cols = []
    for i in range(b):
        own = list(range(i * k, (i + 1) * k))
        cols.append(sorted(own + [draws[j] for j in range(b) if j != i]))
    return torch.tensor(cols, dtype=torch.long, device=item_mask.device)


def column_targets(cols: torch.Tensor, k: int, item_mask: torch.Tensor, normal: torch.Tensor,
                   normal_check: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Labels ``y`` (±1), weights (item mask × normal mask) and the item mask of each column, ``[B, Kq]``."""
    b = cols.shape[0]
    owner = torch.div(cols, k, rounding_mode="floor")
    rows = torch.arange(b, device=cols.device)[:, None]
    own = owner == rows
    y = torch.where(own, 1.0, -1.0)
    col_mask = item_mask.reshape(-1)[cols].float()
    weight = col_mask.clone()
    if normal_check:
        nv = normal.bool()
        weight = weight * (~(nv[rows] & nv[owner] & ~own)).float()
    return y.to(item_mask.device), weight, col_mask


def token_keep_mask(b: int, n_head: int, kq: int, n_tokens: int, keep: float,
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """ILA token masking ``[B·n_head, Kq, L]`` (1 = keep), Bernoulli(``keep``) per entry."""
    if keep >= 1.0:
        return torch.ones(b * n_head, kq, n_tokens, device=device)
    return (torch.rand(b * n_head, kq, n_tokens, generator=generator) < keep).float().to(device)


def _queries(t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return t[cols]  # [B, Kq, E]


def item_logits(block: nn.Module, t: torch.Tensor, tokens: torch.Tensor, cols: torch.Tensor, mask: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(z [B, Kq], v [B, Kq, E])``: the block on raw queries/tokens with ``mask``, ``z = s·<n(out), n(t)> + b``."""
    q = _queries(t, cols)
    v = F.normalize(block(q, tokens, tokens, mask=mask), dim=-1)
    z = scale * (v * F.normalize(q, dim=-1)).sum(-1) + bias
    return z, v


def uwp_weights(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, col_mask: torch.Tensor,
                factor: float) -> torch.Tensor:  # fmt: skip
    """UWP: multiply the weight of each image's worst real positive by ``factor`` (upstream's argmin rule)."""
    if factor <= 1.0:
        return weight
    idx = torch.argmin(z.detach() - 10.0 * col_mask - 10.0 * y, dim=1)
    up = torch.ones_like(weight)
    up[torch.arange(z.shape[0]), idx] = factor
    return weight * up


def key_token_mask(block: nn.Module, t: torch.Tensor, tokens: torch.Tensor, cols: torch.Tensor,
                   mask: torch.Tensor, thresh: float) -> torch.Tensor:  # fmt: skip
    """KTA mask ``[B·n_head, Kq, L]``: the top ``max(1, ⌊L·θ⌋)`` tokens of the head-averaged weights (no gradient)."""
    n_tokens = tokens.shape[1]
    k = max(1, math.floor(n_tokens * thresh))
    with torch.no_grad():
        _, weights = block(_queries(t, cols), tokens, tokens, mask=mask, output_attn_weights=True)
        top = torch.topk(weights[..., :n_tokens], k, dim=-1).indices  # null slot (last column) excluded
        keep = torch.zeros(weights.shape[0], weights.shape[1], n_tokens, device=tokens.device)
        keep.scatter_(-1, top, 1.0)
    n_head = mask.shape[0] // tokens.shape[0]
    return keep.repeat_interleave(n_head, dim=0)


def mps_loss(g: torch.Tensor, t: torch.Tensor, item_mask: torch.Tensor, normal: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor, normal_check: bool = True) -> torch.Tensor:  # fmt: skip
    """MPS: every global embedding against all ``B·K`` items, own items positive, sum / ``B·K``."""
    b, k = item_mask.shape
    z = scale * F.normalize(g, dim=-1) @ F.normalize(t, dim=-1).T + bias  # [B, B·K]
    owner = torch.arange(b, device=g.device).repeat_interleave(k)
    own = owner[None, :] == torch.arange(b, device=g.device)[:, None]
    y = torch.where(own, 1.0, -1.0)
    w = item_mask.reshape(1, -1).float().expand(b, -1)
    if normal_check:
        nv = normal.bool()
        w = w * (~(nv[:, None] & nv[owner][None, :] & ~own)).float()
    return (sigmoid_nll(z, y) * w).sum() / (b * k)


def iis_loss(v: torch.Tensor, t: torch.Tensor, item_mask: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """IIS: per image, own conditioned embeddings ``v_ik`` [B, K, E] (unit) against own items, diagonal positive."""
    b, k = item_mask.shape
    tn = F.normalize(t, dim=-1).reshape(b, k, -1)
    z = scale * torch.einsum("bie,bje->bij", v, tn) + bias
    y = 2.0 * torch.eye(k, device=v.device) - 1.0
    m = item_mask.float()
    w = m[:, :, None] * m[:, None, :]
    return (sigmoid_nll(z, y[None]) * w).sum() / (b * k)


def itemized_loss(block: nn.Module, g: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, item_mask: torch.Tensor,
                  normal: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, config: LossConfig = CHEST_CT, *,
                  generator: torch.Generator | None = None, cols: torch.Tensor | None = None,
                  ila_mask: torch.Tensor | None = None) -> LossTerms:  # fmt: skip
    """All §8 terms for one batch.  ``cols`` / ``ila_mask`` may be given (tests); else drawn from ``generator``.

    Shapes: ``g [B, E]``, ``t [B·K, E]``, ``tokens [B, L, E]``, ``item_mask [B, K]``, ``normal [B]``.
    """
    b, k = item_mask.shape
    if t.shape[0] != b * k:
        raise ValueError(f"{t.shape[0]} item embeddings for {b} images x {k} items")
    n_head = int(getattr(block, "n_head", 8))
    n_tokens = tokens.shape[1]
    if cols is None:
        cols = sample_negatives(item_mask, generator)
    kq = cols.shape[1]
    if ila_mask is None:
        ila_mask = token_keep_mask(b, n_head, kq, n_tokens, config.ila_keep, generator, tokens.device)
    own_cols = torch.arange(b, device=cols.device)[:, None] + torch.arange(k, device=cols.device)[None, :]
    own_items = torch.arange(b * k, device=cols.device).reshape(b, k)
    if kq != k + b - 1 or not torch.equal(torch.gather(cols, 1, own_cols), own_items):
        raise ValueError("columns must be the sorted FLAIR layout: own items at columns i .. i+K-1")
    y, weight, col_mask = column_targets(cols, k, item_mask, normal, config.normal_check)

    z, v = item_logits(block, t, tokens, cols, ila_mask, scale, bias)
    weight = uwp_weights(z, y, weight, col_mask, config.comp_upfac)
    ila = (sigmoid_nll(z, y) * weight).sum() / b

    zero = z.new_zeros(())
    kta = zero
    if config.kta_fac:
        key_mask = key_token_mask(block, t, tokens, cols, ila_mask, config.key_token_thresh)
        z_key, _ = item_logits(block, t, tokens, cols, key_mask, scale, bias)
        kta = (sigmoid_nll(z_key, y) * weight).sum() / b
    mps = mps_loss(g, t, item_mask, normal, scale, bias, config.normal_check) if config.mps_fac else zero
    iis = zero
    if config.iis_fac:
        v_own = torch.gather(v, 1, own_cols[..., None].expand(-1, -1, v.shape[-1]))
        iis = iis_loss(v_own, t, item_mask, scale, bias)
    total = config.ila_fac * ila + config.kta_fac * kta + config.mps_fac * mps + config.iis_fac * iis
    return LossTerms(total, ila, kta, mps, iis)
