"""The real-size architecture built offline has the published key layout and parameter count (YH0517/AFLoc 940e3d7)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.models.afloc.model import build_model


def test_published_sizes(tmp_path: Path) -> None:
    from transformers import BertConfig

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(28996 - len(vocab))]  # Bio_ClinicalBERT: 28,996 entries
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    BertConfig(vocab_size=28996).save_pretrained(tmp_path)  # BERT-base: 12 layers, 768, 12 heads, 3072, 512 positions
    model = build_model(tmp_path)
    sd = model.state_dict()
    keys = set(sd) | {"text_encoder.model.embeddings.position_ids"}  # non-persistent in current transformers
    assert len(keys) == 522
    assert sum(k.startswith("text_encoder.model.") for k in keys) == 200
    assert sum(k.startswith("img_encoder.model.") for k in keys) == 318
    assert sum(k.endswith("num_batches_tracked") for k in keys) == 53
    assert not any(k.startswith("img_encoder.model.fc") or "local_f_embedder" in k for k in keys)
    assert tuple(sd["img_encoder.global_embedder.weight"].shape) == (768, 2048)
    assert tuple(sd["img_encoder.local_embedder.weight"].shape) == (768, 1024, 1, 1)
    assert tuple(sd["img_encoder.local2_embedder.weight"].shape) == (768, 512, 1, 1)
    assert "img_encoder.local_embedder.bias" not in sd and "img_encoder.global_embedder.bias" in sd
    params = {n: p.numel() for n, p in model.named_parameters()}
    assert sum(params.values()) == 134_571_584
    assert sum(v for n, v in params.items() if n.startswith("img_encoder.model.")) == 23_508_032
    assert sum(v for n, v in params.items() if n.startswith("text_encoder.")) == 108_310_272
    with torch.no_grad():
        g, local, local2 = model.encode_image(torch.zeros(1, 3, 224, 224))
    assert g.shape == (1, 768) and local.shape == (1, 768, 19, 19) and local2.shape == (1, 768, 38, 38)
