"""Tiny random-weight ItemizedCLIP checkpoints in the published layout (ItemizedCLIP, arXiv 2512.11141).

The trunk is a small HLIP (embed 48, depth 3, slice/study/slice, image 24×48×64, patch
8×16×16 → a **non-cubic** 3×3×4 token grid, so a wrong reshape order is visible); the CLIP
embedding is 32 (8 heads of 4, like the published 8 heads of 64); the text tower is a
2-layer BERT with a vocabulary written here, loaded offline; context length 77 as published.
Every tensor is randomised (LayerNorm affines, biases, ``cls_token``, logit scale/bias) so
no part of the computation can hide behind an identity initialisation.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from library.prompts.itemized import load_item_prompt_set
from pipelines.models.study_encoder import visual

TINY_TRUNK = "itemizedclip_test_tiny_h2"
TINY_MODEL = "itemizedclip-test-tiny"
TINY_SPEC = visual.HlipSpec(img_size=(24, 48, 64), patch_size=(8, 16, 16), embed_dim=48, depth=3, num_heads=4,
                            slice_attn_indexes=(0, 2), study_attn_indexes=(1,), max_num_scans=1)  # fmt: skip
EMBED = 32


def write_text_dir(path: Path, words: set[str]) -> Path:
    """A 2-layer BERT config + ``vocab.txt`` (positions ≥ 77, the published context length)."""
    from transformers import BertConfig

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=96).save_pretrained(path)  # fmt: skip
    return path


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter and persistent buffer with seeded noise (scale keeps activations sane)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            if p.ndim == 0:
                p.copy_(torch.randn((), generator=g))
            elif name.endswith(("LayerNorm.weight", "norm.weight", "norm1.weight", "norm2.weight", ".weight")) and p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
        # Peaked attention in the item block (as trained weights have; flat random attention would
        # make every map ~1/L and hide errors): larger query/key projections.
        w = model.state_dict()["visual_attn.attn.in_proj_weight"]
        e = w.shape[1]
        w[: 2 * e].mul_(2.0)


def build_tiny_itemized(root: Path, *, seed: int = 7) -> dict[str, Path]:
    """Write a tiny ItemizedCLIP training checkpoint (``module.`` keys, epoch/name/optimizer/scaler),
    its open_clip config and a toy BERT directory under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = load_item_prompt_set()
    words: set[str] = set()
    for text in prompts.texts():
        words |= set(re.findall(r"[a-z]+|[^a-z\s]", text.lower()))
    text_dir = write_text_dir(root / "text", words)
    cfg_dir = root / "configs"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / f"{TINY_MODEL}.json").write_text(json.dumps({
        "embed_dim": EMBED, "init_logit_scale": 2.65926, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": list(TINY_SPEC.img_size), "timm_model_name": TINY_TRUNK,
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": {"hf_model_name": "unused", "hf_tokenizer_name": "unused", "hf_model_pretrained": False,
                     "hf_proj_type": "linear", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 77},
    }))  # fmt: skip
    visual.register_hlip_variant(TINY_TRUNK, TINY_SPEC)
    from pipelines.models.itemizedclip.model import build_model

    torch.manual_seed(seed)
    model = build_model(TINY_MODEL, text_dir, config_dir=cfg_dir)
    randomise(model, seed)
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    ckpt = root / "epoch_1.pt"
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 1e-4}]}
    torch.save({"epoch": 1, "name": "tiny-itemized", "state_dict": sd, "optimizer": optimizer,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0}}, ckpt)  # fmt: skip
    return {"root": root, "text": text_dir, "configs": cfg_dir, "checkpoint": ckpt}


@pytest.fixture(scope="session")
def tiny_itemized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_itemized(tmp_path_factory.mktemp("itemized-tiny"))
