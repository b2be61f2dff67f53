"""Seeded, resumable contrastive training of one localizer stage (HCL-AL, Gao et al. 2025).

The network is :class:`pipelines.models.localizer.network.HclalClipNet` itself (published
module names), so what is trained is exactly what inference loads.  Per step: a sampler
batch of crops from the bank, L2-normalised image and text embeddings, logits
``exp(logit_scale)·cos`` (the learned scale, clamped at 100 as in CLIP; the reference
leaves it unclamped), and the SkipTopN loss.  Adam (§15 defaults: lr 1e-4, betas
(0.9, 0.999), eps 1e-8, weight decay 5e-4) with MultiStepLR.

Text tower: randomly initialised and trained (small towers), or loaded from a local file
the user provides (``text_weights``; never downloaded) and optionally frozen, as HCL-AL
freezes OpenAI CLIP.

Fine-tuning: ``init`` (a loaded HCL-AL stage checkpoint) replaces the fresh network; it is
built and loaded strictly by the inference loader's own :func:`build_network`, so every
tensor is accounted for and the geometry must be the configuration's.

Resumable: every ``save_every`` steps (and at the end) the model, optimizer, scheduler,
sampler RNG, torch RNG and loss history go to ``<out>/<stage>_state.pt``; ``resume=True``
continues from there and gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.models.checkpoints import HclalCheckpoint, Normalizer, Preprocessing
from pipelines.models.localizer.encoder3d import init_weights
from pipelines.models.localizer.network import HclalClipNet, build_network
from pipelines.models.localizer.vocabulary import Vocabulary
from pipelines.models.text import ClipTokenizer, TextTowerConfig
from training.localizer.losses import skip_topn_loss
from training.localizer.samplers import Batch, CoarseSampler, FineSampler

log = logging.getLogger(__name__)

#: HCL-AL channel normalisation (§4): CT window -160..240 HU clipped, SUV (v-3)/3, mask as is.
NORMALIZERS = (Normalizer(40.0, 200.0, True), Normalizer(3.0, 3.0, False), Normalizer(0.0, 1.0, False))
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class StageConfig:
    """Everything that defines one stage's training run (stored in the checkpoint)."""

    stage: str  # "coarse" | "fine"
    crop_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    net: str = "ClipText_BasicNet"
    embed_dim: int = 128
    text_width: int = 64
    text_layers: int = 1
    context_length: int = 77
    batch_size: int = 32
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (100 / 351, 200 / 351)  # fractions of ``steps`` (§15: epochs 100, 200 of 351)
    gamma: float = 0.1
    skip_num: int = 2  # §1: coarse 2, fine 5
    smoothing: float = 0.1
    freeze_text: bool = False
    text_weights: str | None = None  # local file with a CLIP text tower state dict
    save_every: int = 200

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(spacing=tuple(self.spacing), crop_size=tuple(self.crop_size),  # type: ignore[arg-type]
                             normalizers=NORMALIZERS, interpolation=("linear", "linear", "nn"), input_channel=3,
                             lesion_idx=(2,), max_stride=16, sample_method="fixed_length")

    def to_json(self) -> dict:
        d = asdict(self)
        d["crop_size"], d["spacing"], d["milestones"] = list(self.crop_size), list(self.spacing), list(self.milestones)
        return d


def _text_state(path: str) -> dict[str, torch.Tensor]:
    """A CLIP text tower state dict from a local file (open_clip, HCL-AL or bare tower key names)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd:
        sd = sd["state_dict"]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "text_encoder."):
            k = k.removeprefix(prefix)
        if k.startswith("visual.") or k in ("logit_scale", "text_fc.weight", "text_fc.bias") or k.startswith("image_encoder."):
            continue
        out[k] = v.float()
    return out


def build_model(cfg: StageConfig) -> HclalClipNet:
    """A freshly initialised network (HCL-AL init for the image encoder)."""
    if cfg.text_weights:
        sd = _text_state(cfg.text_weights)
        text_cfg = TextTowerConfig.from_state_dict(sd)
        net = HclalClipNet(cfg.net, 3, cfg.crop_size, text_cfg, num_features=text_cfg.output_dim)
        missing = net.text_encoder.load_state_dict(sd, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise ValueError(f"text weights {cfg.text_weights} do not match a CLIP text tower: {missing}")
    else:
        if cfg.text_width % 64:
            raise ValueError("text_width must be a multiple of 64 (64-dimensional attention heads)")
        text_cfg = TextTowerConfig(cfg.text_width, cfg.text_layers, cfg.text_width // 64, cfg.context_length, 49408,
                                   cfg.embed_dim)
        net = HclalClipNet(cfg.net, 3, cfg.crop_size, text_cfg, num_features=cfg.embed_dim)
    init_weights(net.image_encoder)
    _freeze_text(net, cfg)
    return net


def _freeze_text(net: HclalClipNet, cfg: StageConfig) -> None:
    if cfg.freeze_text:
        for p in net.text_encoder.parameters():
            p.requires_grad_(False)


def model_from_checkpoint(cfg: StageConfig, init: HclalCheckpoint) -> HclalClipNet:
    """The network of ``init`` (strict load), to fine-tune under ``cfg``; its geometry must be ``cfg``'s."""
    if init.net != cfg.net or init.preprocessing != cfg.preprocessing():
        raise ValueError(f"init checkpoint {init.path} ({init.net}, {init.preprocessing.to_json()}) does not match "
                         f"the {cfg.stage} configuration ({cfg.net}, {cfg.preprocessing().to_json()})")
    net = build_network(init)
    _freeze_text(net, cfg)
    return net


class WordTokens:
    """Token ids of every candidate word's description, looked up per batch."""

    def __init__(self, vocab: Vocabulary, context_length: int) -> None:
        words = list(dict.fromkeys((*vocab.coarse_keys, *vocab.fine_words)))
        self.index = {w: i for i, w in enumerate(words)}
        self.tokens = ClipTokenizer(context_length).tokenize([vocab.text(w) for w in words])

    def __call__(self, words: Sequence[str]) -> torch.Tensor:
        return self.tokens[torch.tensor([self.index[w] for w in words])]


@dataclass
class TrainResult:
    net: HclalClipNet
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    wall_s: float = 0.0


def text_features(net: HclalClipNet, tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings as inference computes them: the tower, then ``text_fc`` when the net has one
    (``ClipText_Fc_BasicNet``; :func:`pipelines.models.text.encode_texts` applies it too)."""
    x = net.text_encoder(tokens)
    return net.text_fc(x) if net.text_fc is not None else x


def batch_loss(net: HclalClipNet, bank_x: torch.Tensor, tokens: torch.Tensor, batch: Batch, cfg: StageConfig
               ) -> torch.Tensor:
    img = F.normalize(net.image_encoder(bank_x), dim=-1)
    txt = F.normalize(text_features(net, tokens), dim=-1)
    scale = net.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    return skip_topn_loss(scale * img @ txt.T, batch.positives.to(img.device), skip_num=cfg.skip_num,
                          smoothing=cfg.smoothing)


def train_stage(cfg: StageConfig, bank, vocab: Vocabulary, out_dir: str | Path, *, seed: int = 0,
                device: str = "cpu", resume: bool = False, coarse_labels: Mapping[int, Sequence[str]] | None = None,
                progress: bool = True, stop_after: int | None = None, init: HclalCheckpoint | None = None
                ) -> TrainResult:
    """Train one stage on ``bank`` (a :class:`~.samples.CropBank`); returns the trained network (eval mode).

    ``init``: start from these weights (fine-tuning) instead of a fresh initialisation.

    ``stop_after`` ends this call (state saved) once that many steps are done in total, for
    time-boxed sessions; a later call with ``resume=True`` continues the same schedule.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / f"{cfg.stage}_state.pt"
    torch.manual_seed(seed)
    dev = torch.device(device)
    net = (build_model(cfg) if init is None else model_from_checkpoint(cfg, init)).to(dev)
    sampler = (CoarseSampler(bank, vocab, cfg.batch_size) if cfg.stage == "coarse"
               else FineSampler(bank, vocab, cfg.batch_size, coarse_labels=coarse_labels))
    rng = np.random.default_rng([seed, 0 if cfg.stage == "coarse" else 1])
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, int(m * cfg.steps)) for m in cfg.milestones], cfg.gamma)
    tokens = WordTokens(vocab, net.context_length)
    result = TrainResult(net)
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["config"] != cfg.to_json():
            raise ValueError(f"{state_path} was written with another configuration; start a new run")
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        rng.bit_generator.state = st["sampler_rng"]
        torch.set_rng_state(st["torch_rng"])
        result.steps, result.losses, result.wall_s = st["step"], list(st["losses"]), float(st["wall_s"])
        log.info("%s: resumed at step %d from %s", cfg.stage, result.steps, state_path)

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"config": cfg.to_json(), "model": net.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "sampler_rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "step": result.steps, "losses": result.losses,
                    "wall_s": result.wall_s}, tmp)
        tmp.replace(state_path)

    net.train()
    bar = tqdm(total=cfg.steps, initial=result.steps, desc=f"train {cfg.stage}", unit="step", disable=not progress)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    while result.steps < end:
        t0 = time.perf_counter()
        batch = sampler.sample(rng)
        x = bank.batch(cfg.stage, batch.lesions, batch.crops).to(dev)
        loss = batch_loss(net, x, tokens(batch.words).to(dev), batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        result.steps += 1
        result.losses.append(loss.item())
        result.wall_s += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(result.losses[-20:]):.3f}")
        if result.steps % cfg.save_every == 0 or result.steps == end:
            save()
    bar.close()
    net.eval()
    return result


@torch.inference_mode()
def rank_bank(net: HclalClipNet, bank, stage: str, vocab: Vocabulary, words: Sequence[str], *,
              topk: int = 3, device: str = "cpu", batch_size: int = 64) -> dict[int, list[str]]:
    """Top-``k`` candidate words per bank lesion (unaugmented crop): stage 1's ``coarse_labels``."""
    net.eval()
    tokens = WordTokens(vocab, net.context_length)
    txt = F.normalize(text_features(net, tokens(words).to(device)).float(), dim=-1)
    out: dict[int, list[str]] = {}
    n = len(bank)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        x = bank.batch(stage, idx, [0] * len(idx)).to(device)
        sims = F.normalize(net.image_encoder(x).float(), dim=-1) @ txt.T
        for i, row in zip(idx, sims.topk(min(topk, len(words)), dim=1).indices.tolist()):
            out[i] = [words[j] for j in row]
    return out
