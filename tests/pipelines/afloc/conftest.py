"""Small random-weight AFLoc checkpoints in the published Lightning 1.1.4 layout (YH0517/AFLoc).

The image side is the real ResNet-50 (the published trunk; no smaller variant exists in the
key layout); the text side is a 3-layer BERT (hidden 32, so the embeddings are 32-d) with a
vocabulary written here, loaded offline.  The envelope mimics Lightning's: ``epoch``,
``global_step``, ``pytorch-lightning_version``, ``callbacks`` keyed by the ``ModelCheckpoint``
**class**, optimizer/scheduler/AMP entries, ``hyper_parameters`` as an OmegaConf
``DictConfig`` (pickled by stand-in classes registered under the real module names just for
the save), ``afloc.`` key prefix and the ``position_ids`` buffer old transformers saved.
Every tensor is randomised, BatchNorm running statistics included.
"""

from __future__ import annotations

import io
import json
import os
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pipelines.models.afloc.model import AflocModel, build_model

WORDS = [
    "findings", "suggesting", "pneumo", "##thorax", "no", "edema", "pleural", "effusion", "left", "right",
    "small", "large", "the", "of", "with", "lung", "opacity", "cardio", "##megaly", "consolidation",
    "atelectasis", "pneumonia", "fracture", "support", "devices", "lesion", "enlarged", "cardiomediastinum",
    "thickening", "mild", "severe", ".", "5", "cm", "nodule", "a", "b", "c", "d", "e",
    "f"]  # fmt: skip
HIDDEN = 32
MAX_POSITIONS = 128


def write_text_dir(path: Path) -> Path:
    from transformers import BertConfig

    path.mkdir(parents=True,
    exist_ok=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]",
    "[MASK]", *WORDS,
]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=MAX_POSITIONS).save_pretrained(path)  # fmt: skip
    return path


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            if name.endswith("running_var"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


# -- stand-ins pickled under the real Lightning / OmegaConf names ---------------------------------
_FAKE = {
    "pytorch_lightning.callbacks.model_checkpoint": ["ModelCheckpoint"],
    "omegaconf.dictconfig": ["DictConfig"],
    "omegaconf.listconfig": ["ListConfig"],
    "omegaconf.nodes": ["AnyNode"],
    "omegaconf.base": ["ContainerMetadata", "Metadata"],
}


class _Stateful:
    def __init__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _install_fakes() -> tuple[dict[str, Any], dict[str, type]]:
    saved = {}
    classes: dict[str, type] = {}
    for module in _FAKE:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            saved.setdefault(name, sys.modules.get(name))
            sys.modules[name] = types.ModuleType(name)
    for module, names in _FAKE.items():
        for n in names:
            cls = type(n, (_Stateful,), {"__module__": module, "__qualname__": n})
            setattr(sys.modules[module], n, cls)
            classes[n] = cls
    return saved, classes


def _restore(saved: dict[str, Any]) -> None:
    for name, mod in saved.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod


def _node(classes: dict[str, type], value: Any) -> Any:
    if isinstance(value, dict):
        meta = classes["ContainerMetadata"]({"ref_type": Any, "object_type": dict, "optional": True, "key": None,
                                             "flags": {}, "key_type": Any, "element_type": Any})  # fmt: skip
        return classes["DictConfig"]({"_content": {k: _node(classes, v) for k, v in value.items()},
                                      "_metadata": meta, "_parent": None})  # fmt: skip
    if isinstance(value, list):
        return classes["ListConfig"]({"_content": [_node(classes, v) for v in value], "_parent": None})
    return classes["AnyNode"]({"_val": value, "_metadata": classes["Metadata"]({"ref_type": Any, "optional": True}),
                               "_parent": None})  # fmt: skip


CONFIG = {"phase": "pretrain", "model": {"norm": False, "afloc": {"temp1": 4.0, "temp2": 5.0, "temp3": 10.0}},
          "data": {"text": {"word_num": 97, "captions_per_image": 5}, "image": {"imsize": 256}},
          "transforms": {"norm": "half", "random_crop": {"crop_size": 224}}, "lightning": {"trainer": {"gpus": [0, 1]}}}  # fmt: skip


def envelope(state_dict: dict[str, torch.Tensor], extra_hp: Any = None, config: dict[str, Any] | None = None) -> bytes:
    """``torch.save`` bytes of a Lightning-1.1.4-style checkpoint around ``state_dict`` (keys as given)."""
    saved, classes = _install_fakes()
    try:
        hp = _node(classes, config if config is not None else CONFIG)
        if extra_hp is not None:
            hp.extra = extra_hp
        ckpt = {
            "epoch": 3,
            "global_step": 1234,
            "pytorch-lightning_version": "1.1.4",
            "callbacks": {classes["ModelCheckpoint"]: {
                "monitor": "val_loss", "best_model_score": torch.tensor(1.5), "best_model_path": "x.ckpt",
                "current_score": torch.tensor(1.7), "dirpath": "ckpt",
            }},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 2e-5}]}],
            "lr_schedulers": [{"step_size": 1, "gamma": 0.9}],
            "native_amp_scaling_state": {"scale": 65536.0, "_growth_tracker": 0},
            "state_dict": state_dict,
            "hparams_name": "cfg",
            "hyper_parameters": hp,
            "hparams_type": classes["DictConfig"],
            "counts": defaultdict(int, {"a": 1}),
        }
        buf = io.BytesIO()
        torch.save(ckpt, buf, pickle_protocol=2)
        return buf.getvalue()
    finally:
        _restore(saved)


def published_state_dict(model: AflocModel) -> dict[str, torch.Tensor]:
    sd = {f"afloc.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["afloc.text_encoder.model.embeddings.position_ids"] = torch.arange(MAX_POSITIONS).reshape(1, -1)
    return sd


@pytest.fixture(scope="session")
def afloc_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("afloc")
    text_dir = write_text_dir(root / "text")
    model = build_model(text_dir)
    randomise(model, 11)
    model.eval()
    ckpt = root / "afloc.ckpt"
    ckpt.write_bytes(envelope(published_state_dict(model)))
    return {"root": root, "text_dir": text_dir, "ckpt": ckpt, "model": model}
