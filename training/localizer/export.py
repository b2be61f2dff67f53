"""Write trained stages as HCL-AL ``params.pth`` files plus Locus metadata (HCL-AL, Gao et al. 2025).

The dict has HCL-AL's keys and layout – ``net``, a DataParallel-style ``state_dict``
(``module.`` prefix), ``spacing``, ``crop_size``, ``crop_normalizers``, ``interpolation``,
``input_channel``, ``lesion_idx``, ``max_stride``, ``sample_method``,
``box_percent_padding``, ``epoch``, ``batch`` – so HCL-AL-compatible loaders (Locus's
strict one included) read it.  One extra key, ``locus``, holds plain JSON-like metadata:
the anatomy-library stamp and vocabulary hashes, a training-data summary, the training
configuration and loss, evaluation metrics, and the fitted temperature (only when one was
fitted; nothing claims calibration otherwise).

``dtype="float16"`` stores floating tensors in half precision (the shipped demo weights,
to stay small: the CLIP token embedding alone is 49,408 x width); Locus's loader casts
them back to float32, and ``locus.stored_dtype`` records it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from pipelines.models.localizer.network import HclalClipNet
from training.localizer.train import StageConfig

LOCUS_METADATA_KEY = "locus"
METADATA_FORMAT = "locus-localizer-checkpoint/1"


def checkpoint_dict(net: HclalClipNet, cfg: StageConfig, metadata: dict[str, Any], *, steps: int,
                    dtype: str = "float32") -> dict[str, Any]:
    if dtype not in ("float32", "float16"):
        raise ValueError("dtype must be float32 or float16")
    target = torch.float16 if dtype == "float16" else torch.float32
    sd = {f"module.{k}": (v.detach().cpu().to(target) if v.is_floating_point() else v.detach().cpu()).clone()
          for k, v in net.state_dict().items()}
    pre = cfg.preprocessing().to_json()
    meta = {"format": METADATA_FORMAT, "stage": cfg.stage, "stored_dtype": dtype, **metadata}
    return {
        "epoch": 0,
        "batch": int(steps),
        "net": cfg.net,
        "max_stride": pre["max_stride"],
        "state_dict": sd,
        "spacing": pre["spacing"],
        "crop_size": pre["crop_size"],
        "crop_normalizers": pre["crop_normalizers"],
        "box_percent_padding": 0.75,
        "sample_method": pre["sample_method"],
        "interpolation": pre["interpolation"],
        "input_channel": pre["input_channel"],
        "lesion_idx": pre["lesion_idx"],
        LOCUS_METADATA_KEY: meta,
    }


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomic write (temporary file, fsync, rename): a crash never leaves half a checkpoint."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(p)
    return p


def read_state(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (weights-only load), e.g. to add metadata and save again."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def update_metadata(path: str | Path, **fields: Any) -> None:
    """Merge ``fields`` into the checkpoint's ``locus`` metadata and rewrite it atomically."""
    state = read_state(path)
    meta = dict(state.get(LOCUS_METADATA_KEY) or {})
    meta.update(fields)
    state[LOCUS_METADATA_KEY] = meta
    save_checkpoint(state, path)
