"""Random-weight HCL-AL checkpoints written in the published dict layout, for tests.

The key names and shapes come from the HCL-AL reference code (Gao et al. 2025), written out here
independently of Locus's network code, so strict loading by Locus is a real check of the
layout.  Shapes can be shrunk (text width/layers, embedding size, crop size) to keep
tests fast; the full-size layout is the default of :func:`expected_layout`.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import torch

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
RES_CONVS = {32: 1, 64: 2, 128: 3, 256: 3}

NORMALIZERS = [
    {"type": 0, "mean": 40, "stddev": 200, "clip": True},
    {"type": 0, "mean": 3, "stddev": 3, "clip": False},
    {"type": 0, "mean": 0, "stddev": 1, "clip": False},
]


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (() if n == "num_batches_tracked" else (c,)) for n in _BN}


def image_layout(net: str, crop_size: tuple[int, int, int], embed_dim: int = 512) -> dict[str, tuple[int, ...]]:
    """``image_encoder.*`` keys and shapes (§6)."""
    out: dict[str, tuple[int, ...]] = {"in_block.conv.weight": (16, 3, 3, 3, 3), "in_block.conv.bias": (16,)}
    out.update(_bn("in_block.bn", 16))
    for c in (32, 64, 128, 256):
        blk = f"down_{c}"
        if net == "ClipText_ResidualNet":
            out[f"{blk}.down_conv.weight"] = (c, c // 2, 2, 2, 2)
            out[f"{blk}.down_conv.bias"] = (c,)
            out.update(_bn(f"{blk}.down_bn", c))
            for k in range(RES_CONVS[c]):
                out[f"{blk}.rblock.ops.{k}.0.weight"] = (c, c, 3, 3, 3)
                out[f"{blk}.rblock.ops.{k}.0.bias"] = (c,)
                out.update(_bn(f"{blk}.rblock.ops.{k}.1", c))
        else:  # BasicNet family
            out[f"{blk}.conv.weight"] = (c, c // 2, 3, 3, 3)
            out[f"{blk}.conv.bias"] = (c,)
            out.update(_bn(f"{blk}.bn", c))
    fc_in = 256 * math.prod(n // 16 for n in crop_size)
    out["fc.weight"] = (embed_dim, fc_in)
    out["fc.bias"] = (embed_dim,)
    return {f"image_encoder.{k}": v for k, v in out.items()}


def text_layout(width: int = 512, layers: int = 12, embed_dim: int = 512, context: int = 77,
                vocab: int = 49408) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """``text_encoder.*`` keys and shapes of the OpenAI CLIP text tower (§7, §12)."""
    out: dict[str, tuple[int, ...]] = {
        "positional_embedding": (context, width),
        "token_embedding.weight": (vocab, width),
        "text_projection": (width, embed_dim),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}"
        out.update({
            f"{b}.attn.in_proj_weight": (3 * width, width), f"{b}.attn.in_proj_bias": (3 * width,),
            f"{b}.attn.out_proj.weight": (width, width), f"{b}.attn.out_proj.bias": (width,),
            f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
            f"{b}.mlp.c_fc.weight": (4 * width, width), f"{b}.mlp.c_fc.bias": (4 * width,),
            f"{b}.mlp.c_proj.weight": (width, 4 * width), f"{b}.mlp.c_proj.bias": (width,),
            f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,),
        })  # fmt: skip
    return {f"text_encoder.{k}": v for k, v in out.items()}


def expected_layout(net: str = "ClipText_ResidualNet", crop_size: tuple[int, int, int] = (96, 96, 128),
                    width: int = 512, layers: int = 12, embed_dim: int = 512) -> dict[str, tuple[int, ...]]:  # fmt: skip
    layout = {"logit_scale": ()}
    layout.update(text_layout(width, layers, embed_dim))
    layout.update(image_layout(net, crop_size, embed_dim))
    if net == "ClipText_Fc_BasicNet":
        layout.update({"text_fc.weight": (embed_dim, embed_dim), "text_fc.bias": (embed_dim,)})
    return layout


def parameter_count(layout: dict[str, tuple[int, ...]]) -> int:
    """Trainable parameters (BatchNorm running statistics excluded, logit_scale included)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(s) for k, s in layout.items() if not k.endswith(buffers))


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    if key == "logit_scale":
        return torch.tensor(math.log(1 / 0.07))
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.long)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if key.endswith("running_mean"):
        return normal(0.1)
    if key.startswith("image_encoder"):
        if len(shape) > 1:
            fan_in = math.prod(shape[1:])
            return normal(math.sqrt(2.0 / fan_in))
        if ".bn." in key or "_bn." in key or ".1.weight" in key:
            return normal(0.02, 1.0) if key.endswith("weight") else normal(0.02)
        return normal(0.02)
    # text tower / text_fc
    if key.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
        return normal(0.05, 1.0)
    if key.endswith("token_embedding.weight"):
        return normal(0.02)
    if key.endswith("positional_embedding"):
        return normal(0.01)
    if len(shape) == 2:
        return normal(min(shape) ** -0.5)
    return normal(0.02)


def make_state(
    net: str = "ClipText_ResidualNet",
    crop_size: tuple[int, int, int] = (32, 32, 48),
    spacing: tuple[float, float, float] = (4.0, 4.0, 6.0),
    width: int = 64,
    layers: int = 2,
    embed_dim: int = 64,
    seed: int = 0,
    prefix: str = "module.",
) -> dict:
    """A checkpoint dict exactly like HCL-AL's ``save_pytorch_model`` input (§12)."""
    gen = torch.Generator().manual_seed(seed)
    layout = expected_layout(net, crop_size, width, layers, embed_dim)
    sd = {prefix + k: random_tensor(k, s, gen) for k, s in layout.items()}
    return {
        "epoch": 350,
        "batch": 90000,
        "net": net,
        "max_stride": 16,
        "state_dict": sd,
        "spacing": list(spacing),
        "crop_size": list(crop_size),
        "crop_normalizers": [dict(n) for n in NORMALIZERS],
        "box_percent_padding": 0.75,
        "sample_method": "fixed_length",
        "interpolation": ["linear", "linear", "nn"],
        "input_channel": 3,
        "lesion_idx": [2],
    }


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def encrypt_uai(payload: bytes, key: bytes, segment_size: int = 8) -> bytes:
    """The documented "uAI_model" scheme (§12), written independently of Locus's decryptor."""
    from Crypto.Cipher import AES

    padded = payload + b"\x01"
    padded += b"\0" * (16 - len(padded) % 16)
    body = base64.b64encode(AES.new(key, AES.MODE_CFB, iv=key, segment_size=segment_size).encrypt(padded))
    return UAI_HEADER + body


UAI_HEADER = b"uAI_model" + b"\0" * (128 - len(b"uAI_model"))
UAI_KEY = b"*c!q9Kj*k?2>+5@p"  # HCL-AL md_clip3d/utils/base/crypto.py


def write_checkpoint(path: Path, state: dict, *, encrypted: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = torch_bytes(state)
    path.write_bytes(encrypt_uai(data, UAI_KEY) if encrypted else data)
    return path


# -- a small synthetic vocabulary with the published structure --------------------------
def synthetic_vocabulary() -> tuple[dict, dict]:
    """Regions → coarse → {fine: final}; shared fine words, coarse=fine names, one orphan."""
    vocab = {
        "Chest": {
            "Left lung": {"Left upper lobe": "Left upper lobe", "Left lower lobe": "Left lower lobe"},
            "Right lung": {"Right upper lobe": "Right upper lobe", "Right lower lobe": "Right lower lobe"},
            "Mediastinum": {"Mediastinum 4R": "Mediastinum 4R", "Aorta": "Thoracic aorta", "Esophagus": "Esophagus"},
        },
        "Abdomen": {
            "Liver": {"Liver S1": "Liver S1", "Liver S7": "Liver S7", "Around the liver": "Around the liver"},
            "Retroperitoneum": {"Retroperitoneum": "Retroperitoneum", "Aorta": "Abdominal aorta"},
            "Spleen": {"Spleen": "Spleen"},
        },
        "Axial skeleton": {
            "Vertebra T4": {"Thoracic spine": "Vertebra T4", "Spinous process": "Spinous process of vertebra T4"},
            "Vertebra T5": {"Thoracic spine": "Vertebra T5", "Spinous process": "Spinous process of vertebra T5"},
            "Rib L3": {"Rib": "Left rib 3"},
            "Rib R3": {"Rib": "Right rib 3"},
        },
    }
    words: list[str] = []
    for coarse_map in vocab.values():
        for coarse, fine_map in coarse_map.items():
            words.append(coarse)
            words.extend(fine_map)
    desc = {w: f"a lesion located in the {w.lower()} region" for w in dict.fromkeys(words)}
    desc["Lung"] = "a lesion in the lung"  # orphan, as in the published file
    return vocab, desc


def write_vocabulary(tmp: Path) -> tuple[Path, Path]:
    vocab, desc = synthetic_vocabulary()
    v, d = tmp / "anatomy_vocabulary_library.json", tmp / "augmented_location_descriptions.json"
    v.write_text(json.dumps(vocab, indent=2), encoding="utf-8")
    d.write_text(json.dumps(desc, indent=2), encoding="utf-8")
    return v, d


def write_release_dir(root: Path, *, coarse: dict, fine: dict, regions: tuple[str, ...],
                      seeds: tuple[int, int] = (21, 22)) -> Path:
    """A directory in HCL-AL's release layout with real final strings of ``regions``.

    The vocabulary is the library's HCL-AL tree restricted to ``regions`` (so predicted
    strings map to coded library sites); the description sentences are written here.
    """
    from library import load_library

    write_checkpoint(root / "coarse" / "params.pth", make_state(seed=seeds[0], **coarse))
    write_checkpoint(root / "fine" / "params.pth", make_state(seed=seeds[1], **fine))
    tree = load_library().hclal.tree()
    vocab = {region: tree[region] for region in regions}
    words = dict.fromkeys(w for coarse_map in vocab.values() for key, fine_map in coarse_map.items()
                          for w in (key, *fine_map))
    desc = {w: f"test sentence {i}: {w.lower()}" for i, w in enumerate(words)}
    (root / "anatomy_vocabulary_library.json").write_text(json.dumps(vocab), encoding="utf-8")
    (root / "augmented_location_descriptions.json").write_text(json.dumps(desc), encoding="utf-8")
    return root
