"""Scoring a localizer release on the fixed evaluation sets of ``eval_spec.json``, with bootstrap intervals.

Why a spec file: the demo recipe was tuned by its scores on phantom seeds 30000-30039, so
those seeds are a *validation* set; figures reported as test accuracy must come from seeds
that chose nothing.  ``eval_spec.json`` (versioned, in the repository) fixes both sets
before any model is scored on the test set; changing a set's seeds is a new version.

Why study-level bootstrap: lesions of one phantom share its anatomy and noise, so they are
not independent; the interval resamples whole studies with replacement (the cluster
bootstrap, Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13) and takes
the percentile interval.  The resampled quantities are sums per study, so every metric,
the expected calibration error included, is computed for all resamples at once.

Lesions are named from their ground-truth boxes (:mod:`training.localizer.evaluate`):
the figures are naming accuracy given a perfect segmentation, not detection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from training.localizer.evaluate import (
    Outcome,
    confidence_kind,
    match,
    outcome_from_json,
    outcome_to_json,
    predict,
    summarize,
    truths_of,
)

SPEC_PATH = Path(__file__).with_name("eval_spec.json")
SPEC_FORMAT = "locus-localizer-eval-spec"
METRICS = ("final_top1", "final_top3", "coarse_top1", "coarse_top3")
NAMING_NOTE = ("Lesions are named from their ground-truth boxes and labels: naming accuracy given a perfect "
               "segmentation, not detection.")


@dataclass(frozen=True)
class EvalSet:
    """One fixed set of phantom studies: seeds ``[first, last)`` plus ``extra_seeds``."""

    name: str
    role: str  # "test" | "validation"
    purpose: str
    size: str
    placement: str
    seeds: tuple[int, int]
    extra_seeds: tuple[int, ...] = ()
    min_lesions: int = 0

    def all_seeds(self) -> list[int]:
        return [*range(*self.seeds), *self.extra_seeds]


@dataclass(frozen=True)
class Bootstrap:
    resamples: int = 2000
    seed: int = 0
    level: float = 0.95


@dataclass(frozen=True)
class EvalSpec:
    version: int
    fixed: str
    bootstrap: Bootstrap
    sets: Mapping[str, EvalSet]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "fixed": self.fixed, "bootstrap": asdict(self.bootstrap),
                "sets": {k: asdict(v) for k, v in self.sets.items()}}


def load_eval_spec(path: str | Path = SPEC_PATH) -> EvalSpec:
    """Read and check the evaluation spec (a malformed spec raises ``ValueError`` naming the field)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    if d.get("format") != SPEC_FORMAT or not isinstance(d.get("version"), int):
        raise ValueError(f"{path}: not a {SPEC_FORMAT} file with an integer version")
    sets = {}
    for name, s in d["sets"].items():
        lo, hi = (int(v) for v in s["seeds"])
        if hi <= lo:
            raise ValueError(f"{path}: set {name!r} has an empty seed range [{lo}, {hi})")
        if s["role"] not in ("test", "validation"):
            raise ValueError(f"{path}: set {name!r} has role {s['role']!r}; use 'test' or 'validation'")
        sets[name] = EvalSet(name, s["role"], s["purpose"], s["size"], s["placement"], (lo, hi),
                             tuple(int(v) for v in s.get("extra_seeds", ())), int(s.get("min_lesions", 0)))
    b = d["bootstrap"]
    if b.get("unit") != "study":
        raise ValueError(f"{path}: the bootstrap resamples studies (unit 'study'), not {b.get('unit')!r}")
    return EvalSpec(d["version"], d["fixed"], Bootstrap(int(b["resamples"]), int(b["seed"]), float(b["level"])), sets)


# -- bootstrap --------------------------------------------------------------------------------------
def _study_sums(outcomes: Sequence[Outcome], bins: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Per study: lesion count and hits per metric; per study and confidence bin: count, sum conf, sum hit."""
    studies = list(dict.fromkeys(o.truth.study_id for o in outcomes))
    index = {s: i for i, s in enumerate(studies)}
    hits = np.zeros((len(studies), 1 + len(METRICS)))
    rel = np.zeros((len(studies), bins, 3))
    for o in outcomes:
        i = index[o.truth.study_id]
        hits[i, 0] += 1
        hits[i, 1:] += [getattr(o, m) for m in METRICS]
        if o.prediction is not None:
            c = o.prediction.confidence
            b = min(int(c * bins), bins - 1) if c < 1.0 else bins - 1
            rel[i, b] += (1.0, c, float(o.final_top1))
    return studies, hits[:, 0], hits[:, 1:], rel


def bootstrap_intervals(outcomes: Sequence[Outcome], *, resamples: int = 2000, seed: int = 0, level: float = 0.95,
                        bins: int = 10) -> dict[str, list[float]]:
    """Percentile intervals of the four accuracies and the ECE, resampling whole studies with replacement.

    Deterministic for a given ``seed``.  The ECE uses the same equal-width bins as
    :func:`~training.localizer.evaluate.reliability` (sum over bins of
    ``|sum confidence - sum hits| / n``, which equals ``n_b / n * |mean conf - accuracy|``).
    """
    if not outcomes:
        return {k: [float("nan"), float("nan")] for k in (*METRICS, "ece")}
    _, n, hits, rel = _study_sums(outcomes, bins)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(n), size=(resamples, len(n)))
    weights = np.zeros((resamples, len(n)))
    np.add.at(weights, (np.arange(resamples)[:, None], picks), 1.0)  # times each study is drawn
    tot = weights @ n
    out: dict[str, np.ndarray] = {m: (weights @ hits[:, j]) / tot for j, m in enumerate(METRICS)}
    rb = np.einsum("rs,sbk->rbk", weights, rel)  # per resample and bin: count, sum conf, sum hit
    scored = rb[:, :, 0].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["ece"] = np.abs(rb[:, :, 1] - rb[:, :, 2]).sum(axis=1) / scored
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    return {k: [float(x) for x in np.nanquantile(v, q)] for k, v in out.items()}


def with_intervals(outcomes: Sequence[Outcome], boot: Bootstrap, *, confidence: str) -> dict[str, Any]:
    """:func:`summarize` plus study-bootstrap intervals for the whole set, the nameable lesions and each region."""
    m = summarize(outcomes, confidence_kind=confidence)
    intervals = partial(bootstrap_intervals, resamples=boot.resamples, seed=boot.seed, level=boot.level)
    m["intervals"] = intervals(outcomes)
    m["nameable"]["intervals"] = intervals([o for o in outcomes if o.truth.in_vocabulary])
    for region, block in m["per_region"].items():
        block["intervals"] = {k: v for k, v in intervals(
            [o for o in outcomes if o.truth.region == region]).items() if k != "ece"}
    m["studies"] = len({o.truth.study_id for o in outcomes})
    m["bootstrap"] = {**asdict(boot), "unit": "study", "method": "percentile"}
    return m


# -- scoring a release --------------------------------------------------------------------------------
def _read_outcomes(path: Path, header: dict[str, Any]) -> Iterator[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return
    first = json.loads(lines[0])
    if first.get("header") != header:
        raise ValueError(f"{path} holds outcomes of another model or set ({first.get('header')}); "
                         "delete it or use another --work directory")
    for line in lines[1:]:
        if line.strip():
            yield json.loads(line)


def score_release(release: str | Path, eval_set: EvalSet, outcomes_path: str | Path, *, device: str = "cpu",
                  progress: bool = False) -> tuple[list[Outcome], list[str], str]:
    """Localize every lesion of ``eval_set`` with the release; one JSON line per study in ``outcomes_path``.

    Studies already in ``outcomes_path`` (same release weights, same set) are not scored
    again, so an interrupted run resumes.  Returns the outcomes, the ids of lesions without
    a voxel on the label grid, and the kind of confidence.
    """
    from tqdm import tqdm

    from pipelines.models.localizer.model import Localizer
    from training.data.phantom import HclalTruthTable, phantom_record, phantom_study_id

    root = Path(release)
    loc = Localizer.load(root / "coarse", root / "fine", root / "anatomy_vocabulary_library.json",
                         root / "augmented_location_descriptions.json", device=device)
    header = {"coarse_sha256": loc.coarse.sha256, "fine_sha256": loc.fine.sha256,
              "vocabulary_sha256": loc.vocab.vocabulary_sha256, "set": asdict(eval_set)}
    header = json.loads(json.dumps(header))  # tuples -> lists, as read back
    path = Path(outcomes_path)
    done = {d["study_id"]: d for d in _read_outcomes(path, header)} if path.is_file() else {}
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header}) + "\n", encoding="utf-8")
    table = HclalTruthTable()
    with path.open("a", encoding="utf-8") as fh:
        for seed in tqdm(eval_set.all_seeds(), desc=f"evaluate {eval_set.name}", unit="study", disable=not progress):
            if phantom_study_id(seed, eval_set.size, eval_set.placement) in done:
                continue
            rec = phantom_record(seed, eval_set.size, placement=eval_set.placement, table=table)
            truths, no_voxels = truths_of([rec], loc.vocab)
            outcomes = match(truths, predict(loc, [rec]))
            line = {"study_id": rec.study_id, "no_voxels": no_voxels,
                    "outcomes": [outcome_to_json(o) for o in outcomes]}
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            done[rec.study_id] = line
    outcomes = [outcome_from_json(o) for d in done.values() for o in d["outcomes"]]
    no_voxels = [i for d in done.values() for i in d["no_voxels"]]
    return outcomes, no_voxels, confidence_kind(loc)


def evaluate_release(release: str | Path, eval_set: EvalSet, spec: EvalSpec, outcomes_path: str | Path, *,
                     device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Score ``release`` on ``eval_set``; metrics with intervals, per-region counts and the vocabulary gaps."""
    outcomes, no_voxels, kind = score_release(release, eval_set, outcomes_path, device=device, progress=progress)
    scored = len(outcomes) + len(no_voxels)
    if scored < eval_set.min_lesions:
        raise ValueError(f"set {eval_set.name!r} holds {scored} lesions; the spec asks for at least "
                         f"{eval_set.min_lesions}")
    m = with_intervals(outcomes, spec.bootstrap, confidence=kind)
    role = ("TEST set: seeds fixed in the evaluation spec before any scoring; they chose nothing"
            if eval_set.role == "test" else
            "VALIDATION set: the recipe was chosen by these scores; not a test figure")
    return {**m, "no_voxels": len(no_voxels), "set": asdict(eval_set), "spec_version": spec.version,
            "label": f"PHANTOM accuracy (synthetic studies; not clinical accuracy); {role}",
            "naming": NAMING_NOTE}


# -- figures as Markdown (README and model card) ---------------------------------------------------------
def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f} %"


def _ci(block: Mapping[str, Any], key: str) -> str:
    lo, hi = block["intervals"][key]
    return f"{_pct(block[key])} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _seeds(s: Mapping[str, Any]) -> str:
    extra = f" and the demo study, seed {', '.join(map(str, s['extra_seeds']))}" if s["extra_seeds"] else ""
    return f"seeds {s['seeds'][0]}-{s['seeds'][1] - 1}{extra}"


def headline_markdown(m: Mapping[str, Any]) -> str:
    """One sentence: the four accuracies and the ECE, each with its interval."""
    lo, hi = m["intervals"]["ece"]
    return (f"final-site top-1 **{_ci(m, 'final_top1')}**, top-3 {_ci(m, 'final_top3')}; coarse top-1 "
            f"{_ci(m, 'coarse_top1')}, top-3 {_ci(m, 'coarse_top3')}; expected calibration error "
            f"{m['reliability']['ece']:.3f} [{lo:.3f}, {hi:.3f}] ({m['confidence']})")


def figures_markdown(test: Mapping[str, Any], validation: Mapping[str, Any] | None = None) -> str:
    """The test-set figures (intervals, per-region counts, vocabulary gaps) and the validation headline."""
    b = test["bootstrap"]
    rows = [f"| **all** | **{test['n']:,}** | {test['outside_vocabulary']} | **{_ci(test, 'final_top1')}** | "
            f"{_ci(test, 'final_top3')} | {_ci(test, 'coarse_top1')} | {_ci(test, 'coarse_top3')} |"]
    nm = test["nameable"]
    rows.append(f"| nameable lesions only | {nm['n']:,} | 0 | {_ci(nm, 'final_top1')} | {_ci(nm, 'final_top3')} | "
                f"{_ci(nm, 'coarse_top1')} | {_ci(nm, 'coarse_top3')} |")
    rows += [f"| {r} | {x['n']} | {x['outside_vocabulary']} | {_ci(x, 'final_top1')} | {_ci(x, 'final_top3')} | "
             f"{_ci(x, 'coarse_top1')} | {_ci(x, 'coarse_top3')} |" for r, x in test["per_region"].items()]
    outside = ", ".join(f"{c['truth']} {c['count']}" for c in test["outside_vocabulary_sites"]) or "none"
    text = f"""**Test set (chose nothing)**: {test['n']:,} lesions of {test['studies']} phantom studies ({_seeds(test['set'])},
the phantom's own lesion placement), fixed in `training/localizer/eval_spec.json` (version {test['spec_version']})
before any model was scored on them; no recipe, hyper-parameter, temperature or model was chosen by them.
Scores: {headline_markdown(test)}. Brackets: {100 * b['level']:.0f} % percentile intervals from {b['resamples']:,} bootstrap
resamples of whole studies (seed {b['seed']}). Lesions are named from their **ground-truth boxes and labels**: this
is naming accuracy given a perfect segmentation, not detection. {test['outside_vocabulary']} lesions lie in sites the
model's vocabulary cannot name ({outside}); they count as errors above and are left out of the
"nameable" row.{f" {test['no_voxels']} lesions had no voxel on the PET grid and could not be queried." if test['no_voxels'] else ""}

| region (true site) | lesions | outside vocabulary | final top-1 | final top-3 | coarse top-1 | coarse top-3 |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    if validation is not None:
        text += f"""
**Validation set** (chose the recipe: field of view, resolution, training phantoms and steps were picked by their
scores on these seeds, so they are not a test): {validation['n']} lesions of {validation['studies']} studies
({_seeds(validation['set'])}), {validation['outside_vocabulary']} outside the vocabulary: {headline_markdown(validation)}.
"""
    return text


def spec_role(seeds: Sequence[int], path: str | Path = SPEC_PATH) -> str | None:
    """Role ("test"/"validation") of the spec set whose seed range is ``seeds``, None when none is."""
    for s in load_eval_spec(path).sets.values():
        if tuple(seeds) == s.seeds:
            return s.role
    return None
