"""HCL-AL's batch samplers (HCL-AL, Gao et al. 2025), over a :class:`~.samples.CropBank`.

Coarse: draw regions by weight (without replacement) until the drawn regions hold at least
``B`` coarse words that have training lesions, then ``B`` *distinct* coarse words, one
lesion (and one of its precomputed crops) each; the contrastive matrix then has no
duplicate texts.

Fine: 80 % "related" pairs – every (coarse, fine) pair under an anchor lesion's
ground-truth coarse keys and the coarse keys stage 1 ranked for it (its ``coarse_labels``),
anchors drawn until the quota is met – then region-weighted random pairs; pairs are
distinct, one lesion each.  Fine words repeat across coarse keys ("Rib", "Thoracic
spine"), so the batch's positives are *all* columns whose fine word is one of the row
lesion's ground-truth fine words (T2 fixed); rows and columns are the same samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.models.localizer.vocabulary import Vocabulary
from training.localizer.samples import CropBank
from training.localizer.vocab import pairs_of

#: HCL-AL sampler region weights (§10); regions not listed weigh 1.
REGION_WEIGHTS: dict[str, float] = {
    "Head": 1.0, "Neck": 2.0, "Chest": 3.0, "Abdomen": 2.0, "Pelvis": 1.0, "Axial skeleton": 1.0,
    "Upper limb": 0.5, "Lower limb": 0.5,
}  # fmt: skip


@dataclass(frozen=True)
class Batch:
    lesions: tuple[int, ...]  # bank indices
    crops: tuple[int, ...]  # crop index per lesion
    words: tuple[str, ...]  # candidate word per sample (coarse key or fine word); text = its description
    positives: torch.Tensor  # [B, B] bool: sample i's image matches sample j's word


def lesion_pairs(bank: CropBank, vocab: Vocabulary) -> list[list[tuple[str, str]]]:
    """Ground-truth (coarse, fine) pairs of every bank lesion within ``vocab``."""
    return [pairs_of(vocab, item.record.hclal_locations) for item in bank.items]


def _weighted_order(rng: np.random.Generator, names: Sequence[str]) -> list[str]:
    w = np.array([REGION_WEIGHTS.get(n, 1.0) for n in names], dtype=np.float64)
    return [names[int(i)] for i in rng.choice(len(names), size=len(names), replace=False, p=w / w.sum())]


class CoarseSampler:
    def __init__(self, bank: CropBank, vocab: Vocabulary, batch_size: int) -> None:
        self.bank, self.vocab, self.batch_size = bank, vocab, batch_size
        self.gt = [{c for c, _ in pairs} for pairs in lesion_pairs(bank, vocab)]
        self.lesions_of: dict[str, list[int]] = {}
        for i, keys in enumerate(self.gt):
            for k in keys:
                self.lesions_of.setdefault(k, []).append(i)
        self.region_words: dict[str, list[str]] = {}
        for k in vocab.coarse_keys:
            if k in self.lesions_of:
                self.region_words.setdefault(vocab.region_of[k], []).append(k)
        if not self.lesions_of:
            raise ValueError("no training lesion has a coarse key of the vocabulary")

    def sample(self, rng: np.random.Generator) -> Batch:
        pool: list[str] = []
        for region in _weighted_order(rng, list(self.region_words)):
            pool.extend(self.region_words[region])
            if len(pool) >= self.batch_size:
                break
        chosen = [pool[int(i)] for i in rng.choice(len(pool), size=min(self.batch_size, len(pool)), replace=False)]
        lesions = [self.lesions_of[w][int(rng.integers(len(self.lesions_of[w])))] for w in chosen]
        crops = [int(rng.integers(self.bank.inputs["coarse"].shape[1])) for _ in chosen]
        pos = torch.tensor([[w in self.gt[i] for w in chosen] for i in lesions])
        return Batch(tuple(lesions), tuple(crops), tuple(chosen), pos)


class FineSampler:
    def __init__(self, bank: CropBank, vocab: Vocabulary, batch_size: int, *,
                 coarse_labels: Mapping[int, Sequence[str]] | None = None, related_fraction: float = 0.8) -> None:
        self.bank, self.vocab, self.batch_size = bank, vocab, batch_size
        self.related_fraction = related_fraction
        self.gt_pairs = lesion_pairs(bank, vocab)
        self.gt_words = [{f for _, f in pairs} for pairs in self.gt_pairs]
        self.lesions_of: dict[tuple[str, str], list[int]] = {}
        for i, pairs in enumerate(self.gt_pairs):
            for p in pairs:
                self.lesions_of.setdefault(p, []).append(i)
        if not self.lesions_of:
            raise ValueError("no training lesion has a (coarse, fine) pair of the vocabulary")
        self.pairs_under: dict[str, list[tuple[str, str]]] = {}
        self.region_pairs: dict[str, list[tuple[str, str]]] = {}
        for pair in self.lesions_of:
            self.pairs_under.setdefault(pair[0], []).append(pair)
            self.region_pairs.setdefault(vocab.region_of[pair[0]], []).append(pair)
        labels = coarse_labels or {}
        self.related: list[list[tuple[str, str]]] = []
        for i, pairs in enumerate(self.gt_pairs):
            keys = dict.fromkeys([c for c, _ in pairs] + list(labels.get(i, ())))
            self.related.append([p for k in keys for p in self.pairs_under.get(k, [])])
        self.anchors = [i for i, r in enumerate(self.related) if r]

    def sample(self, rng: np.random.Generator) -> Batch:
        total = min(self.batch_size, len(self.lesions_of))
        quota = int(round(self.related_fraction * total))
        chosen: dict[tuple[str, str], None] = {}
        for _ in range(4 * total):  # anchors until the related quota is met
            if len(chosen) >= quota:
                break
            rel = self.related[self.anchors[int(rng.integers(len(self.anchors)))]]
            for j in rng.permutation(len(rel)):
                if len(chosen) >= quota:
                    break
                chosen.setdefault(rel[int(j)])
        regions = list(self.region_pairs)
        while len(chosen) < total:
            region = _weighted_order(rng, regions)[0]
            pairs = self.region_pairs[region]
            chosen.setdefault(pairs[int(rng.integers(len(pairs)))])
        picked = list(chosen)
        lesions = [self.lesions_of[p][int(rng.integers(len(self.lesions_of[p])))] for p in picked]
        crops = [int(rng.integers(self.bank.inputs["fine"].shape[1])) for _ in picked]
        words = tuple(f for _, f in picked)
        pos = torch.tensor([[w in self.gt_words[i] for w in words] for i in lesions])
        return Batch(tuple(lesions), tuple(crops), words, pos)
