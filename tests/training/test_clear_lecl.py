"""LeCL loss against the written formulas (CLEAR, arXiv 2411.16803) on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.clear.lecl import lecl_loss, symmetric_lecl_loss


def _naive(L: list[list[float]], lesion: list[bool], lam: float, variant: str, tau: float = 1.0) -> float:
    """The formula as written, one query and one key at a time (L already divided by τ)."""
    total = 0.0
    n = len(L)
    for i in range(n):
        denom = sum(math.exp(L[i][j]) for j in range(n))
        if lam > 0 and any(lesion):
            for j in range(n):
                if lesion[j] and j != i:
                    denom += lam * math.exp(L[i][j]) if variant == "paper" else math.exp(lam * L[i][j])
        total += -L[i][i] + math.log(denom)
    return total / n * 2 * tau


def _raw(L: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """q = L, k = I, no normalisation, τ = 1 → logits are exactly L."""
    q = torch.tensor(L, dtype=torch.float64)
    return q, torch.eye(len(L), dtype=torch.float64)


def test_hand_computed_two_sample_batch() -> None:
    L = [[2.0, 0.0], [1.0, 3.0]]
    q, k = _raw(L)
    lesion = torch.tensor([False, True])
    e = math.e
    loss1 = -3 + math.log(e + e**3)  # the only lesion key is query 1's own positive: no extra term
    paper = ((-2 + math.log(e**2 + 1 + 2 * 1)) + loss1) / 2 * 2  # + λ·exp(0) with λ = 2
    code = ((-2 + math.log(e**2 + 1 + math.exp(2 * 0.0))) + loss1) / 2 * 2  # + exp(λ·0)
    assert float(lecl_loss(q, k, lesion, weight=2.0, variant="paper", normalize=False)) == pytest.approx(paper, rel=1e-12)
    assert float(lecl_loss(q, k, lesion, weight=2.0, variant="code", normalize=False)) == pytest.approx(code, rel=1e-12)
    assert paper != pytest.approx(code)


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0, 10.0])
def test_matches_naive_formula_on_hand_made_logits(variant: str, lam: float) -> None:
    L = [[1.5, -0.3, 0.8, 0.1, -1.2], [0.2, 2.2, -0.7, 0.9, 0.4], [-0.5, 0.6, 1.1, 1.4, 0.0],
         [0.3, -0.9, 0.5, 0.7, 1.8], [1.0, 0.2, -0.4, -0.6, 2.5]]  # fmt: skip
    lesion = [True, False, True, False, True]
    q, k = _raw(L)
    got = lecl_loss(q, k, torch.tensor(lesion), weight=lam, variant=variant, normalize=False)  # type: ignore[arg-type]
    assert float(got) == pytest.approx(_naive(L, lesion, lam, variant), rel=1e-12)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_temperature_and_normalisation_follow_moco_v3(variant: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    lesion = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool)
    tau = 0.2
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    L = (qn @ kn.T / tau).tolist()
    got = lecl_loss(q.double(), k.double(), lesion, temperature=tau, weight=4.0, variant=variant)  # type: ignore[arg-type]
    assert float(got) == pytest.approx(_naive(L, lesion.tolist(), 4.0, variant, tau), rel=1e-10)


def test_plain_moco_when_no_lesion_or_no_weight_and_variants_agree_at_one() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    moco = F.cross_entropy(qn @ kn.T, torch.arange(5)) * 2  # MoCo v3: CE × 2τ (τ = 1)
    none = torch.zeros(5, dtype=torch.bool)
    some = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    assert float(lecl_loss(q, k, none, weight=5.0)) == pytest.approx(float(moco), rel=1e-12)
    assert float(lecl_loss(q, k, some, weight=0.0)) == pytest.approx(float(moco), rel=1e-12)
    assert float(lecl_loss(q, k, some, weight=1.0, variant="paper")) == pytest.approx(
        float(lecl_loss(q, k, some, weight=1.0, variant="code")), rel=1e-12)
    assert float(lecl_loss(q, k, some, weight=3.0)) > float(moco)  # extra negatives only add to the denominator


def test_large_weights_stay_finite_and_gradients_flow() -> None:
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8)
    lesion = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    loss = lecl_loss(q, k, lesion, temperature=0.01, weight=50.0, variant="code")
    assert torch.isfinite(loss)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_symmetric_total_and_bad_arguments() -> None:
    g = torch.Generator().manual_seed(2)
    q1, q2, k1, k2 = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4))
    lesion = torch.tensor([1, 0, 0], dtype=torch.bool)
    total = symmetric_lecl_loss(q1, q2, k1, k2, lesion, weight=2.0)
    assert float(total) == pytest.approx(float(lecl_loss(q1, k2, lesion, weight=2.0) + lecl_loss(q2, k1, lesion, weight=2.0)))
    with pytest.raises(ValueError):
        lecl_loss(q1, k1, lesion, variant="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        lecl_loss(q1, k1[:2], lesion)
