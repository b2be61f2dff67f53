"""ItemizedCLIP objectives (training.itemizedclip.losses) against a naive reading of ItemizedCLIP, arXiv 2512.11141, training objectives.

The naive reference below loops over images, columns and items in Python, runs the block on one
query at a time, and evaluates ``−log σ(y·z)`` with :mod:`math` in float64, following the
contract's sentences literally; the vectorised implementation must agree to 1e-9.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.models.itemizedclip.head import PureAttentionPoolingBlock
from training.itemizedclip import losses as L

B, K, E, H, NT = 3, 2, 16, 8, 10
SCALE, BIAS = 4.0, -1.3  # logits span < 10, the range upstream's UWP argmin rule assumes


@pytest.fixture(scope="module")
def batch():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    block = PureAttentionPoolingBlock(E).double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 1.0 / math.sqrt(p.shape[-1])))
            if name.startswith("ln_") and name.endswith("weight"):
                p.add_(1.0)
        block.attn.in_proj_weight[: 2 * E].mul_(3.0)  # peaked attention, so top-k choices are clear
    g = torch.randn(B, E, dtype=torch.float64)
    t = torch.randn(B * K, E, dtype=torch.float64)
    tokens = torch.randn(B, NT, E, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]])  # images 1 and 2: one real item (+ a padding item)
    normal = torch.tensor([0, 1, 1])  # images 1 and 2 are "normal" studies
    gen = torch.Generator().manual_seed(3)
    cols = L.sample_negatives(mask, gen)
    ila_mask = L.token_keep_mask(B, H, cols.shape[1], NT, 0.7, gen).double()
    return block, g, t, tokens, mask, normal, cols, ila_mask


def _sig_nll(z: float, y: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-y * z)))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def naive(block, g, t, tokens, mask, normal, cols, ila_mask, cfg: L.LossConfig) -> dict[str, float]:  # type: ignore[no-untyped-def]
    m = mask.reshape(-1).tolist()
    nu = normal.tolist()
    kq = cols.shape[1]
    z_ila, y_all, w_all, v_own = {}, {}, {}, {}
    with torch.no_grad():
        for i in range(B):
            for c in range(kq):
                item = int(cols[i, c])
                owner = item // K
                q = t[item]
                rows = ila_mask[i * H:(i + 1) * H, c:c + 1, :]
                out = block(q[None, None], tokens[i:i + 1], tokens[i:i + 1], mask=rows)[0, 0]
                v = _unit(out)
                z_ila[i, c] = SCALE * float(v @ _unit(q)) + BIAS
                y_all[i, c] = 1.0 if owner == i else -1.0
                w = float(m[item])
                if cfg.normal_check and owner != i and nu[i] and nu[owner]:
                    w = 0.0
                w_all[i, c] = w
                if owner == i:
                    v_own[i, item - i * K] = v
        if cfg.comp_upfac > 1:  # the real positive with the lowest logit, per image
            for i in range(B):
                pos = [c for c in range(kq) if y_all[i, c] > 0 and m[int(cols[i, c])]]
                worst = min(pos, key=lambda c: z_ila[i, c])
                w_all[i, worst] *= cfg.comp_upfac
        ila = sum(w_all[i, c] * _sig_nll(z_ila[i, c], y_all[i, c]) for i in range(B) for c in range(kq)) / B

        k_top = max(1, math.floor(NT * cfg.key_token_thresh))
        kta = 0.0
        for i in range(B):
            for c in range(kq):
                q = t[int(cols[i, c])]
                rows = ila_mask[i * H:(i + 1) * H, c:c + 1, :]
                _, a = block(q[None, None], tokens[i:i + 1], tokens[i:i + 1], mask=rows, output_attn_weights=True)
                weights = a[0, 0, :NT].tolist()  # head-averaged; null slot (last) excluded
                top = sorted(range(NT), key=lambda j: -weights[j])[:k_top]
                keep = torch.zeros(H, 1, NT, dtype=torch.float64)
                keep[:, :, top] = 1.0
                out = block(q[None, None], tokens[i:i + 1], tokens[i:i + 1], mask=keep)[0, 0]
                z = SCALE * float(_unit(out) @ _unit(q)) + BIAS
                kta += w_all[i, c] * _sig_nll(z, y_all[i, c])
        kta /= B

        mps = 0.0
        for i in range(B):
            for j in range(B):
                for kk in range(K):
                    w = float(m[j * K + kk])
                    if cfg.normal_check and j != i and nu[i] and nu[j]:
                        w = 0.0
                    z = SCALE * float(_unit(g[i]) @ _unit(t[j * K + kk])) + BIAS
                    mps += w * _sig_nll(z, 1.0 if j == i else -1.0)
        mps /= B * K

        iis = 0.0
        for i in range(B):
            for a_ in range(K):
                for c in range(K):
                    w = float(m[i * K + a_] * m[i * K + c])
                    z = SCALE * float(v_own[i, a_] @ _unit(t[i * K + c])) + BIAS
                    iis += w * _sig_nll(z, 1.0 if a_ == c else -1.0)
        iis /= B * K
    total = cfg.ila_fac * ila + cfg.kta_fac * kta + cfg.mps_fac * mps + cfg.iis_fac * iis
    return {"ila": ila, "kta": kta, "mps": mps, "iis": iis, "total": total}


def _run(batch, cfg: L.LossConfig) -> L.LossTerms:  # type: ignore[no-untyped-def]
    block, g, t, tokens, mask, normal, cols, ila_mask = batch
    return L.itemized_loss(block, g, t, tokens, mask, normal, torch.tensor(SCALE, dtype=torch.float64),
                           torch.tensor(BIAS, dtype=torch.float64), cfg, cols=cols, ila_mask=ila_mask)  # fmt: skip


@pytest.mark.parametrize("cfg", [
    L.CHEST_CT,
    L.MRI_CT,
    L.LossConfig(comp_upfac=2.0, key_token_thresh=0.35, mps_fac=0.5, iis_fac=0.25, kta_fac=0.7, ila_fac=1.3),
    L.LossConfig(normal_check=False, comp_upfac=1.5),
], ids=["chest", "mri_ct", "custom", "no_normal_check"])  # fmt: skip
def test_every_term_matches_the_naive_formula(batch, cfg: L.LossConfig) -> None:  # type: ignore[no-untyped-def]
    got = _run(batch, cfg)
    want = naive(*batch, cfg)
    for name in ("ila", "kta", "mps", "iis", "total"):
        assert float(getattr(got, name).detach()) == pytest.approx(want[name], rel=1e-9, abs=1e-12), name
    assert all(float(getattr(got, n)) > 0 for n in ("ila", "kta", "mps", "iis"))


def test_terms_react_to_their_switches(batch) -> None:  # type: ignore[no-untyped-def]
    base = _run(batch, L.LossConfig())
    up = _run(batch, L.LossConfig(comp_upfac=3.0))
    assert float(up.ila) > float(base.ila) and float(up.kta) > float(base.kta)  # UWP adds weight to positives
    assert float(up.mps) == float(base.mps) and float(up.iis) == float(base.iis)
    off = _run(batch, L.LossConfig(normal_check=False))
    assert float(off.ila) != float(base.ila) and float(off.mps) > float(base.mps)  # normal pairs counted again
    none = _run(batch, L.LossConfig(kta_fac=0.0, mps_fac=0.0, iis_fac=0.0))
    assert float(none.total) == pytest.approx(float(base.ila))


def test_gradients_reach_block_items_tokens_and_global(batch) -> None:  # type: ignore[no-untyped-def]
    block, g, t, tokens, mask, normal, cols, ila_mask = batch
    g, t, tokens = (x.clone().requires_grad_(True) for x in (g, t, tokens))
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    block.zero_grad()
    L.itemized_loss(block, g, t, tokens, mask, normal, scale, bias, L.MRI_CT, cols=cols, ila_mask=ila_mask).total.backward()
    for x in (g, t, tokens, scale, bias, block.attn.in_proj_weight, block.ln_q.weight):
        assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert float(t.grad[3].abs().sum()) == 0  # image 1's padding item: weight 0 everywhere
    block.zero_grad()


def test_negative_sampling_layout_and_real_items_only() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]])
    gen = torch.Generator().manual_seed(0)
    seen: set[int] = set()
    for _ in range(200):
        cols = L.sample_negatives(mask, gen)
        assert cols.shape == (4, 3 + 4 - 1)
        for i in range(4):
            row = cols[i].tolist()
            assert row == sorted(row)
            assert row[i:i + 3] == [i * 3, i * 3 + 1, i * 3 + 2]  # own items at columns i .. i+K-1
            others = [c for c in row if c // 3 != i]
            assert sorted(c // 3 for c in others) == [j for j in range(4) if j != i]  # one from each other image
            assert all(mask.reshape(-1)[c] == 1 for c in others)  # a real item, never padding
            seen.update(others)
    assert seen == {0, 1, 3, 6, 7, 8, 10}  # every real item is drawn sometimes


def test_token_masking_rate_and_key_token_count() -> None:
    gen = torch.Generator().manual_seed(0)
    m = L.token_keep_mask(4, 8, 5, 2744, 0.95, gen)
    assert m.shape == (32, 5, 2744) and abs(float(m.mean()) - 0.95) < 0.005
    block = PureAttentionPoolingBlock(16)
    t = torch.randn(2 * 2, 16)
    tokens = torch.randn(2, 2744, 16)
    cols = L.sample_negatives(torch.ones(2, 2, dtype=torch.long), gen)
    keep = L.key_token_mask(block, t, tokens, cols, torch.ones(16, 3, 2744), 0.05)
    assert keep.shape == (16, 3, 2744)
    assert torch.all(keep.sum(-1) == 137)  # k = max(1, floor(2744 * 0.05)) = 137, the contract's number
    assert torch.equal(keep[0], keep[7]) and torch.equal(keep[8], keep[15])  # the same tokens for all heads
    tiny = L.key_token_mask(block, t, tokens[:, :10], cols, torch.ones(16, 3, 10), 0.05)
    assert torch.all(tiny.sum(-1) == 1)  # at least one token


def test_defaults_are_the_contract_recipes() -> None:
    c = L.LossConfig()
    assert (c.ila_fac, c.ila_keep, c.comp_upfac, c.kta_fac, c.key_token_thresh, c.mps_fac, c.iis_fac, c.normal_check) \
        == (1.0, 0.95, 1.0, 1.0, 0.05, 0.1, 1.0, True)
    assert (L.MRI_CT.ila_keep, L.MRI_CT.comp_upfac, L.MRI_CT.mps_fac) == (0.9, 1.5, 0.01)
    with pytest.raises(ValueError):
        L.LossConfig(ila_keep=0.0)
    with pytest.raises(ValueError):
        L.LossConfig(comp_upfac=0.5)


def test_bad_columns_are_refused(batch) -> None:  # type: ignore[no-untyped-def]
    block, g, t, tokens, mask, normal, cols, ila_mask = batch
    with pytest.raises(ValueError, match="FLAIR"):
        L.itemized_loss(block, g, t, tokens, mask, normal, torch.tensor(1.0), torch.tensor(0.0),
                        cols=cols.flip(1), ila_mask=ila_mask)  # fmt: skip
