"""CPU-sized ItemizedCLIP training on phantom PET/CT studies with itemized reports.

The loop follows the published recipe (ItemizedCLIP, arXiv 2512.11141, training objectives) where it applies to one
device: per step ``B`` studies, each with ``K`` items (its report's items shuffled, truncated to
``K``, lower-cased, padded with "Placeholder" at mask 0; the phantom re-draws each item's
phrasing), normal flags from the reports, the §8 objectives (:mod:`.losses`), AdamW with
betas (0.9, 0.98), eps 1e-6, weight decay on ≥ 2-D weights only (not on names containing
``bn``, ``ln``, ``bias``, ``logit_scale``), linear warm-up then cosine decay, and
``logit_scale`` clamped to ≤ ln 100 after every step.  ``lock_text`` freezes the BERT except its
LayerNorms (the published ``--lock-text``; ``text.proj`` stays trainable) — off by default for
the demo, whose small BERT starts from random weights.

Output (``out/``): ``checkpoint.pt`` in the published layout (``{"epoch", "name",
"state_dict" with module. keys, "optimizer"}`` plus a ``"locus"`` dict of provenance), the
text tower directory ``text/`` and ``train.json`` (spec, loss history, timings).  The
checkpoint is re-loaded strictly through
:func:`pipelines.models.itemizedclip.model.load_model` before the run reports success.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.models.itemizedclip import model as im
from pipelines.models.itemizedclip import wholebody
from pipelines.models.study_encoder import model as hlip_model
from training.itemizedclip import losses
from training.itemizedclip.data import ItemizedStudy, phantom_studies
from training.itemizedclip.text import write_text_dir
from training.phantom.reports import load_templates, sample_items

log = logging.getLogger(__name__)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass(frozen=True)
class TrainSpec:
    """One training run; defaults: the demo variant on ``tiny`` phantoms (minutes on a CPU)."""

    model_name: str = wholebody.DEMO_MODEL
    steps: int = 300
    batch_size: int = 8
    items_per_study: int = 4  # K (published: 10 chest, 7 MRI/CT; phantom reports hold 1-5 items)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.5
    warmup_steps: int = 30
    recipe: str = "chest_ct"
    loss_overrides: dict[str, Any] = field(default_factory=dict)
    lock_text: bool = False
    phantom_size: str = "tiny"
    train_seeds: tuple[int, ...] = tuple(range(64))
    n_lesions: int | None = None
    lesion_free_fraction: float = 0.2
    grouping: str = "auto"
    seed: int = 0

    def loss_config(self) -> losses.LossConfig:
        if self.recipe not in losses.RECIPES:
            raise ValueError(f"unknown loss recipe {self.recipe!r}; choose one of {sorted(losses.RECIPES)}")
        return dataclasses.replace(losses.RECIPES[self.recipe], **self.loss_overrides)


@dataclass
class TrainResult:
    checkpoint: Path
    text_dir: Path
    history: list[dict[str, float]]
    seconds: float
    sha256: str


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Upstream's split: no decay for < 2-D tensors and names containing bn, ln, bias, logit_scale."""
    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in params if not exclude(n, p)], "weight_decay": weight_decay}]  # fmt: skip


def lock_text_tower(model: torch.nn.Module) -> None:
    """``--lock-text``: BERT frozen except its LayerNorms; ``text.proj`` trainable."""
    for name, p in model.text.transformer.named_parameters():  # type: ignore[union-attr]
        p.requires_grad_("LayerNorm" in name)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up then cosine decay to 0 (open_clip ``cosine_lr``)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    e = step - spec.warmup_steps
    es = max(1, spec.steps - spec.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * spec.lr


def make_batch(studies: list[ItemizedStudy], idx: np.ndarray, k: int, rng: np.random.Generator,
               ) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:  # fmt: skip
    """Images ``[B, 1, 2, D, H, W]``, ``B·K`` item texts, item mask ``[B, K]``, normal flags ``[B]``."""
    texts: list[str] = []
    masks = []
    for i in idx:
        t, m, _ = sample_items(studies[int(i)].report, k, rng)
        texts.extend(t)
        masks.append(m)
    images = torch.stack([studies[int(i)].image for i in idx])
    normal = torch.tensor([studies[int(i)].normal for i in idx], dtype=torch.long)
    return images, texts, torch.tensor(masks, dtype=torch.long), normal


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: Path, *, epoch: int,
                    name: str, locus: dict[str, Any]) -> Path:  # fmt: skip
    """The published layout (§4): DDP-style ``module.`` keys, plus Locus provenance (plain data only)."""
    sd = {f"module.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    obj: dict[str, Any] = {"epoch": epoch, "name": name, "state_dict": sd,
                           "optimizer": optimizer.state_dict() if optimizer is not None else {}, "locus": locus}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def train(spec: TrainSpec, out: str | Path, *, device: str = "cpu", studies: list[ItemizedStudy] | None = None,
          text_dir: str | Path | None = None, progress: Callable[[dict[str, float]], None] | None = None,
          ) -> TrainResult:  # fmt: skip
    """Run ``spec`` and write the checkpoint, text tower and history under ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = spec.loss_config()
    if spec.model_name not in wholebody.PARAMS:
        raise ValueError(f"{spec.model_name!r} is not a whole-body PET/CT variant; choose one of {sorted(wholebody.PARAMS)}")
    params = wholebody.PARAMS[spec.model_name]
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng([spec.seed, 0x17E])
    gen = torch.Generator().manual_seed(spec.seed)
    text_dir = Path(text_dir) if text_dir is not None else write_text_dir(out / "text")
    if studies is None:
        studies = phantom_studies(spec.train_seeds, params, size=spec.phantom_size, n_lesions=spec.n_lesions,
                                  lesion_free_fraction=spec.lesion_free_fraction, grouping=spec.grouping)  # fmt: skip
    if not studies:
        raise ValueError("no training studies")
    t_data = time.perf_counter() - t0

    model = im.build_model(spec.model_name, text_dir).to(device)
    import open_clip

    ctx = int(open_clip.get_model_config(spec.model_name)["text_cfg"].get("context_length", 77))
    tokenizer = hlip_model.tokenizer_for(text_dir, ctx)
    if spec.lock_text:
        lock_text_tower(model)
    opt = torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas, eps=spec.eps)
    model.train()
    history: list[dict[str, float]] = []
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        idx = rng.choice(len(studies), size=min(spec.batch_size, len(studies)), replace=False)
        images, texts, mask, normal = make_batch(studies, idx, spec.items_per_study, rng)
        g, tokens = model.encode_image(images.to(device))
        t = model.encode_text(tokenizer(texts).to(device))
        terms = losses.itemized_loss(model.visual_attn, g, t, tokens, mask.to(device), normal.to(device),
                                     model.logit_scale.exp(), model.logit_bias, cfg, generator=gen)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        row = {"step": float(step), "lr": lr_at(step, spec), **{n: float(getattr(terms, n).detach())
                                                               for n in ("total", "ila", "kta", "mps", "iis")}}
        history.append(row)
        if step % 25 == 0 or step == spec.steps - 1:
            log.info("step %d/%d loss %.4f (ila %.4f kta %.4f mps %.4f iis %.4f)", step, spec.steps, row["total"],
                     row["ila"], row["kta"], row["mps"], row["iis"])  # fmt: skip
        if progress is not None:
            progress(row)
    model.eval()
    t_train = time.perf_counter() - t0 - t_data
    templates = load_templates()
    locus = {"model_name": spec.model_name, "preprocessing": params.to_json(),
             "report_templates": {"name": templates.stamp, "sha256": templates.sha256},
             "spec": json.loads(json.dumps(dataclasses.asdict(spec))), "implementation": im.IMPLEMENTATION,
             "data": "synthetic phantoms only (phantom accuracy, not clinical accuracy)"}  # fmt: skip
    ckpt = save_checkpoint(model, opt, out / "checkpoint.pt", epoch=spec.steps, name=spec.model_name, locus=locus)
    _, loaded = im.load_model(ckpt, text_dir, model_name=spec.model_name)  # the published strict path
    seconds = time.perf_counter() - t0
    (out / "train.json").write_text(json.dumps({
        "spec": locus["spec"], "loss_config": dataclasses.asdict(cfg), "history": history,
        "timings_s": {"data": round(t_data, 2), "train": round(t_train, 2), "total": round(seconds, 2)},
        "n_studies": len(studies), "n_normal": sum(s.normal for s in studies), "sha256": loaded.sha256,
    }, indent=1))  # fmt: skip
    log.info("ItemizedCLIP %s: %d steps in %.1f s, loss %.4f -> %.4f, sha256 %s", spec.model_name, spec.steps, seconds,
             history[0]["total"] if history else float("nan"), history[-1]["total"] if history else float("nan"),
             loaded.sha256[:12])  # fmt: skip
    return TrainResult(ckpt, text_dir, history, seconds, loaded.sha256)
