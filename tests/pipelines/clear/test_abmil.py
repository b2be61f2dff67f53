"""ABMIL head numerics against a naive per-slice loop of Ilse et al. (2018) eqs. 8-9; storage of heads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.errors import InputError, ModelError
from pipelines.models.clear.abmil import (
    AbmilHead,
    load_head,
    pad_bags,
    save_head,
    top_evidence,
)


@torch.no_grad()
def _naive(head: AbmilHead, bag: torch.Tensor) -> tuple[list[float], list[float]]:
    """One bag, one slice at a time, scalar softmax; the formula as written, no batching or masking."""
    W1, b1 = head.instance[0].weight, head.instance[0].bias
    V, bV = head.attn_v.weight, head.attn_v.bias
    w, bw = head.attn_w.weight[0], head.attn_w.bias[0]
    hs, es = [], []
    for s in range(bag.shape[0]):
        h = torch.clamp(W1 @ bag[s] + b1, min=0.0)
        t = torch.tanh(V @ h + bV)
        if head.attn_u is not None:
            t = t * torch.sigmoid(head.attn_u.weight @ h + head.attn_u.bias)
        hs.append(h)
        es.append(float(w @ t + bw))
    m = max(es)
    ex = [math.exp(e - m) for e in es]
    a = [v / sum(ex) for v in ex]
    z = sum(ai * h for ai, h in zip(a, hs, strict=True))
    ln, l1, l2 = head.classifier[0], head.classifier[1], head.classifier[4]
    mu = z.mean()
    var = ((z - mu) ** 2).mean()
    zn = (z - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias
    u = l1.weight @ zn + l1.bias
    u = u * torch.sigmoid(u)  # SiLU (dropout is identity in eval)
    logits = l2.weight @ u + l2.bias
    return [float(v) for v in logits], a


@pytest.mark.parametrize("gated", [False, True])
def test_batched_masked_forward_equals_the_naive_loop(gated: bool) -> None:
    torch.manual_seed(0)
    head = AbmilHead(12, 3, hidden=16, attn_dim=8, gated=gated).double().eval()
    bags = [torch.randn(n, 12, dtype=torch.float64) for n in (5, 1, 9)]
    x, mask = pad_bags([b.numpy() for b in bags])
    x = x.double()
    x[~mask] = 123.0  # garbage in the padding must not matter
    logits, att = head(x, mask)
    for i, bag in enumerate(bags):
        ref_logits, ref_att = _naive(head, x[i, : len(bag)])
        np.testing.assert_allclose(logits[i].detach().numpy(), ref_logits, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(att[i, : len(bag)].detach().numpy(), ref_att, rtol=1e-10, atol=1e-14)
        assert float(att[i, len(bag):].detach().abs().sum()) == 0.0  # padding gets no attention


def test_parameter_count_matches_clear_head() -> None:
    head = AbmilHead(768, 8)
    assert sum(p.numel() for p in head.parameters()) == 331_273  # CLEAR's ABMIL sizes (docs/models/clear.md)
    assert sum(p.numel() for p in AbmilHead(512, 8).parameters()) == 265_737


def test_temperature_changes_probabilities_not_attention() -> None:
    torch.manual_seed(1)
    head = AbmilHead(4, 2, hidden=8, attn_dim=8)
    x = torch.randn(2, 6, 4)
    p1, a1 = head.predict(x)
    logits, _ = head.eval()(x)
    head.temperature.copy_(torch.tensor([2.0, 0.5]))
    p2, a2 = head.predict(x)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(p2, torch.sigmoid(logits / torch.tensor([2.0, 0.5])))
    assert not torch.allclose(p1, p2)


def test_empty_bag_and_bad_shapes_are_refused() -> None:
    head = AbmilHead(4, 1, hidden=8, attn_dim=8)
    with pytest.raises(InputError):
        head(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(InputError):
        head(torch.zeros(3, 4))
    with pytest.raises(InputError):
        pad_bags([np.zeros((2, 4)), np.zeros((2, 5))])


def test_top_evidence_orders_by_attention() -> None:
    assert top_evidence(torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05]), 3) == [1, 3, 0]
    assert top_evidence(np.array([0.2, 0.2]), 5) == [0, 1]


def test_head_file_round_trip_keeps_calibration(tmp_path: Path) -> None:
    torch.manual_seed(2)
    head = AbmilHead(6, 2, hidden=8, attn_dim=8, gated=True)
    head.temperature.copy_(torch.tensor([1.5, 0.7]))
    head.calibrated.fill_(True)
    digest = save_head(tmp_path / "h.pt", head, name="loc", labels=["a", "b"], encoder_model_id="enc-1",
                       meta={"folds": 5})  # fmt: skip
    loaded, info = load_head(tmp_path / "h.pt", expected_sha256=digest)
    x = torch.randn(1, 4, 6)
    torch.testing.assert_close(loaded.predict(x)[0], head.predict(x)[0])
    assert info.calibrated and info.labels == ("a", "b") and info.encoder_model_id == "enc-1" and loaded.gated
    assert info.head_id.startswith("clear-head-loc-")
    with pytest.raises(ModelError):
        load_head(tmp_path / "h.pt", expected_sha256="0" * 64)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError):
        load_head(tmp_path / "bad.pt")
    with pytest.raises(ModelError):
        save_head(tmp_path / "x.pt", head, name="n", labels=["a"], encoder_model_id="e")
