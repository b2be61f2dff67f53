"""SkipTopN contrastive loss (HCL-AL, Gao et al. 2025) on hand-computed cases."""

from __future__ import annotations

import math

import torch

from training.localizer.losses import positive_mask, skip_topn_loss, skip_topn_targets

LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0]])


def test_reference_targets_single_positive() -> None:
    t = skip_topn_targets(LOGITS, torch.eye(3, dtype=torch.bool), skip_num=1, smoothing=0.1)
    # 0.9 on the diagonal; 0.1/(C-1) = 0.05 elsewhere; the hardest negative (score 1) dropped
    expected = torch.tensor([[0.9, 0.0, 0.05], [0.05, 0.9, 0.0], [0.0, 0.05, 0.9]])
    assert torch.allclose(t, expected)


def test_loss_matches_hand_computation() -> None:
    # every row of LOGITS and of LOGITS.T is a permutation of (2 = GT, 1 = hardest negative, 0)
    lse = math.log(math.exp(2) + math.exp(1) + math.exp(0))
    per_row = -(0.9 * (2 - lse) + 0.05 * (0 - lse))
    loss = skip_topn_loss(LOGITS, torch.eye(3, dtype=torch.bool), skip_num=1, smoothing=0.1)
    assert abs(float(loss) - per_row) < 1e-6


def test_skip_zero_is_label_smoothed_cross_entropy() -> None:
    lse = math.log(math.exp(2) + math.exp(1) + math.exp(0))
    per_row = -(0.9 * (2 - lse) + 0.05 * (1 - lse) + 0.05 * (0 - lse))
    loss = skip_topn_loss(LOGITS, torch.eye(3, dtype=torch.bool), skip_num=0, smoothing=0.1)
    assert abs(float(loss) - per_row) < 1e-6


def test_identical_texts_are_positives() -> None:
    """T2: two samples with the fine text "Rib" (Rib L3, Rib R3) must not repel each other."""
    pos = positive_mask(["Rib", "Rib", "Liver"])
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    t = skip_topn_targets(torch.zeros(3, 3), pos, skip_num=0, smoothing=0.1)
    assert torch.allclose(t[0], torch.tensor([0.45, 0.45, 0.1]))
    assert torch.allclose(t[2], torch.tensor([0.05, 0.05, 0.9]))


def test_hardest_negative_skipped_but_positive_never() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 0.0]])  # column 1 is a positive with the highest score
    pos = torch.tensor([[True, True, False, False]])
    t = skip_topn_targets(logits, pos, skip_num=1, smoothing=0.2)
    assert torch.allclose(t, torch.tensor([[0.4, 0.4, 0.0, 0.1]]))


def test_gradient_step_raises_matching_similarity() -> None:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 8, generator=gen).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)

    def diag() -> torch.Tensor:
        return (torch.nn.functional.normalize(raw, dim=-1) * txt).sum(-1)

    before = diag().detach()
    loss = skip_topn_loss(10 * torch.nn.functional.normalize(raw, dim=-1) @ txt.T, torch.eye(4, dtype=torch.bool),
                          skip_num=1)
    loss.backward()
    with torch.no_grad():
        raw -= 0.1 * raw.grad
    assert float(diag().detach().mean()) > float(before.mean())
