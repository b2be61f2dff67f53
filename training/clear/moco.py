"""MoCo v3 (Chen, Xie, He, ICCV 2021) with LeCL's lesion-enhanced views, for the CLEAR slice encoder.

Model (MoCo v3 §3 and Alg. 1; sizes as configured in CLEAR, docs/models/clear.md):

* base encoder = backbone + projector; ResNet projector ``in → mlp_dim → dim``: Linear without
  bias, BatchNorm + ReLU after the hidden layer, a BatchNorm **without affine** after the last;
* predictor on the base side only: ``dim → mlp_dim → dim`` with BN + ReLU, no final BN (ResNet);
* momentum encoder = a copy of the base encoder (backbone + projector) that receives no
  gradient and is updated **before** the keys of each step: ``θ_m ← m·θ_m + (1 − m)·θ_b``;
  ``m`` rises from ``m₀`` to 1 with a half-cosine over training when requested;
* loss: :func:`training.clear.lecl.symmetric_lecl_loss` (plain MoCo v3 when no sample of the
  batch bears a lesion or the weight is 0).

Views (LeCL sampling of the CLEAR paper, with the upstream code's defects fixed, docs/models/clear.md):

* lesion-bearing slice: view A = a **square** crop **centred on the lesion box's centre**
  (upstream centres on a box corner and draws a non-square crop), side uniform in
  ``[max(1.25 · box side, √0.08 · slice side), slice side]``, zero-padded outside the slice,
  resized; view B = the **whole slice** resized.  A gets the light augmentation (blur p 0.1),
  the whole slice the heavy one (blur p 1.0), as upstream;
* other slices: two RandomResizedCrop views (scale 0.08-1, ratio 3/4-4/3), as MoCo v3.

Augmentation is restricted to what keeps the channels' physical meaning (CT windows, SUV):
brightness/contrast jitter (p 0.8), Gaussian blur σ ∈ [0.1, 2], horizontal flip.  Colour
jitter of hue/saturation, greyscale and solarisation (MoCo v3's RGB recipe) are not applied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.clear.encoder import build_backbone, save_encoder_checkpoint
from pipelines.models.clear.slices import SlicePreprocessing, SliceStack
from training.clear.lecl import Variant, symmetric_lecl_loss


def mlp(in_dim: int, hidden: int, out_dim: int, *, last_bn: bool) -> nn.Sequential:
    """Two-layer MoCo v3 MLP: Linear(no bias) → BN → ReLU → Linear(no bias) [→ BN(affine=False)]."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                               nn.Linear(hidden, out_dim, bias=False)]  # fmt: skip
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class MocoConfig:
    arch: str = "resnet18"
    dim: int = 256
    mlp_dim: int = 4096
    temperature: float = 1.0  # CLEAR's --moco-t
    momentum: float = 0.99  # CLEAR's --moco-m
    momentum_cosine: bool = True
    lecl_weight: float = 1.0  # λ (CLEAR's CLI default)
    lecl_variant: Variant = "paper"


class MoCoV3(nn.Module):
    """Base encoder + predictor with a momentum copy; :meth:`forward` returns the step's loss."""

    def __init__(self, config: MocoConfig = MocoConfig(), backbone: nn.Module | None = None,
                 feature_dim: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.config = config
        if backbone is None:
            backbone, feature_dim = build_backbone(config.arch)
        assert feature_dim is not None
        self.base = nn.Sequential(backbone, mlp(feature_dim, config.mlp_dim, config.dim, last_bn=True))
        self.predictor = mlp(config.dim, config.mlp_dim, config.dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(self.base)
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        """The slice encoder that is exported after pretraining."""
        return self.base[0]

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        for pb, pm in zip(self.base.parameters(), self.momentum_encoder.parameters(), strict=True):
            pm.mul_(m).add_(pb.detach(), alpha=1.0 - m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, lesion: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.base(x1))
        q2 = self.predictor(self.base(x2))
        with torch.no_grad():
            self.update_momentum(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        c = self.config
        return symmetric_lecl_loss(q1, q2, k1, k2, lesion, temperature=c.temperature, weight=c.lecl_weight,
                                   variant=c.lecl_variant)  # fmt: skip


def export_encoder(model: MoCoV3, path: str | Path, preprocessing: SlicePreprocessing, **meta: object) -> str:
    """Write the pretrained backbone (base side, without projector/predictor) as a Locus encoder checkpoint.

    ``meta`` should name the LeCL setting (λ, variant, τ, epochs) so the model card can cite it.
    Returns the file's SHA-256, which the registry entry pins.
    """
    meta = {"lecl_weight": model.config.lecl_weight, "lecl_variant": model.config.lecl_variant,
            "temperature": model.config.temperature, **meta}  # fmt: skip
    return save_encoder_checkpoint(path, model.backbone, model.config.arch, preprocessing, **meta)


def momentum_at(step: int, total_steps: int, m0: float, cosine: bool = True) -> float:
    """MoCo v3's momentum schedule: ``1 − (1 − m₀)·(cos(π·t/T) + 1)/2`` (constant ``m₀`` without cosine)."""
    if not cosine or total_steps <= 0:
        return m0
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up then half-cosine to 0, per iteration (MoCo v3, as CLEAR configures it)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def train_step(model: MoCoV3, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
               lesion: torch.Tensor, *, step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:  # fmt: skip
    """One optimisation step (lr and momentum from their schedules); returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total_steps, base_lr, warmup_steps)
    m = momentum_at(step, total_steps, model.config.momentum, model.config.momentum_cosine)
    model.train()
    loss = model(x1, x2, lesion, m)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def make_optimizer(model: MoCoV3, base_lr: float, weight_decay: float = 1e-6) -> torch.optim.AdamW:
    """AdamW over the base encoder and predictor (the momentum encoder has no gradient)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=base_lr, weight_decay=weight_decay)


# ----------------------------------------------------------------------------- views


Box = tuple[float, float, float, float]  # (row0, col0, row1, col1) pixels of the rendered slice, inclusive-exclusive


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def crop_resize(image: torch.Tensor, centre_rc: tuple[float, float], size_hw: tuple[float, float], out: int) -> torch.Tensor:
    """Crop ``size_hw`` around ``centre_rc`` (zero outside the slice) and resize to ``out × out`` (bilinear).

    Implemented as one ``grid_sample`` (``align_corners=False``): output pixel centres are spread
    evenly over the crop rectangle, so the crop centre maps to the output centre exactly.
    """
    _c, h, w = image.shape
    r0 = centre_rc[0] - size_hw[0] / 2
    c0 = centre_rc[1] - size_hw[1] / 2
    rows = r0 + (torch.arange(out, dtype=torch.float32) + 0.5) * size_hw[0] / out  # pixel-edge coordinates
    cols = c0 + (torch.arange(out, dtype=torch.float32) + 0.5) * size_hw[1] / out
    gy = rows / h * 2 - 1
    gx = cols / w * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    return F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def lesion_view(image: torch.Tensor, box: Box, g: torch.Generator, out: int) -> torch.Tensor:
    """Square crop centred on the lesion box (see module docstring)."""
    _, h, w = image.shape
    side_img = float(min(h, w))
    box_side = max(box[2] - box[0], box[3] - box[1])
    lo = min(side_img, max(1.25 * box_side, math.sqrt(0.08) * side_img))
    side = _uniform(g, lo, side_img)
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return crop_resize(image, centre, (side, side), out)


def random_resized_crop(image: torch.Tensor, g: torch.Generator, out: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:  # fmt: skip
    _, h, w = image.shape
    for _ in range(10):
        area = h * w * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        ch, cw = math.sqrt(area / aspect), math.sqrt(area * aspect)
        if ch <= h and cw <= w:
            cr = _uniform(g, ch / 2, h - ch / 2)
            cc = _uniform(g, cw / 2, w - cw / 2)
            return crop_resize(image, (cr, cc), (ch, cw), out)
    return crop_resize(image, (h / 2, w / 2), (float(h), float(w)), out)


def augment(view: torch.Tensor, g: torch.Generator, *, blur_p: float) -> torch.Tensor:
    """Brightness/contrast jitter (0.4, p 0.8), Gaussian blur (σ 0.1-2, p ``blur_p``), horizontal flip (p 0.5)."""
    x = view
    if float(torch.rand((), generator=g)) < 0.8:
        b = _uniform(g, 0.6, 1.4)
        c = _uniform(g, 0.6, 1.4)
        mean = x.mean(dim=(1, 2), keepdim=True)
        x = ((x - mean) * c + mean) * b
    if float(torch.rand((), generator=g)) < blur_p:
        sigma = _uniform(g, 0.1, 2.0)
        radius = max(1, math.ceil(2 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k1 = torch.exp(-(t**2) / (2 * sigma**2))
        k1 = k1 / k1.sum()
        ch = x.shape[0]
        x = F.conv2d(F.pad(x[None], (radius, radius, 0, 0), mode="replicate"), k1.view(1, 1, 1, -1).repeat(ch, 1, 1, 1), groups=ch)
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k1.view(1, 1, -1, 1).repeat(ch, 1, 1, 1), groups=ch)[0]
    if float(torch.rand((), generator=g)) < 0.5:
        x = x.flip(-1)
    return x


@dataclass(frozen=True)
class LeclSample:
    """One rendered slice (``[3, H, W]`` in [0, 1], before normalisation) and its lesion box, if any."""

    image: torch.Tensor
    box: Box | None = None


def make_views(sample: LeclSample, g: torch.Generator, out: int, *, augment_views: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:  # fmt: skip
    """``(view A, view B, lesion flag)`` for one sample, per the module docstring."""
    if sample.box is not None:
        a = lesion_view(sample.image, sample.box, g, out)
        _, h, w = sample.image.shape
        b = crop_resize(sample.image, (h / 2, w / 2), (float(h), float(w)), out)
        if augment_views:
            a, b = augment(a, g, blur_p=0.1), augment(b, g, blur_p=1.0)
        return a, b, True
    a = random_resized_crop(sample.image, g, out)
    b = random_resized_crop(sample.image, g, out)
    if augment_views:
        a, b = augment(a, g, blur_p=1.0), augment(b, g, blur_p=0.1)
    return a, b, False


def make_batch(samples: Sequence[LeclSample], g: torch.Generator, out: int, *, mean: Sequence[float] = (0.5, 0.5, 0.5),
               std: Sequence[float] = (0.25, 0.25, 0.25), augment_views: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Stacked, normalised ``(x1, x2, lesion)``: the lesion-centred view goes to ``x1``, the whole slice to ``x2``."""
    views = [make_views(s, g, out, augment_views=augment_views) for s in samples]
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    x1 = torch.stack([(v[0] - m) / s for v in views])
    x2 = torch.stack([(v[1] - m) / s for v in views])
    return x1, x2, torch.tensor([v[2] for v in views], dtype=torch.bool)


# ----------------------------------------------------------------------------- data and loop


def samples_from_stack(stack: SliceStack, lesion_boxes_lps: Sequence[tuple[float, float, float, float, float, float]]
                       ) -> list[LeclSample]:  # fmt: skip
    """One :class:`LeclSample` per rendered slice; a slice crossed by a lesion gets that lesion's in-plane box.

    ``lesion_boxes_lps`` are axis-aligned boxes ``(x0, y0, z0, x1, y1, z1)`` in patient mm (e.g. from a
    SEG's lesion extents).  A slice lies in a box when its z is within ``[z0, z1]``; when several boxes
    cross a slice the largest in-plane one is used (one lesion view per slice, as LeCL draws one).
    Box pixels use the grid of :mod:`pipelines.models.clear.slices` (row ↔ y, column ↔ x, edges at ±½ px).
    """
    g = stack.grid
    out = []
    for s in range(stack.images.shape[0]):
        z = float(stack.z_mm[s])
        best: Box | None = None
        best_area = -1.0
        for x0, y0, z0, x1, y1, z1 in lesion_boxes_lps:
            if min(z0, z1) <= z <= max(z0, z1):
                r0, r1 = sorted(((y0 - g.y0) / g.pixel_mm + 0.5, (y1 - g.y0) / g.pixel_mm + 0.5))
                c0, c1 = sorted(((x0 - g.x0) / g.pixel_mm + 0.5, (x1 - g.x0) / g.pixel_mm + 0.5))
                area = (r1 - r0) * (c1 - c0)
                if area > best_area:
                    best, best_area = (r0, c0, r1, c1), area
        out.append(LeclSample(torch.from_numpy(stack.images[s]), best))
    return out


def pretrain(model: MoCoV3, samples: Sequence[LeclSample], *, epochs: int, batch_size: int, base_lr: float,
             out_size: int, warmup_epochs: int = 0, seed: int = 0, mean: Sequence[float] = (0.5, 0.5, 0.5),
             std: Sequence[float] = (0.25, 0.25, 0.25)) -> list[float]:  # fmt: skip
    """Seeded MoCo v3 / LeCL loop: shuffle each epoch, full batches only (``drop_last``), one loss per step."""
    steps_per_epoch = len(samples) // batch_size
    if steps_per_epoch < 1 or batch_size < 2:
        raise ValueError(f"{len(samples)} samples give no full batch of {batch_size} (BatchNorm needs ≥ 2)")
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, base_lr)
    losses: list[float] = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(samples), generator=g).tolist()
        for b in range(steps_per_epoch):
            batch = [samples[i] for i in order[b * batch_size : (b + 1) * batch_size]]
            x1, x2, lesion = make_batch(batch, g, out_size, mean=mean, std=std)
            losses.append(train_step(model, opt, x1, x2, lesion, step=step, total_steps=total, base_lr=base_lr,
                                     warmup_steps=warmup_epochs * steps_per_epoch))  # fmt: skip
            step += 1
    return losses
