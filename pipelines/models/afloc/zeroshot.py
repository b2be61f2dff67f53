"""Zero-shot classification as the AFLoc paper describes it (Yang et al., arXiv 2401.02044).

**Not in the published code** at the pinned commit (YH0517/AFLoc 940e3d7): the repository has no
prompts and no scoring; its only related function is an unused global cosine
(``eval/common.py:92-112``).  Locus implements the paper's description: the L2-normalised
global image embedding against the L2-normalised report embeddings of a finding prompt and
its negation; probability = softmax over ``logit_scale · [cos_neg, cos_pos]`` (10 = temp3, the
scale the global–report loss trained, ``afloc/models/losses.py``) — rule ``"cosine"``.

Rule ``"raw-dot"`` is offered for comparison with a *later* upstream commit (b1f6b8d, after
the pinned one) whose classification head takes the unnormalised dot products of the global
embedding with the positive and negative prompt embeddings and a softmax over the pair, with
no scale.  Both are relative and uncalibrated: thresholds are a site's calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.prompts.afloc import AflocPromptSet


@dataclass(frozen=True)
class ZeroShotScore:
    """One finding's score with both cosines kept, so an uncalibrated probability can be audited and re-thresholded."""

    finding_id: str
    cos_positive: float
    cos_negative: float
    probability: float  # softmax(scale·[neg, pos])[1]


def cosines(global_emb: torch.Tensor, reports: torch.Tensor) -> torch.Tensor:
    """``_get_similarity_from_embeddings``: ``[1,D]`` × ``[K,D]`` → ``[1,K]`` cosines."""
    g = F.normalize(global_emb.reshape(1, -1), dim=-1)
    r = F.normalize(reports, dim=-1)
    return g @ r.t()


RULES = ("cosine", "raw-dot")


def paired_scores(global_emb: torch.Tensor, positive_reports: torch.Tensor, negative_reports: torch.Tensor,
                  prompt_set: AflocPromptSet, *, rule: str = "cosine") -> list[ZeroShotScore]:  # fmt: skip
    """Scores in the prompt set's finding order from precomputed report embeddings ``[K,D]`` each."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    cp = cosines(global_emb, positive_reports)[0]
    cn = cosines(global_emb, negative_reports)[0]
    if rule == "cosine":
        logits = prompt_set.logit_scale * torch.stack([cn, cp], dim=-1)
    else:
        g = global_emb.reshape(1, -1)
        logits = torch.stack([(g @ negative_reports.t())[0], (g @ positive_reports.t())[0]], dim=-1)
    probs = torch.softmax(logits, dim=-1)[:, 1]
    return [ZeroShotScore(f.id, float(cp[i]), float(cn[i]), float(probs[i])) for i, f in enumerate(prompt_set.findings)]
