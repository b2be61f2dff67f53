"""The ItemizedCLIP open_clip model on Locus's HLIP visual tower, and its checkpoint loader.

What is shared with the HLIP study encoder (:mod:`pipelines.models.study_encoder`), not copied:

* the visual trunk: the same timm-registered :class:`~pipelines.models.study_encoder.visual.HlipVisionTransformer`
  (``vit_base_singlescan_h2_token2744``); ItemizedCLIP's only visual change (arXiv 2512.11141)
  is that the trunk returns the CLS **and every patch token** after the final norm, and
  open_clip's ``head`` (Dropout p=0, ``proj`` Linear 768→512 without bias) is applied to each of
  them.  :meth:`ItemizedCLIP.encode_image` does exactly that with the trunk's own
  ``forward_features``;
  Upstream's trunk registers blocks 2, 5, 8, 11 as *scan* attention where HLIP v1 says *study*;
  with one scan per study the two windows are the same tokens and the CLS mean is over one copy,
  so the shared HLIP trunk computes the same thing (§2 difference 2);
* the model-config registry: ``configs/`` here is registered through the HLIP
  :func:`~pipelines.models.study_encoder.model.register_configs` (public
  ``open_clip.add_model_config``), so the model is named and configured like HLIP's;
* the offline text tower: open_clip ``HFTextEncoder`` built from a **local** BERT directory,
  never downloaded; CXR-BERT's ``.bert`` has no pooler, and neither does this tower
  (``cls_last_hidden_state_pooler`` builds BERT with ``add_pooling_layer=False``);
* checkpoint reading: :func:`~pipelines.models.study_encoder.model.read_checkpoint`
  (``torch.load(weights_only=True)`` or safetensors — a checkpoint cannot run code — SHA-256
  of the file, DDP ``module.`` prefix stripped).

ItemizedCLIP-specific (§1, §4): the class is open_clip ``CustomTextCLIP`` plus ``visual_attn``
(:class:`~.head.PureAttentionPoolingBlock`), ``init_logit_scale`` ln(1/0.07) and a scalar
``logit_bias`` (−10), text context 77.  Loading is strict against the published key set (361
keys for the chest model); the only tolerated differences are the two the reference reader
tolerates, each recorded: an old ``text.transformer.embeddings.position_ids`` buffer is dropped,
and 1-element ``logit_scale``/``logit_bias`` are reshaped to scalars.  An HLIP checkpoint (no
``logit_bias``, no ``visual_attn``) is refused, and so is any missing, extra or re-shaped key.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP
from torch import nn

from pipelines.errors import ModelError
from pipelines.models.itemizedclip.head import PureAttentionPoolingBlock
from pipelines.models.study_encoder import model as hlip_model

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: The published chest-CT model name (upstream ``open_mri/model_configs``).
CHEST_MODEL = "CTRATE_HLIP_BiomedBERT_itemizedclip"
#: Version of Locus's ItemizedCLIP implementation (bump when outputs can change).
IMPLEMENTATION = "locus-itemizedclip-1.0"
_OPTIONAL_BUFFERS = ("text.transformer.embeddings.position_ids",)
_SCALARS = ("logit_scale", "logit_bias")


def register_configs(extra_dir: str | Path | None = None) -> None:
    """Register the HLIP trunks + configs and the ItemizedCLIP configs (and ``extra_dir``) with open_clip.

    The whole-body PET/CT trunks (:mod:`.wholebody`) are registered too, so Locus's own
    variants build and load through this same path.
    """
    from pipelines.models.itemizedclip import wholebody

    wholebody.register_variants()
    hlip_model.register_configs(CONFIG_DIR)
    if extra_dir is not None:
        hlip_model.register_configs(extra_dir)


class ItemizedCLIP(CustomTextCLIP):
    """open_clip ``CustomTextCLIP`` + ``visual_attn`` (upstream ``open_mri/my_model.py:60-92``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        embed_dim = int(kwargs.get("embed_dim", args[0] if args else 512))
        self.visual_attn = PureAttentionPoolingBlock(context_dim=embed_dim)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global [B, E], tokens [B, L, E])``, both raw (upstream ignores ``normalize``, §2).

        The trunk is HLIP's: ``forward_features`` is every token after the final norm,
        ``[B, 1 + L, C]``, CLS first, patches in ``(d, h, w)`` row-major order; the open_clip
        head projects each token.  ``global`` equals HLIP's ``visual(image)`` for the same weights.
        """
        out = self.visual.head(self.visual.trunk.forward_features(image))
        return out[:, 0], out[:, 1:]

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, Any]:
        """Upstream's ``output_dict=True`` result (the tuple path raises upstream and is not offered)."""
        image_features, image_tokens = self.encode_image(image) if image is not None else (None, None)
        text_features = self.encode_text(text) if text is not None else None
        return {
            "image_features": image_features,
            "text_features": text_features,
            "image_tokens": image_tokens,
            "logit_scale": self.logit_scale.exp(),
            "visual_proj": self.visual_attn,
            "logit_bias": self.logit_bias,
        }


@dataclass(frozen=True)
class ItemOutputs:
    """Everything the published inference computes for one batch and K findings (§5, §6)."""

    global_features: torch.Tensor  # [B, E] raw CLS through head.proj (the study embedding before L2)
    text_queries: torch.Tensor  # [K, E] unit-norm t_k
    conditioned: torch.Tensor  # [B, K, E] raw block output c_k (need_weights=False path)
    scores: torch.Tensor  # [B, K] <n(c_k), t_k>
    attention: torch.Tensor  # [B, K, L + 1] head-averaged weights; last column = null slot
    head_attention: torch.Tensor | None  # [B, n_head, K, L + 1] when requested


HeadOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def item_head(model: ItemizedCLIP, image_tokens: torch.Tensor, text_features: torch.Tensor,
              *, per_head: bool = False) -> HeadOutputs:  # fmt: skip
    """The published zero-shot rule on precomputed tokens (§5): normalise, attend, cosine.

    ``text_features`` ``[K, E]`` (raw ``text.proj`` output or already unit-norm),
    ``image_tokens`` ``[B, L, E]`` raw.  Both the queries and **every token** are L2-normalised
    before the block (feeding raw tokens moves maps by 3e-3); the conditioned embedding and the
    score come from the ``need_weights=False`` call, the maps from a ``need_weights=True`` call on
    the same inputs, as the contract prescribes.  Returns ``(c [B,K,E], s [B,K], a [B,K,L+1],
    a_heads or None)``.
    """
    t = F.normalize(text_features.to(image_tokens.dtype), dim=-1)
    tokens = F.normalize(image_tokens, dim=-1)
    q = t[None].expand(tokens.shape[0], *t.shape)
    block = model.visual_attn
    c = block(q, tokens, tokens)
    _, weights = block(q, tokens, tokens, output_attn_weights=True)
    heads = None
    if per_head:
        _, heads = block(q, tokens, tokens, output_attn_weights=True, average_attn_weights=False)
    scores = (F.normalize(c, dim=-1) * q).sum(dim=-1)
    return c, scores, weights, heads


def forward_items(model: ItemizedCLIP, image: torch.Tensor, text_features: torch.Tensor,
                  *, per_head: bool = False) -> ItemOutputs:  # fmt: skip
    """One visual forward → per-finding embeddings, scores and maps for ``text_features`` ``[K, E]``."""
    g, tokens = model.encode_image(image)
    c, s, a, heads = item_head(model, tokens, text_features, per_head=per_head)
    return ItemOutputs(g, F.normalize(text_features.to(tokens.dtype), dim=-1), c, s, a, heads)


# ----------------------------------------------------------------------------- building and loading


def build_model(model_name: str, text_dir: str | Path, *, config_dir: str | Path | None = None) -> ItemizedCLIP:
    """An :class:`ItemizedCLIP` for a registered config, random weights, text tower from ``text_dir``.

    Mirrors upstream's factory fork (``my_custom_model=True`` instantiates ``ItemizedCLIP``
    instead of ``CustomTextCLIP``) with the offline switches of §1: no MAE download, BERT built
    from the local config, no pretrained text weights.
    """
    import open_clip

    register_configs(config_dir)
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ModelError(f"no open_clip config named {model_name!r}", code="model_unknown")
    if "init_logit_bias" not in cfg:
        raise ModelError(f"{model_name!r} is not an ItemizedCLIP config (no init_logit_bias)", code="model_unknown")
    text_dir = Path(text_dir).resolve()
    hlip_model._check_text_dir(text_dir)
    cfg = copy.deepcopy(cfg)
    cfg.pop("custom_text", None)
    cfg["vision_cfg"]["timm_model_pretrained"] = False
    cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir), hf_model_pretrained=False)
    model = ItemizedCLIP(**cfg, output_dict=True)
    return model


@dataclass(frozen=True)
class ItemizedCheckpoint:
    """A loaded ItemizedCLIP checkpoint, pinned by its file hash."""
    path: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    adjustments: tuple[str, ...] = ()  # what was changed to match the model (recorded, logged)


def read_checkpoint(path: str | Path) -> ItemizedCheckpoint:
    """Read a published-layout ItemizedCLIP checkpoint safely (weights-only; §4 "Loading")."""
    ckpt = hlip_model.read_checkpoint(path)
    sd = dict(ckpt.state_dict)
    adjustments = list(ckpt.renamed)
    for key in _OPTIONAL_BUFFERS:  # the fork's load_checkpoint drops it (factory.py:225-228)
        if key in sd:
            del sd[key]
            adjustments.append(f"dropped {key}")
    for key in _SCALARS:  # the fork's loader reshapes 1-d scalars (factory.py:213-219)
        if key in sd and sd[key].ndim == 1 and sd[key].numel() == 1:
            sd[key] = sd[key].reshape(())
            adjustments.append(f"reshaped {key} to a scalar")
    return ItemizedCheckpoint(ckpt.path, ckpt.sha256, sd, tuple(adjustments))


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)``; a mismatch is a :class:`ModelError` naming what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        hint = ""
        if any(k.startswith("visual_attn.") for k in missing) and "logit_bias" in missing:
            hint = " (this looks like an HLIP checkpoint: it has no visual_attn block and no logit_bias)"
        raise ModelError(
            f"checkpoint does not match the ItemizedCLIP layout{hint}: {len(missing)} missing {missing[:6]}, "
            f"{len(unexpected)} unexpected {unexpected[:6]}, {len(shapes)} with other shapes {shapes[:6]}",
            code="checkpoint_layout",
        )
    model.load_state_dict(dict(state_dict), strict=True)


def load_model(checkpoint: str | Path, text_dir: str | Path, *, model_name: str = CHEST_MODEL,
               config_dir: str | Path | None = None, expected_sha256: str = "",
               ) -> tuple[ItemizedCLIP, ItemizedCheckpoint]:  # fmt: skip
    """Build ``model_name`` offline and load ``checkpoint`` into it strictly (eval mode, CPU, fp32)."""
    ckpt = read_checkpoint(checkpoint)
    if expected_sha256 and ckpt.sha256 != expected_sha256:
        raise ModelError(f"ItemizedCLIP checkpoint sha256 {ckpt.sha256[:16]}… differs from the pinned "
                         f"{expected_sha256[:16]}…", code="model_hash_mismatch")  # fmt: skip
    model = build_model(model_name, text_dir, config_dir=config_dir)
    load_strict(model, ckpt.state_dict)
    model.eval()
    log.info("ItemizedCLIP %s loaded: sha256=%s adjustments=%s", model_name, ckpt.sha256[:12], list(ckpt.adjustments))
    return model, ckpt
