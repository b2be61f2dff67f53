"""HCL-AL's ``SkipTopNClip`` contrastive loss, full batch, with multi-positive targets.

Reference behaviour (HCL-AL, Gao et al. 2025 T4 kept): logits ``s·img·txtᵀ``; per row a
log-softmax over *all* columns; smoothed targets 0.9 on the ground-truth column and
``0.1/(C-1)`` elsewhere, except that the ``skip_num`` highest-scoring non-GT columns get
target 0 (semi-hard negative mining: the hardest negatives leave the target sum but stay in
the softmax); loss = mean over rows, averaged over image->text and text->image.

Fixes: the matrix spans the whole batch, not one DataParallel replica (T3); a column whose
text equals the row's own text is a positive, not a negative (T2: fine batches repeat
"Rib" or "Thoracic spine" under different coarse keys).  With ``P`` positives a row puts
``(1-ε)/P`` on each and ``ε/(C-P)`` on each other column, which is the reference target
when ``P = 1``.
"""

from __future__ import annotations

import torch


def positive_mask(texts: list[str]) -> torch.Tensor:
    """``[B, B]`` bool: True where sample i's text equals sample j's text (the diagonal included)."""
    ids: dict[str, int] = {}
    idx = torch.tensor([ids.setdefault(t, len(ids)) for t in texts])
    return idx[:, None] == idx[None, :]


def skip_topn_targets(logits: torch.Tensor, positives: torch.Tensor, skip_num: int, smoothing: float) -> torch.Tensor:
    """Row-wise smoothed targets with the ``skip_num`` hardest negatives zeroed."""
    c = logits.shape[1]
    pos = positives.float()
    n_pos = pos.sum(dim=1, keepdim=True)
    neg_value = smoothing / (c - n_pos).clamp(min=1)
    targets = torch.where(positives, (1.0 - smoothing) / n_pos, neg_value.expand_as(pos))
    k = min(skip_num, c - 1)
    if k > 0:
        masked = logits.detach().masked_fill(positives, float("-inf"))
        hard = masked.topk(k, dim=1).indices
        skip = torch.zeros_like(positives).scatter_(1, hard, True) & ~positives
        targets = targets.masked_fill(skip, 0.0)
    return targets


def skip_topn_loss(logits: torch.Tensor, positives: torch.Tensor, *, skip_num: int, smoothing: float = 0.1) -> torch.Tensor:
    """Symmetric SkipTopN loss of ``[B, B]`` image-text logits."""
    loss = logits.new_zeros(())
    for lg, pm in ((logits, positives), (logits.T, positives.T)):
        t = skip_topn_targets(lg, pm, skip_num, smoothing)
        loss = loss + (-(t * lg.log_softmax(dim=1)).sum(dim=1)).mean()
    return loss / 2
