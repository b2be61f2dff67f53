"""Temperature scaling of both localizer stages on a validation split (HCL-AL bug B12).

HCL-AL scores with a hard-coded ``softmax(100·cos)``, which is not a probability.  Here one
temperature per stage is fitted by minimising the negative log-likelihood of the ground
truth on held-out lesions, on exactly the softmax the localizer's ``_calibrated`` hook
computes: coarse over all coarse candidates, fine over the lesion's own fine candidates
(the children of its top-k coarse keys).  With multi-label ground truth the likelihood is
the summed probability of the acceptable answers.  Lesions whose answer is not among the
fine candidates (a coarse miss) carry no information about the fine temperature and are
skipped there, and counted.

Ranking never changes (softmax is monotonic), so calibration cannot alter a decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy.optimize import minimize_scalar

from pipelines.models.localizer import hierarchy
from pipelines.models.localizer.lesion_mask import exact_box
from pipelines.models.localizer.model import LesionQuery, Localizer
from training.data.records import StudyRecord
from training.localizer.samples import study_images
from training.localizer.vocab import pairs_of


@dataclass(frozen=True)
class ScoredSet:
    """Cosine scores of one lesion over one stage's candidates, with the acceptable indices."""

    cos: np.ndarray
    positives: tuple[int, ...]


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    nll_before: float  # at the reference scale 100 (T = 0.01)
    nll_after: float
    n: int
    skipped: int

    def to_json(self) -> dict:
        return asdict(self)


def nll(sets: Sequence[ScoredSet], temperature: float) -> float:
    total = 0.0
    for s in sets:
        z = s.cos / temperature
        z = z - z.max()
        logp = z - math.log(float(np.exp(z).sum()))
        total -= float(np.logaddexp.reduce(logp[list(s.positives)]))
    return total / max(1, len(sets))


def fit_temperature(sets: Sequence[ScoredSet], skipped: int = 0) -> TemperatureFit:
    """NLL-minimising temperature (bounded 1-D search over log T in [1e-4, 10])."""
    if not sets:
        raise ValueError("no validation lesion with its answer among the candidates: cannot fit a temperature")
    res = minimize_scalar(lambda lt: nll(sets, math.exp(lt)), bounds=(math.log(1e-4), math.log(10.0)),
                          method="bounded", options={"xatol": 1e-4})
    t = float(math.exp(res.x))
    return TemperatureFit(t, nll(sets, 0.01), nll(sets, t), len(sets), skipped)


def lesion_queries(record: StudyRecord) -> tuple[sitk.Image, sitk.Image, list[LesionQuery], list[int]]:
    """Inference queries (corrected mode: exact box + own label) for a record's lesions."""
    ct, suv, labels = study_images(record)
    queries, kept = [], []
    for i, les in enumerate(record.lesions):
        box = exact_box(labels, les.label)
        if box is not None:
            queries.append(LesionQuery(box, labels, label=float(les.label)))
            kept.append(i)
    return ct, suv, queries, kept


@torch.inference_mode()
def collect_scores(loc: Localizer, records: Sequence[StudyRecord]) -> tuple[list[ScoredSet], list[ScoredSet], int]:
    """Coarse and fine score sets of every validation lesion, through the inference path."""
    coarse_sets: list[ScoredSet] = []
    fine_sets: list[ScoredSet] = []
    skipped = 0
    for rec in records:
        ct, suv, queries, kept = lesion_queries(rec)
        if not queries:
            continue
        c_in = np.stack([loc.stage_input(loc.coarse, ct, suv, q)[0] for q in queries])
        f_in = np.stack([loc.stage_input(loc.fine, ct, suv, q)[0] for q in queries])
        c_cos = (loc.embed_images(loc.coarse, c_in) @ loc.coarse.text_emb.T).cpu()
        f_cos = (loc.embed_images(loc.fine, f_in) @ loc.fine.text_emb.T).cpu()
        probs = hierarchy.scaled_softmax(c_cos)
        for row, li in enumerate(kept):
            pairs = pairs_of(loc.vocab, rec.lesions[li].hclal_locations)
            if not pairs:
                continue
            gt_coarse = {c for c, _ in pairs}
            pos = tuple(loc.coarse.word_index[c] for c in gt_coarse)
            coarse_sets.append(ScoredSet(c_cos[row].numpy().astype(np.float64), pos))
            ranking = hierarchy.rank_coarse(probs[row], loc.coarse.words, loc.coarse_topk)
            cands = hierarchy.fine_candidates(ranking, loc.vocab)
            gt_words = {f for _, f in pairs}
            fpos = tuple(j for j, w in enumerate(cands.words) if w in gt_words)
            if not fpos:
                skipped += 1
                continue
            cos_i = f_cos[row, torch.tensor([loc.fine.word_index[w] for w in cands.words])]
            fine_sets.append(ScoredSet(cos_i.numpy().astype(np.float64), fpos))
    return coarse_sets, fine_sets, skipped


def calibrate(loc: Localizer, records: Sequence[StudyRecord]) -> dict[str, TemperatureFit]:
    coarse_sets, fine_sets, skipped = collect_scores(loc, records)
    return {"coarse": fit_temperature(coarse_sets), "fine": fit_temperature(fine_sets, skipped)}
