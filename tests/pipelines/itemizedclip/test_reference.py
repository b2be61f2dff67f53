"""Independent re-implementation of ItemizedCLIP (arXiv 2512.11141) pins the module's outputs.

Written from the contract text, not from :mod:`pipelines.models.itemizedclip`: the text side is
a plain ``transformers.BertModel`` (no pooler) with the checkpoint's ``text.transformer.*``
weights, mask = ids ≠ 0, the [CLS] last hidden state and ``text.proj``; the visual side is the
HLIP trunk's normed tokens times the checkpoint's ``visual.head.proj.weight``; the block is the
§3 arithmetic written out (three LayerNorms eps 1e-5, packed in-projection rows q/k/v, an
all-zero null key and value appended **last** after the projection, softmax over L + 1,
head mean).  Tolerances are the issue's: scores 1e-5, maps 1e-6, embeddings cosine > 0.99999.
A second reference calls ``torch.nn.MultiheadAttention`` exactly as upstream does.  The last
tests show the comparison is sharp enough to catch the two easy mistakes (un-normalised
tokens, LayerNorm eps 1e-6).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.models.itemizedclip import encoder as ie
from pipelines.models.study_encoder.preprocess import PreparedInput
from tests.pipelines.itemizedclip.conftest import TINY_MODEL, TINY_SPEC

SCORE_TOL, MAP_TOL, COS_MIN = 1e-5, 1e-6, 0.99999
CONTEXT = 77
N_HEAD = 8


@pytest.fixture(scope="module")
def enc(tiny_itemized: dict[str, Path]) -> ie.ItemizedClipEncoder:
    return ie.ItemizedClipEncoder(ie.ItemizedClipConfig(
        checkpoint=tiny_itemized["checkpoint"], text_dir=tiny_itemized["text"], model_name=TINY_MODEL,
        config_dir=tiny_itemized["configs"]))  # fmt: skip


@pytest.fixture(scope="module")
def sd(tiny_itemized: dict[str, Path]) -> dict[str, torch.Tensor]:
    raw = torch.load(tiny_itemized["checkpoint"], weights_only=True, map_location="cpu")["state_dict"]
    return {k[len("module."):]: v.float() for k, v in raw.items()}  # upstream strips 7 characters unconditionally


def _prepared(seed: int) -> PreparedInput:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 1, *TINY_SPEC.img_size, generator=g)
    return PreparedInput(x, (-31.5, -23.5, -30.0), (31.5, 23.5, 39.0), {})


# ------------------------------------------------------------------ the reference, from the contract text


def ref_text(sd: dict[str, torch.Tensor], text_dir: Path, prompts: list[str]) -> torch.Tensor:
    """BERT (no pooler) → [CLS] last hidden state → text.proj (no bias)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    tok = BertTokenizer(str(text_dir / "vocab.txt"), do_lower_case=True)
    ids = tok(prompts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")["input_ids"]
    bert = BertModel(BertConfig.from_pretrained(str(text_dir)), add_pooling_layer=False).eval()
    prefix = "text.transformer."
    missing, unexpected = bert.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                                               strict=False)  # fmt: skip
    assert not unexpected and all("position_ids" in m for m in missing)
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    return hidden[:, 0] @ sd["text.proj.weight"].T


def ref_tokens(enc: ie.ItemizedClipEncoder, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """HLIP trunk tokens after the final norm (CLS first), each through head.proj: ``[1, 1 + L, E]``."""
    with torch.no_grad():
        feats = enc.model.visual.trunk.forward_features(x)
    return feats @ sd["visual.head.proj.weight"].T


def ref_block(sd: dict[str, torch.Tensor], q: torch.Tensor, kv: torch.Tensor, *, eps: float = 1e-5,
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """§3 steps 1–6 for one sample: ``q [K, E]``, ``kv [L, E]`` → ``(out [K, E], weights [K, L + 1])``, float64."""
    p = {k[len("visual_attn."):]: v.double() for k, v in sd.items() if k.startswith("visual_attn.")}
    e = q.shape[-1]
    hd = e // N_HEAD

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]

    w, b = p["attn.in_proj_weight"], p["attn.in_proj_bias"]
    qp = ln(q.double(), "ln_q") @ w[:e].T + b[:e]
    kp = ln(kv.double(), "ln_k") @ w[e:2 * e].T + b[e:2 * e]
    vp = ln(kv.double(), "ln_v") @ w[2 * e:].T + b[2 * e:]
    kp = torch.cat([kp, torch.zeros(1, e, dtype=kp.dtype)])  # null key, last, after the bias
    vp = torch.cat([vp, torch.zeros(1, e, dtype=vp.dtype)])  # null value
    outs, weights = [], []
    for h in range(N_HEAD):
        sl = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(qp[:, sl] @ kp[:, sl].T / math.sqrt(hd), dim=-1)
        weights.append(a)
        outs.append(a @ vp[:, sl])
    o = torch.cat(outs, dim=-1) @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
    return o, torch.stack(weights).mean(0)


def reference(enc: ie.ItemizedClipEncoder, sd: dict[str, torch.Tensor], text_dir: Path, x: torch.Tensor, *,
              normalise_tokens: bool = True, eps: float = 1e-5) -> dict[str, torch.Tensor]:  # fmt: skip
    """§5 score and §6 map: t = n(text), T = n(tokens), c = block(t, T, T), s = <n(c), t>."""
    t = F.normalize(ref_text(sd, text_dir, enc.prompts.texts()).double(), dim=-1)
    out = ref_tokens(enc, sd, x)[0].double()
    tokens = F.normalize(out[1:], dim=-1) if normalise_tokens else out[1:]
    c, a = ref_block(sd, t, tokens, eps=eps)
    return {"text": t, "global": out[0], "c": c, "score": (F.normalize(c, dim=-1) * t).sum(-1), "attn": a}


# ------------------------------------------------------------------ tests


def test_prompt_strings_are_the_published_ones(enc: ie.ItemizedClipEncoder) -> None:
    texts = enc.prompts.texts()
    assert len(texts) == 16
    assert texts[0] == "findings consistent with emphysema"
    assert texts[2] == "findings consistent with nodules or nodular density"
    assert texts[3] == "findings consistent with opacity"
    assert texts[9] == "findings consistent with bronchiectasis or bronchiectatic changes"
    assert texts[15] == "findings consistent with arterial wall calcification"


def test_text_side_matches_plain_bert(enc: ie.ItemizedClipEncoder, sd: dict[str, torch.Tensor],
                                      tiny_itemized: dict[str, Path]) -> None:  # fmt: skip
    ref = ref_text(sd, tiny_itemized["text"], enc.prompts.texts())
    torch.testing.assert_close(enc.text_features.cpu(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_maps_embeddings_match_the_contract(enc: ie.ItemizedClipEncoder, sd: dict[str, torch.Tensor],
                                                   tiny_itemized: dict[str, Path], seed: int) -> None:  # fmt: skip
    prepared = _prepared(seed)
    got = enc.analyse(prepared)
    ref = reference(enc, sd, tiny_itemized["text"], prepared.tensor)
    d, h, w = TINY_SPEC.grid_size
    scores = np.array([f.score for f in got.findings])
    np.testing.assert_allclose(scores, ref["score"].numpy(), atol=SCORE_TOL, rtol=0)
    for k, f in enumerate(got.findings):
        a = ref["attn"][k].numpy()
        assert abs(f.null_weight - a[-1]) <= MAP_TOL  # the null slot is the LAST column
        for dd in range(d):  # token i = d·(h·w) + h·w_n + w, reshaped in the input's (D, H, W) order
            for hh in range(h):
                for ww in range(w):
                    assert abs(f.token_map[dd, hh, ww] - a[dd * h * w + hh * w + ww]) <= MAP_TOL
        assert abs(f.token_map.sum() + f.null_weight - 1.0) < 1e-5
        cos = float(np.dot(f.embedding, ref["c"][k].numpy()) / np.linalg.norm(ref["c"][k].numpy())
                    / np.linalg.norm(f.embedding))  # fmt: skip
        assert cos > COS_MIN
    g = ref["global"].numpy()
    assert float(np.dot(got.study_embedding, g) / np.linalg.norm(g)) > COS_MIN
    assert abs(float(np.linalg.norm(got.study_embedding)) - 1.0) < 1e-5


def test_upstream_multiheadattention_call_agrees(enc: ie.ItemizedClipEncoder, sd: dict[str, torch.Tensor],
                                                 tiny_itemized: dict[str, Path]) -> None:  # fmt: skip
    """Upstream's own call: three LayerNorms, then nn.MultiheadAttention(add_zero_attn=True), need_weights False/True."""
    prepared = _prepared(2)
    got = enc.analyse(prepared)
    e = sd["visual_attn.attn.out_proj.weight"].shape[0]
    mha = torch.nn.MultiheadAttention(e, N_HEAD, kdim=e, vdim=e, batch_first=True, add_zero_attn=True)
    lns = {n: torch.nn.LayerNorm(e, eps=1e-5) for n in ("ln_q", "ln_k", "ln_v")}
    mha.load_state_dict({k[len("visual_attn.attn."):]: v for k, v in sd.items() if k.startswith("visual_attn.attn.")})
    for n, m in lns.items():
        m.load_state_dict({"weight": sd[f"visual_attn.{n}.weight"], "bias": sd[f"visual_attn.{n}.bias"]})
    with torch.no_grad():
        t = F.normalize(ref_text(sd, tiny_itemized["text"], enc.prompts.texts()), dim=-1)[None]
        tokens = F.normalize(ref_tokens(enc, sd, prepared.tensor)[:, 1:], dim=-1)
        q, k, v = lns["ln_q"](t), lns["ln_k"](tokens), lns["ln_v"](tokens)
        c, _ = mha(q, k, v, need_weights=False)
        _, a = mha(q, k, v, need_weights=True, average_attn_weights=True)
    s = (F.normalize(c, dim=-1) * t).sum(-1)[0]
    np.testing.assert_allclose([f.score for f in got.findings], s.numpy(), atol=SCORE_TOL, rtol=0)
    maps = np.stack([np.concatenate([f.token_map.reshape(-1), [f.null_weight]]) for f in got.findings])
    np.testing.assert_allclose(maps, a[0].numpy(), atol=MAP_TOL, rtol=0)


def test_comparison_catches_unnormalised_tokens_and_wrong_eps(enc: ie.ItemizedClipEncoder, sd: dict[str, torch.Tensor],
                                                              tiny_itemized: dict[str, Path]) -> None:  # fmt: skip
    """The tolerances above are not vacuous: the two easy departures from §5 exceed them."""
    prepared = _prepared(0)
    got = enc.analyse(prepared)
    maps = np.stack([np.concatenate([f.token_map.reshape(-1), [f.null_weight]]) for f in got.findings])
    for kwargs in ({"normalise_tokens": False}, {"eps": 1e-6}):
        wrong = reference(enc, sd, tiny_itemized["text"], prepared.tensor, **kwargs)
        assert np.abs(maps - wrong["attn"].numpy()).max() > 10 * MAP_TOL, kwargs


def test_per_head_maps_average_to_the_map(enc: ie.ItemizedClipEncoder) -> None:
    from pipelines.models.itemizedclip.model import forward_items

    with torch.no_grad():
        out = forward_items(enc.model, _prepared(3).tensor, enc.text_features, per_head=True)
    assert out.head_attention is not None and out.head_attention.shape == (1, N_HEAD, 16, TINY_SPEC.grid_size[0]
                                                                            * TINY_SPEC.grid_size[1]
                                                                            * TINY_SPEC.grid_size[2] + 1)  # fmt: skip
    torch.testing.assert_close(out.head_attention.mean(1), out.attention, atol=1e-7, rtol=0)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(1, 16), atol=1e-6, rtol=0)
