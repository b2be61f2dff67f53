"""Localizer evaluation with HCL-AL's protocol, plus the breakdowns HCL-AL does not report.

Protocol (HCL-AL, Gao et al. 2025; reference ``evaluate.py``): per study, predictions are matched
to ground-truth boxes by 3-D IoU > 0.5 (greedy, highest IoU first, one-to-one); a
ground-truth lesion is correct when the matched prediction's ``pred`` is in its set of
acceptable final strings (multi-label GT, HCL-AL's comma-separated ``GT`` column).  An
unmatched ground-truth lesion counts as wrong.  Beyond HCL-AL's top-1 final accuracy:
top-3 final (the three best distinct final strings), top-1/top-3 coarse, the same per
region, the most frequent confusions, and a reliability table (confidence = the
calibrated probability when the model has fitted temperatures, else the reference
``softmax(100·cos)`` score, which is labelled as such).

Every lesion is named from its *ground-truth* box and label (the corrected-mode query of
:func:`~training.localizer.calibrate.lesion_queries`), so the figures are naming accuracy
given a perfect segmentation, not detection.  A lesion whose acceptable final strings are
all outside the model's vocabulary cannot be named correctly; it is kept (counted as
wrong) and counted openly (``outside_vocabulary``), and the same figures are also given
over the nameable lesions alone.  A lesion with no voxel on the label grid cannot be
queried at all; it is counted (``no_voxels``), never silently dropped.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.models.localizer.lesion_mask import box_iou
from pipelines.models.localizer.model import Localizer
from pipelines.models.localizer.vocabulary import Vocabulary
from training.data.records import StudyRecord
from training.localizer.calibrate import lesion_queries

IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class GroundTruth:
    study_id: str
    lesion_id: str
    box: np.ndarray  # [cx, cy, cz, w, h, d] mm
    finals: tuple[str, ...]  # acceptable final strings
    coarse: tuple[str, ...]  # acceptable coarse keys
    region: str  # the HCL-AL region of the true site (crosswalk), whether or not the model can name it
    site: str = ""  # library site id of the true host (primary), "" when the source has none
    in_vocabulary: bool = True  # at least one acceptable final string is one the model can output


@dataclass(frozen=True)
class Prediction:
    study_id: str
    box: np.ndarray
    pred: str
    finals_top3: tuple[str, ...]
    coarse_ranking: tuple[str, ...]
    confidence: float


@dataclass(frozen=True)
class Outcome:
    truth: GroundTruth
    prediction: Prediction | None
    iou: float

    @property
    def final_top1(self) -> bool:
        return self.prediction is not None and self.prediction.pred in self.truth.finals

    @property
    def final_top3(self) -> bool:
        return self.prediction is not None and any(f in self.truth.finals for f in self.prediction.finals_top3[:3])

    @property
    def coarse_top1(self) -> bool:
        return self.prediction is not None and bool(self.prediction.coarse_ranking) and \
            self.prediction.coarse_ranking[0] in self.truth.coarse

    @property
    def coarse_top3(self) -> bool:
        return self.prediction is not None and any(c in self.truth.coarse for c in self.prediction.coarse_ranking[:3])


def match(truths: Sequence[GroundTruth], predictions: Sequence[Prediction],
          threshold: float = IOU_THRESHOLD) -> list[Outcome]:
    """One-to-one IoU matching per study (pairs above ``threshold``, best IoU first)."""
    outcomes: list[Outcome] = []
    for study in dict.fromkeys(t.study_id for t in truths):
        ts = [t for t in truths if t.study_id == study]
        ps = [p for p in predictions if p.study_id == study]
        pairs = sorted(((box_iou(t.box, p.box), i, j) for i, t in enumerate(ts) for j, p in enumerate(ps)),
                       key=lambda x: -x[0])
        used_t: dict[int, tuple[int, float]] = {}
        used_p: set[int] = set()
        for iou, i, j in pairs:
            if iou <= threshold:
                break
            if i not in used_t and j not in used_p:
                used_t[i] = (j, iou)
                used_p.add(j)
        for i, t in enumerate(ts):
            j, iou = used_t.get(i, (-1, 0.0))
            outcomes.append(Outcome(t, ps[j] if j >= 0 else None, iou))
    return outcomes


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def reliability(outcomes: Sequence[Outcome], bins: int = 10) -> dict[str, Any]:
    """Binned confidence vs final top-1 accuracy, and the expected calibration error."""
    conf = np.array([o.prediction.confidence for o in outcomes if o.prediction is not None])
    hit = np.array([o.final_top1 for o in outcomes if o.prediction is not None], dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        if sel.any():
            rows.append({"lo": float(lo), "hi": float(hi), "n": int(sel.sum()), "confidence": float(conf[sel].mean()),
                         "accuracy": float(hit[sel].mean())})
            ece += sel.sum() / max(1, conf.size) * abs(conf[sel].mean() - hit[sel].mean())
    return {"bins": rows, "ece": float(ece), "n": int(conf.size)}


def summarize(outcomes: Sequence[Outcome], *, confidence_kind: str = "reference softmax(100*cos)",
              top_confusions: int = 15) -> dict[str, Any]:
    def block(sel: Sequence[Outcome]) -> dict[str, Any]:
        return {"n": len(sel), "final_top1": _rate([o.final_top1 for o in sel]),
                "final_top3": _rate([o.final_top3 for o in sel]), "coarse_top1": _rate([o.coarse_top1 for o in sel]),
                "coarse_top3": _rate([o.coarse_top3 for o in sel]),
                "outside_vocabulary": sum(not o.truth.in_vocabulary for o in sel)}

    per_region = {r: block([o for o in outcomes if o.truth.region == r])
                  for r in sorted({o.truth.region for o in outcomes})}
    confusions = Counter((o.truth.finals[0] if o.truth.finals else "(none)",
                          o.prediction.pred if o.prediction else "(unmatched)")
                         for o in outcomes if not o.final_top1)
    outside = [o for o in outcomes if not o.truth.in_vocabulary]
    return {
        **block(outcomes),
        "unmatched": sum(o.prediction is None for o in outcomes),
        "per_region": per_region,
        "nameable": block([o for o in outcomes if o.truth.in_vocabulary]),
        "outside_vocabulary_sites": [
            {"truth": t, "count": n} for t, n in Counter(
                ", ".join(o.truth.finals) or f"(no HCL-AL name: {o.truth.site or 'unknown site'})"
                for o in outside).most_common()],
        "confusions": [{"truth": t, "predicted": p, "count": n} for (t, p), n in confusions.most_common(top_confusions)],
        "reliability": reliability(outcomes),
        "confidence": confidence_kind,
    }


#: Region of a lesion whose true site has no HCL-AL name at all (no crosswalk entry, no nearest name).
NO_HCLAL_REGION = "no HCL-AL name"


def truth_region(finals: Sequence[str], coarse: Sequence[str], region_of: Mapping[str, str]) -> str:
    """HCL-AL region of a lesion's true site: the crosswalk's region of its first final, else the model's.

    Taken from the library's HCL-AL crosswalk, not from the model vocabulary, so a lesion
    the model cannot name still counts in its own region (a neck node stays in "Neck").
    """
    from library import load_library

    cw = load_library().hclal
    regions = {e.final: e.region for e in cw.entries} if cw is not None else {}
    for f in finals:
        if f in regions:
            return regions[f]
    return next((region_of[c] for c in coarse if c in region_of), NO_HCLAL_REGION)


def truths_of(records: Sequence[StudyRecord], vocab: Vocabulary) -> tuple[list[GroundTruth], list[str]]:
    """Ground-truth boxes (exact voxel-edge box of each label) and answer sets of ``records``.

    Returns the truths and the ids of lesions without a voxel on the label grid (nothing to
    query; counted by the caller, never dropped silently).
    """
    from pipelines.models.localizer.lesion_mask import exact_box

    nameable = set(vocab.finals.values())
    out, no_voxels = [], []
    for rec in records:
        labels = rec.labels.to_sitk()
        for les in rec.lesions:
            box = exact_box(labels, les.label)
            if box is None:
                no_voxels.append(les.lesion_id)
                continue
            out.append(GroundTruth(rec.study_id, les.lesion_id, box.as_array(), les.hclal_locations, les.coarse_keys,
                                   truth_region(les.hclal_locations, les.coarse_keys, vocab.region_of),
                                   les.sites[0] if les.sites else "",
                                   any(f in nameable for f in les.hclal_locations)))
    return out, no_voxels


def predict(loc: Localizer, records: Sequence[StudyRecord], progress: bool = False) -> list[Prediction]:
    """Run the localizer (inference path) on every lesion of ``records``."""
    from tqdm import tqdm

    out = []
    for rec in tqdm(records, desc="evaluate", unit="study", disable=not progress):
        ct, suv, queries, _ = lesion_queries(rec)
        for q, res in zip(queries, loc.localize_images(ct, suv, queries)):
            conf = res.calibrated_probability
            if conf is None:
                conf = res.fine_ranking[0].score if res.fine_ranking and not res.large_lesion else \
                    res.coarse_ranking[0].score
            out.append(Prediction(rec.study_id, q.box.as_array(), res.final_label,
                                  tuple(a.label for a in res.alternatives),
                                  tuple(r.label for r in res.coarse_ranking), float(conf)))
    return out


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)


def confidence_kind(loc: Localizer) -> str:
    return "calibrated probability" if loc.temperatures is not None else "reference softmax(100*cos) score"


def evaluate(loc: Localizer, records: Sequence[StudyRecord], progress: bool = False) -> Evaluation:
    truths, no_voxels = truths_of(records, loc.vocab)
    outcomes = match(truths, predict(loc, records, progress))
    return Evaluation({**summarize(outcomes, confidence_kind=confidence_kind(loc)), "no_voxels": len(no_voxels)},
                      outcomes)


# -- per-lesion outcomes as JSON (an evaluation's raw material, resumable per study) ---------------
def outcome_to_json(o: Outcome) -> dict[str, Any]:
    t, p = o.truth, o.prediction
    return {
        "study_id": t.study_id, "lesion_id": t.lesion_id, "box": [float(v) for v in t.box], "finals": list(t.finals),
        "coarse": list(t.coarse), "region": t.region, "site": t.site, "in_vocabulary": t.in_vocabulary,
        "iou": float(o.iou),
        "prediction": None if p is None else {
            "box": [float(v) for v in p.box], "pred": p.pred, "finals_top3": list(p.finals_top3),
            "coarse_ranking": list(p.coarse_ranking), "confidence": float(p.confidence)},
    }


def outcome_from_json(d: Mapping[str, Any]) -> Outcome:
    t = GroundTruth(d["study_id"], d["lesion_id"], np.asarray(d["box"], dtype=float), tuple(d["finals"]),
                    tuple(d["coarse"]), d["region"], d["site"], bool(d["in_vocabulary"]))
    p = d["prediction"]
    pred = None if p is None else Prediction(d["study_id"], np.asarray(p["box"], dtype=float), p["pred"],
                                             tuple(p["finals_top3"]), tuple(p["coarse_ranking"]),
                                             float(p["confidence"]))
    return Outcome(t, pred, float(d["iou"]))
