"""HCL-AL's coarse-to-fine decision rules, as pure functions of probabilities.

Exact semantics of the reference ``predict_coarse`` / ``predict_fine``
(HCL-AL, Gao et al. 2025), kept identical in both geometry modes because they define what the
published weights' outputs mean:

Coarse
    rank all coarse keys by ``softmax(100·cos)`` (``torch.topk`` order), drop probabilities
    that are exactly 0.0 (fp32 underflow), keep the top ``k`` (default 3).
Fine candidates
    for each kept coarse key in rank order, each of its fine words in file order: add the
    word once, remembering its first (highest-ranked) coarse parent and that parent's
    probability.  Fine words shared by many coarse keys ("Rib", "Spinous process") are
    therefore resolved to a side or level by the coarse ranking alone.
Fine decision
    optional fusion ``0.5·p_coarse + 0.5·p_fine`` when the best fine probability is below a
    threshold (0 by default: never); sort with ``numpy.argsort(-p)``; map each fine word to
    the first coarse key in the probability-sorted assigned-parent list that is one of its
    parents (else its first parent in file order); drop exact zeros; the final location is
    ``vocabulary[coarse][fine]`` of the top entry, except that a lesion whose **smallest**
    box side exceeds 100 mm gets the top coarse key (bug B9: a coarse key, not a final
    string; Locus flags it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.models.localizer.vocabulary import Vocabulary

LOGIT_SCALE = 100.0  # hard-coded in the reference; the checkpoint's logit_scale is ignored (B12)
LARGE_LESION_MM = 100.0


@dataclass(frozen=True)
class CoarseResult:
    """Coarse labels with their probabilities, highest first."""
    labels: tuple[str, ...]
    probs: tuple[float, ...]


@dataclass(frozen=True)
class FineCandidates:
    """The fine words the coarse result allows, each with the coarse parent it came from."""
    words: tuple[str, ...]
    parents: tuple[str, ...]  # assigned (first, highest-ranked) coarse parent per word
    parent_probs: tuple[float, ...]


@dataclass(frozen=True)
class FineResult:
    """Fine labels with probabilities and the coarse key each maps back to."""
    labels: tuple[str, ...]  # fine words, sorted, zero probabilities dropped
    probs: tuple[float, ...]
    to_coarse: tuple[str, ...]  # coarse key each fine word was mapped to
    pred: str  # final location string, or the top coarse key under the large-lesion rule
    large_lesion: bool


def scaled_softmax(cos: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """``softmax(scale·cos)`` in fp32, as the reference computes it (underflow included)."""
    return (scale * cos.float()).softmax(dim=-1)


def rank_coarse(probs: torch.Tensor, keys: Sequence[str], topk: int | None = 3) -> CoarseResult:
    """Sorted, zero-dropped, truncated coarse ranking from a 1-D probability vector over ``keys``."""
    if probs.ndim != 1 or probs.shape[0] != len(keys):
        raise ValueError("coarse probabilities must be a vector aligned with the coarse keys")
    values, order = probs.detach().cpu().topk(len(keys))
    pairs = [(keys[int(i)], float(v)) for v, i in zip(values, order)]
    pairs = [(k, p) for k, p in pairs if p != 0]
    if topk:
        pairs = pairs[:topk]
    return CoarseResult(tuple(k for k, _ in pairs), tuple(p for _, p in pairs))


def fine_candidates(coarse: CoarseResult, vocab: Vocabulary) -> FineCandidates:
    """The fine words under the coarse labels kept, as HCL-AL's hierarchical inference ranks them."""
    words: list[str] = []
    parents: list[str] = []
    parent_probs: list[float] = []
    seen: set[str] = set()
    for key, prob in zip(coarse.labels, coarse.probs):
        for word in vocab.children[key]:
            if word not in seen:
                seen.add(word)
                words.append(word)
                parents.append(key)
                parent_probs.append(prob)
    return FineCandidates(tuple(words), tuple(parents), tuple(parent_probs))


def _map_to_coarse(word: str, sorted_parents: Sequence[str], vocab: Vocabulary) -> str:
    own = vocab.parents[word]
    for key in sorted_parents:
        if key in own:
            return key
    return own[0]


def decide_fine(
    candidates: FineCandidates,
    fine_probs: Sequence[float],
    coarse: CoarseResult,
    vocab: Vocabulary,
    box_size_mm: Sequence[float],
    *,
    fuse_coarse_threshold: float = 0.0,
    large_lesion_mm: float = LARGE_LESION_MM,
) -> FineResult:
    """Apply the reference fine post-processing to probabilities in candidate order."""
    probs = [float(p) for p in fine_probs]
    if len(probs) != len(candidates.words) or not probs:
        raise ValueError("fine probabilities must align with a non-empty candidate list")
    if max(probs) < fuse_coarse_threshold:
        probs = [0.5 * c + 0.5 * f for c, f in zip(candidates.parent_probs, probs)]
    order = [int(i) for i in np.argsort(-np.array(probs))]
    sorted_parents = [candidates.parents[i] for i in order]
    words = [candidates.words[i] for i in order]
    sorted_probs = [probs[i] for i in order]
    to_coarse = [_map_to_coarse(w, sorted_parents, vocab) for w in words]
    keep = [i for i, p in enumerate(sorted_probs) if p != 0]
    words = [words[i] for i in keep]
    sorted_probs = [sorted_probs[i] for i in keep]
    to_coarse = [to_coarse[i] for i in keep]
    large = min(float(s) for s in box_size_mm) > large_lesion_mm
    pred = coarse.labels[0] if large else vocab.final(to_coarse[0], words[0])
    return FineResult(tuple(words), tuple(sorted_probs), tuple(to_coarse), pred, large)
