"""Text side: offline tokenizer without truncation, and open_clip tower == HCL-AL TextEncoder."""

from __future__ import annotations

import socket
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pipelines.errors import ModelError
from pipelines.models.text import EOT_TOKEN, SOT_TOKEN, ClipTokenizer, TextTowerConfig, encode_texts, load_text_tower

from . import factory as F


def test_tokenizer_is_offline_and_matches_clip_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from pipelines.models import text

    text._open_clip_tokenizer.cache_clear()  # force a fresh build under the network ban
    tok = ClipTokenizer()
    ids = tok.tokenize(["Liver  S7", "a lesion in the &amp; LIVER s7"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    row = ids[0].tolist()
    n = row.index(EOT_TOKEN) + 1
    assert row[0] == SOT_TOKEN and all(v == 0 for v in row[n:])
    # cleaning: case, whitespace and HTML entities do not change ids of the shared words
    assert tok.encode("liver s7") == row[:n]
    assert tok.encode("a lesion in the & liver s7")[:-1] == ids[1].tolist()[: ids[1].tolist().index(EOT_TOKEN)]
    # well-known OpenAI CLIP BPE ids: "a" -> 320, "photo" -> 1125
    assert tok.encode("a photo") == [SOT_TOKEN, 320, 1125, EOT_TOKEN]


def test_overlong_text_raises_instead_of_truncating() -> None:
    tok = ClipTokenizer()
    with pytest.raises(ModelError) as err:
        tok.tokenize(["word " * 80])
    assert err.value.code == "text_too_long"
    assert tok.tokenize(["word " * 75]).shape == (1, 77)  # 75 + SOT + EOT fits exactly


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=act(), c_proj=nn.Linear(4 * d, d)))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTextEncoder(nn.Module):
    """The HCL-AL text tower (Gao et al. 2025) written out directly (sequence-first MHA, LND)."""

    def __init__(self, width: int, layers: int, heads: int, context: int, vocab: int, out: int,
                 act: type[nn.Module] = _QuickGELU) -> None:  # fmt: skip
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_RefBlock(width, heads, act) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, out))
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        x = (self.token_embedding(text) + self.positional_embedding).permute(1, 0, 2)
        for blk in self.transformer.resblocks:
            x = blk(x, self.mask)
        x = self.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def _small_text_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layout = F.text_layout(width=128, layers=3, embed_dim=96)
    return {k[len("text_encoder.") :]: F.random_tensor(k, s, gen) for k, s in layout.items()}


TEXTS = ["a lesion located in the liver s7 region", "the left upper lobe", "spinous process of vertebra t5", "rib"]


def test_text_tower_equals_reference_encoder_and_open_clip() -> None:
    import open_clip

    sd = _small_text_sd()
    tower = load_text_tower(sd)  # strict: every key used, none missing
    cfg = TextTowerConfig.from_state_dict(sd)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.output_dim) == (128, 3, 2, 96)
    tokens = ClipTokenizer().tokenize(TEXTS)

    ref = RefTextEncoder(128, 3, 2, 77, 49408, 96)
    ref.load_state_dict(sd, strict=True)
    clip = open_clip.CLIP(
        embed_dim=96,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=3),
        quick_gelu=True,
    )
    missing, unexpected = clip.load_state_dict(sd, strict=False)
    assert not unexpected
    assert {k.split(".")[0] for k in missing} == {"visual", "logit_scale"}

    with torch.no_grad():
        ours = tower(tokens)
        theirs_ref = ref(tokens)
        theirs_clip = clip.encode_text(tokens)
    assert (ours - theirs_ref).abs().max() < 1e-5
    assert (ours - theirs_clip).abs().max() < 1e-5
    emb = encode_texts(tower, tokens, batch_size=3)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    assert torch.allclose(emb, ours / ours.norm(dim=-1, keepdim=True), atol=1e-6)


def test_plain_gelu_tower_is_not_equivalent() -> None:
    """Negative control: the ``ViT-B-32`` (nn.GELU) variant gives different embeddings."""
    sd = _small_text_sd(1)
    tokens = ClipTokenizer().tokenize(TEXTS)
    quick, gelu = RefTextEncoder(128, 3, 2, 77, 49408, 96), RefTextEncoder(128, 3, 2, 77, 49408, 96, nn.GELU)
    quick.load_state_dict(sd)
    gelu.load_state_dict(sd)
    with torch.no_grad():
        ours = load_text_tower(sd)(tokens)
        assert (ours - quick(tokens)).abs().max() < 1e-5
        assert (ours - gelu(tokens)).abs().max() > 1e-3


def test_text_tower_rejects_foreign_keys() -> None:
    sd = _small_text_sd()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelError):
        load_text_tower(sd)
