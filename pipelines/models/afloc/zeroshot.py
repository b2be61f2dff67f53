"""Zero-shot classification as the AFLoc paper describes it (afloc-compat.md §9).

**Not in the published code**: the repository has no prompts and no scoring; its only related
function is an unused global cosine (``eval/common.py:92-112``).  Locus implements the paper's
description: the L2-normalised global image embedding against the L2-normalised report
embeddings of a finding prompt and its negation; probability = softmax over
``logit_scale · [cos_neg, cos_pos]`` (10 = temp3, the scale the global–report loss trained,
§10.1).  Relative and uncalibrated: thresholds are a site's calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.prompts.afloc import AflocPromptSet


@dataclass(frozen=True)
class ZeroShotScore:
    finding_id: str
    cos_positive: float
    cos_negative: float
    probability: float  # softmax(scale·[neg, pos])[1]


def cosines(global_emb: torch.Tensor, reports: torch.Tensor) -> torch.Tensor:
    """``_get_similarity_from_embeddings``: ``[1,D]`` × ``[K,D]`` → ``[1,K]`` cosines."""
    g = F.normalize(global_emb.reshape(1, -1), dim=-1)
    r = F.normalize(reports, dim=-1)
    return g @ r.t()


def paired_scores(global_emb: torch.Tensor, positive_reports: torch.Tensor, negative_reports: torch.Tensor,
                  prompt_set: AflocPromptSet) -> list[ZeroShotScore]:  # fmt: skip
    """Scores in the prompt set's finding order from precomputed report embeddings ``[K,D]`` each."""
    cp = cosines(global_emb, positive_reports)[0]
    cn = cosines(global_emb, negative_reports)[0]
    probs = torch.softmax(prompt_set.logit_scale * torch.stack([cn, cp], dim=-1), dim=-1)[:, 1]
    return [ZeroShotScore(f.id, float(cp[i]), float(cn[i]), float(probs[i])) for i, f in enumerate(prompt_set.findings)]
