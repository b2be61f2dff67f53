"""Tiny HLIP fixtures: a random-weight checkpoint in the published key layout and a toy BERT text tower.

hlip-compat §15: embed_dim 96 (divisible by 6), depth 3, image 16×48×48, patch 8×16×16.
The schedule slice/study/slice exercises every window change (slice→study, study→slice and
the final slice→study merge).  The text tower is a 2-layer BERT built from a config and a
``vocab.txt`` written here and loaded through open_clip's HF text path offline.
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

from library.prompts import load_prompt_set
from pipelines.models.study_encoder import visual

TINY_TRUNK = "hlip_test_tiny_h2"
TINY_MODEL = "hlip-test-tiny"
TINY_SPEC = visual.HlipSpec(img_size=(16, 48, 48), patch_size=(8, 16, 16), embed_dim=96, depth=3, num_heads=4,
                            slice_attn_indexes=(0, 2), study_attn_indexes=(1,), max_num_scans=1)  # fmt: skip


def write_text_dir(path: Path, words: set[str]) -> Path:
    from transformers import BertConfig

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(path)  # fmt: skip
    return path


def build_tiny_hlip(root: Path, *, seed: int = 1234) -> dict[str, Path]:
    """Write a tiny random-weight HLIP checkpoint (published training-dict layout, DDP ``module.``
    prefix), its open_clip config and a toy BERT text directory under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = load_prompt_set()
    words = set()
    for f in prompts.findings:
        for text in (*prompts.texts(f)[0], *prompts.texts(f)[1]):
            words |= set(re.findall(r"[a-z]+|[^a-z\s]", text.lower()))
    text_dir = write_text_dir(root / "text", words)
    cfg_dir = root / "configs"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / f"{TINY_MODEL}.json").write_text(json.dumps({
        "embed_dim": 16,
        "custom_text": True,
        "vision_cfg": {"image_size": list(TINY_SPEC.img_size), "timm_model_name": TINY_TRUNK,
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": {"hf_model_name": "unused", "hf_tokenizer_name": "unused", "hf_model_pretrained": False,
                     "hf_proj_type": "linear", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 64},
    }))  # fmt: skip
    visual.register_hlip_variant(TINY_TRUNK, TINY_SPEC)
    from pipelines.models.study_encoder.model import build_model, register_configs

    register_configs(cfg_dir)
    torch.manual_seed(seed)
    model = build_model(TINY_MODEL, text_dir)
    with torch.no_grad():  # make the frozen/zero-initialised tensors non-trivial too
        model.visual.trunk.cls_token.normal_(0, 0.5)
        model.logit_scale.fill_(2.0)
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    ckpt = root / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": sd, "optimizer": {}, "scaler": {}}, ckpt)
    return {"root": root, "text": text_dir, "configs": cfg_dir, "checkpoint": ckpt}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_hlip(tmp_path_factory.mktemp("hlip-tiny"))
