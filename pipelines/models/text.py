"""OpenAI-CLIP text towers built from open_clip, and the tokenizer that feeds them.

HCL-AL's ``TextEncoder`` is the OpenAI CLIP ViT-B/32 text transformer (HCL-AL, Gao et al. 2025):
causal mask, QuickGELU, LayerNorm in fp32, EOT pooling by ``argmax`` of the token ids, and
``text_projection`` as a bare ``(width, embed_dim)`` matrix.  open_clip's
:class:`~open_clip.transformer.TextTransformer` with ``act_layer=QuickGELU``,
``pool_type='argmax'`` and ``proj_type='linear'`` (no bias) has the same parameter names and
the same arithmetic, which is what ``ViT-B-32-quickgelu`` builds.  Plain ``ViT-B-32`` uses
``nn.GELU`` and does **not** match (max diff ~0.077 on random weights).

The configuration is inferred from the state-dict shapes (width, layers, vocabulary,
context, output dimension), so the published 512-wide/12-layer tower loads strictly and
small test towers in the same layout do too.  The head count does not appear in any shape;
OpenAI CLIP uses 64-dimensional heads (512 → 8), and that rule is applied unless the caller
says otherwise.

The tokenizer is open_clip's bundled OpenAI BPE (``bpe_simple_vocab_16e6.txt.gz``, identical
to HCL-AL's copy): no downloads.  Unlike open_clip, which silently truncates, HCL-AL raises
on text longer than the context, and so does :meth:`ClipTokenizer.tokenize`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.errors import ModelError

#: open_clip model name whose tokenizer and text tower HCL-AL's text side equals.
OPEN_CLIP_MODEL = "ViT-B-32-quickgelu"
SOT_TOKEN = 49406
EOT_TOKEN = 49407
HEAD_DIM = 64

_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


@dataclass(frozen=True)
class TextTowerConfig:
    """The architecture of a CLIP text tower."""
    width: int
    layers: int
    heads: int
    context_length: int
    vocab_size: int
    output_dim: int

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], heads: int | None = None) -> TextTowerConfig:
        """Infer the architecture from the tensors of a CLIP text tower (no prefix)."""
        try:
            vocab, width = sd["token_embedding.weight"].shape
            context = sd["positional_embedding"].shape[0]
            proj_in, out_dim = sd["text_projection"].shape
        except KeyError as exc:
            raise ModelError(f"text tower weights lack {exc.args[0]!r}", code="text_tower_layout") from exc
        if proj_in != width:
            raise ModelError(f"text_projection {tuple(sd['text_projection'].shape)} does not match width {width}",
                             code="text_tower_layout")  # fmt: skip
        layers = len({int(m.group(1)) for k in sd if (m := _RESBLOCK.match(k))})
        if layers == 0:
            raise ModelError("text tower has no transformer.resblocks", code="text_tower_layout")
        if heads is None:
            if width % HEAD_DIM:
                raise ModelError(f"cannot infer head count for width {width}; pass heads=", code="text_tower_layout")
            heads = width // HEAD_DIM
        return cls(int(width), layers, int(heads), int(context), int(vocab), int(out_dim))


def build_text_tower(cfg: TextTowerConfig) -> nn.Module:
    """An open_clip TextTransformer with the OpenAI/HCL-AL settings (QuickGELU, argmax pool)."""
    from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

    return TextTransformer(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        output_dim=cfg.output_dim,
        pool_type="argmax",
        proj_type="linear",
        proj_bias=False,
        act_layer=QuickGELU,
        norm_layer=LayerNorm,
    )


def load_text_tower(sd: Mapping[str, torch.Tensor], heads: int | None = None) -> nn.Module:
    """Build a tower matching ``sd`` and load it strictly (every key used, none missing)."""
    tower = build_text_tower(TextTowerConfig.from_state_dict(sd, heads))
    result = tower.load_state_dict(dict(sd), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"text tower weights do not match the CLIP layout: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}",
            code="text_tower_layout",
        )
    return tower.eval()


@functools.lru_cache(maxsize=1)
def _open_clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer(OPEN_CLIP_MODEL)


class ClipTokenizer:
    """OpenAI CLIP BPE tokenizer without truncation (HCL-AL ``SimpleTokenizer.tokenize``)."""

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length
        self._tok = _open_clip_tokenizer()

    def encode(self, text: str) -> list[int]:
        """Token ids with SOT/EOT (same cleaning: ftfy, HTML unescape, whitespace, lower case)."""
        return [SOT_TOKEN, *self._tok.encode(text), EOT_TOKEN]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, context]`` int64 ids, zero padded; raises on over-long text instead of truncating."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > self.context_length:
                raise ModelError(
                    f"description {text[:60]!r} has {len(ids)} tokens, more than the context length "
                    f"{self.context_length}",
                    code="text_too_long",
                )
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@torch.inference_mode()
def encode_texts(tower: nn.Module, tokens: torch.Tensor, *, batch_size: int = 64, post: nn.Module | None = None) -> torch.Tensor:
    """L2-normalised fp32 text embeddings ``[N, D]`` (on the tower's device).

    ``post`` is an optional extra projection applied before normalisation (the trainable
    ``text_fc`` of ``ClipText_Fc_BasicNet``).
    """
    device = next(tower.parameters()).device
    chunks = []
    for start in range(0, tokens.shape[0], batch_size):
        x = tower(tokens[start : start + batch_size].to(device)).float()
        if post is not None:
            x = post(x).float()
        chunks.append(x)
    emb = torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)
    return emb / emb.norm(dim=-1, keepdim=True)
