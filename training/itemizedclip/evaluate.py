"""Phantom evaluation of a whole-body ItemizedCLIP model: per-item AUC, pointing game, CNR.

Everything is computed with the published inference rule (:func:`pipelines.models.itemizedclip.model.item_head`:
L2-normalised text and tokens, the block, cosine score, head-averaged attention with the null
slot last) on held-out phantom seeds.  **Phantom accuracy, not clinical accuracy.**

* **Per-item AUC** — one query per site group present in the held-out set (the canonical
  phrasing "fdg-avid lesion <group location>."), scored on every study; a study is positive
  when it has a lesion in that group; plus the normal item ("no fdg-avid lesion.") with the
  lesion-free studies positive.  AUC per query (groups with both classes), and their mean.
* **Pointing game** — for every report item of a study with lesions, the token with the
  highest attention for the item's own text is a hit when its block (8 × 12 × 12 input voxels
  of the demo grid) holds a voxel of one of the item's lesions.
* **CNR** (AFLoc, AFLoc, arXiv 2401.02044, its CNR): the item's map upsampled (nearest) to the input grid,
  min-max renormalised to [−1, 1]; A = voxels of the item's lesions, Ā = voxels outside every
  lesion of the study (other items' lesions are in neither); ``(mean A − mean Ā) /
  sqrt(var A + var Ā)`` with population variances, signed; 0 when both variances are 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from library import load_library
from pipelines.models.itemizedclip.model import ItemizedCLIP, item_head
from training.itemizedclip.data import ItemizedStudy

NORMAL_QUERY = "no fdg-avid lesion."


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half); NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def cnr(map_: np.ndarray, gt: np.ndarray) -> float:
    """AFLoc's signed CNR; ``gt``: 1 = target, 0 = background, anything else ignored."""
    m = map_.astype(np.float64)
    lo, hi = m.min(), m.max()
    m = 2.0 * (m - lo) / (hi - lo) - 1.0 if hi > lo else np.zeros_like(m)
    a, b = m[gt == 1], m[gt == 0]
    if not len(a) or not len(b):
        return float("nan")
    var = a.var() + b.var()
    return 0.0 if var == 0 else float((a.mean() - b.mean()) / np.sqrt(var))


@dataclass
class Evaluation:
    per_item_auc: dict[str, float]
    mean_auc: float
    pointing_game: float
    n_pointing: int
    mean_cnr: float
    n_studies: int
    n_normal: int

    def to_json(self) -> dict[str, Any]:
        return {"per_item_auc": self.per_item_auc, "mean_auc": self.mean_auc, "pointing_game": self.pointing_game,
                "n_pointing": self.n_pointing, "mean_cnr": self.mean_cnr, "n_studies": self.n_studies,
                "n_normal": self.n_normal, "label": "phantom accuracy, not clinical accuracy"}  # fmt: skip


@torch.inference_mode()
def evaluate(model: ItemizedCLIP, tokenizer: Any, studies: Sequence[ItemizedStudy],
             patch: tuple[int, int, int]) -> Evaluation:  # fmt: skip
    """The three phantom metrics for ``studies`` (each one visual forward)."""
    lib = load_library()
    groups = sorted({it.group_id for s in studies for it in s.report.items if it.group_id})
    queries = [NORMAL_QUERY] + [f"fdg-avid lesion {lib.site(g).description}." for g in groups]
    device = next(model.parameters()).device
    q_feats = model.encode_text(tokenizer(queries).to(device)).float()
    scores: list[np.ndarray] = []
    hits: list[bool] = []
    cnrs: list[float] = []
    for s in studies:
        _, tokens = model.encode_image(s.prepared.tensor.to(device))
        _, sc, _, _ = item_head(model, tokens, q_feats)
        scores.append(sc[0].cpu().numpy())
        items = [it for it in s.report.items if it.lesion_labels]
        if not items:
            continue
        feats = model.encode_text(tokenizer([it.text.lower() for it in items]).to(device)).float()
        _, _, attn, _ = item_head(model, tokens, feats)
        d, h, w = (n // p for n, p in zip(s.lesion_labels.shape, patch, strict=True))
        maps = attn[0, :, :-1].cpu().numpy().reshape(len(items), d, h, w)
        any_lesion = s.lesion_labels > 0
        for it, m in zip(items, maps, strict=True):
            own = np.isin(s.lesion_labels, it.lesion_labels)
            pd_, ph_, pw_ = patch
            k, j, i = np.unravel_index(int(np.argmax(m)), m.shape)
            hits.append(bool(own[k * pd_:(k + 1) * pd_, j * ph_:(j + 1) * ph_, i * pw_:(i + 1) * pw_].any()))
            up = np.repeat(np.repeat(np.repeat(m, pd_, 0), ph_, 1), pw_, 2)
            gt = np.where(own, 1, np.where(any_lesion, 2, 0))
            cnrs.append(cnr(up, gt))
    score_arr = np.stack(scores)  # [N, Q]
    per_item: dict[str, float] = {}
    normal = [int(s.normal) for s in studies]
    per_item["normal"] = auc(score_arr[:, 0], normal)
    for qi, g in enumerate(groups, start=1):
        labels = [int(any(it.group_id == g for it in s.report.items)) for s in studies]
        per_item[g] = auc(score_arr[:, qi], labels)
    valid = [v for v in per_item.values() if not np.isnan(v)]
    return Evaluation(per_item_auc=per_item, mean_auc=float(np.mean(valid)) if valid else float("nan"),
                      pointing_game=float(np.mean(hits)) if hits else float("nan"), n_pointing=len(hits),
                      mean_cnr=float(np.nanmean(cnrs)) if cnrs else float("nan"), n_studies=len(studies),
                      n_normal=sum(normal))  # fmt: skip
