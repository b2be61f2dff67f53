"""Zero-shot study-level findings with the HLIP v1 paired-negative protocol (hlip-compat §10).

Per finding a two-way classifier over (negative, positive) class names: each name is put
into every template, encoded by the text tower, L2-normalised, averaged over templates and
re-normalised (open_clip ``build_zero_shot_classifier``).  The score is

    softmax(exp(logit_scale) · image_embedding @ [t_negative, t_positive])[1]

i.e. the probability of the positive prompt.  It is a *model score*, not a calibrated
probability of disease: the presence decision uses a per-site threshold from configuration
(never a test-set threshold, never a built-in default), and is ``None`` without one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from library.prompts import PromptSet
from pipelines.errors import ModelError
from pipelines.findings import ZeroShotFinding


@dataclass(frozen=True)
class ZeroShotClassifier:
    """Precomputed text weights of a prompt set, scoring image embeddings without the text tower."""
    prompt_set: PromptSet
    weights: torch.Tensor  # [F, 2, D] float32, rows (negative, positive), unit norm
    logit_scale: float  # already exponentiated

    def scores(self, image_embedding: torch.Tensor) -> np.ndarray:
        """Positive-prompt probabilities ``[F]`` (or ``[B, F]``) for unit-norm embeddings ``[D]``/``[B, D]``."""
        emb = image_embedding.float()
        logits = self.logit_scale * torch.einsum("...d,fcd->...fc", emb, self.weights.to(emb.device))
        return logits.softmax(dim=-1)[..., 1].cpu().numpy()


def _encode_texts(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], texts: list[str]) -> torch.Tensor:
    device = next(model.parameters()).device
    emb = model.encode_text(tokenizer(texts).to(device), normalize=True).float()  # type: ignore[operator]
    emb = emb.mean(dim=0)
    return emb / emb.norm()


@torch.inference_mode()
def build_classifier(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                     prompt_set: PromptSet) -> ZeroShotClassifier:  # fmt: skip
    """Text embeddings of every (negative, positive) pair; computed once per prompt set and model."""
    if prompt_set.protocol != "paired-negative-softmax":
        raise ModelError(f"prompt protocol {prompt_set.protocol!r} is not implemented", code="prompt_protocol")
    rows = []
    for f in prompt_set.findings:
        neg, pos = prompt_set.texts(f)
        rows.append(torch.stack([_encode_texts(model, tokenizer, neg), _encode_texts(model, tokenizer, pos)]))
    logit_scale = cast(torch.Tensor, model.logit_scale)  # open_clip CLIP's learned temperature parameter
    scale = float(logit_scale.exp().item())
    return ZeroShotClassifier(prompt_set, torch.stack(rows).cpu(), scale)


def check_thresholds(prompt_set: PromptSet, thresholds: Mapping[str, float]) -> None:
    """Refuse thresholds for findings the prompt set does not have, or outside [0, 1]."""
    known = {f.id for f in prompt_set.findings}
    unknown = sorted(set(thresholds) - known)
    if unknown:
        raise ModelError(f"thresholds configured for unknown findings {unknown}; known: {sorted(known)}",
                         code="threshold_config")  # fmt: skip
    bad = {k: v for k, v in thresholds.items() if not 0.0 <= float(v) <= 1.0}
    if bad:
        raise ModelError(f"thresholds must lie in [0, 1]: {bad}", code="threshold_config")


def to_findings(scores: np.ndarray, prompt_set: PromptSet, thresholds: Mapping[str, float]) -> tuple[ZeroShotFinding, ...]:
    """One :class:`ZeroShotFinding` per prompt; ``present`` = score > threshold where one is configured."""
    out = []
    for f, s in zip(prompt_set.findings, scores.tolist(), strict=True):
        t = thresholds.get(f.id)
        out.append(ZeroShotFinding(finding=f.finding, score=float(s), threshold=None if t is None else float(t),
                                   present=None if t is None else bool(s > t)))  # fmt: skip
    return tuple(out)
