"""One training run, step by step: data -> coarse -> fine -> calibrate -> evaluate.

A run has two directories:

* ``out``: an HCL-AL release directory (``coarse/params.pth``, ``fine/params.pth``,
  ``anatomy_vocabulary_library.json``, ``augmented_location_descriptions.json``) that
  ``models.localizer_checkpoint`` can point at, plus ``evaluation.json``;
* ``work``: ``run.json`` (the frozen run specification), the crop banks, resumable
  training states, and the HTML report.

Each step reads what the previous ones wrote, so ``locus train coarse|fine|calibrate|
evaluate`` can run separately (and resume) or all at once (``locus train all`` /
``demo-weights``).  Data here are phantom studies (:mod:`training.data.phantom`); the
steps only see :class:`~training.data.records.StudyRecord`, so other sources plug in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from library import load_library
from pipelines.models.checkpoints import load_checkpoint
from pipelines.models.localizer.model import Localizer
from pipelines.models.localizer.vocabulary import Vocabulary
from training.data.phantom import phantom_records
from training.data.records import StudyRecord
from training.localizer.calibrate import calibrate as fit_temperatures
from training.localizer.evaluate import evaluate as run_evaluation
from training.localizer.export import checkpoint_dict, save_checkpoint, update_metadata
from training.localizer.report import write_report
from training.localizer.samples import CropBank, build_bank
from training.localizer.train import StageConfig, rank_bank, train_stage
from training.localizer.vocab import training_vocabulary, write_vocabulary

log = logging.getLogger(__name__)

#: The demo phantom's own seed (``node/demo_study``); never used for training or calibration.
DEMO_STUDY_SEED = 7


@dataclass
class PhantomSplit:
    seeds: tuple[int, int]  # [first, last) range
    placement: str = "natural"
    n_lesions: int | None = None

    def records(self, size: str) -> list[StudyRecord]:
        return list(phantom_records(range(*self.seeds), size, placement=self.placement, n_lesions=self.n_lesions))


@dataclass
class DatasetSplit:
    """One part of a dataset directory in HCL-AL's layout (HCL-AL's own, or ``locus dataset export``).

    Studies go to train/val/test by a hash of their study id, so the split is stable when
    studies are added and never depends on file order.
    """

    root: str
    part: str  # "train" | "val" | "test"
    fractions: tuple[float, float] = (0.8, 0.1)  # train, val; the rest is test

    def _part_of(self, study_id: str) -> str:
        u = int(hashlib.sha256(study_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return "train" if u < self.fractions[0] else "val" if u < sum(self.fractions) else "test"

    def records(self, size: str) -> list[StudyRecord]:
        from training.data.hclal import iter_hclal_dataset

        return [r for r in iter_hclal_dataset(self.root) if self._part_of(r.study_id) == self.part]


def _split_from_json(x: dict[str, Any]) -> PhantomSplit | DatasetSplit:
    if "root" in x:
        return DatasetSplit(x["root"], x["part"], tuple(x["fractions"]))  # type: ignore[arg-type]
    return PhantomSplit(tuple(x["seeds"]), x["placement"], x["n_lesions"])  # type: ignore[arg-type]


@dataclass
class RunSpec:
    """What a run trains on and how; frozen in ``work/run.json`` at the first step."""

    seed: int
    size: str
    train: PhantomSplit | DatasetSplit
    val: PhantomSplit | DatasetSplit
    test: PhantomSplit | DatasetSplit
    coarse: StageConfig
    fine: StageConfig
    crops_per_lesion: int = 6
    store_dtype: str = "float32"
    extra_test_seeds: tuple[int, ...] = (DEMO_STUDY_SEED,)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["coarse"], d["fine"] = self.coarse.to_json(), self.fine.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunSpec:
        split = _split_from_json

        def stage(x: dict) -> StageConfig:
            x = dict(x)
            x["crop_size"], x["spacing"], x["milestones"] = tuple(x["crop_size"]), tuple(x["spacing"]), tuple(x["milestones"])
            return StageConfig(**x)

        return cls(d["seed"], d["size"], split(d["train"]), split(d["val"]), split(d["test"]), stage(d["coarse"]),
                   stage(d["fine"]), d["crops_per_lesion"], d["store_dtype"], tuple(d["extra_test_seeds"]))


def demo_spec(seed: int = 0) -> RunSpec:
    """Small CPU-trainable models for the shipped demo (phantom 'small' preset, like ``node/demo_study``).

    HCL-AL's coarse field of view (192x192x384 mm) and a wider fine one (128 mm cube instead
    of 96 mm: the phantom's lung and liver segments are cut by planes, so the fine stage needs
    the organ's extent) at a coarser resolution, BasicNet encoders, a 1-layer 64-wide text
    tower, embedding 128, and a 10x higher learning rate than HCL-AL's 1e-4 because the run
    is ~30x shorter.  Earlier attempts on the same held-out phantoms: fine 96 mm at 6 mm,
    120 training phantoms, 1500/1200 steps: final top-1 83.9 %; fine 128 mm at 8 mm,
    2000/3000 steps: 87.8 % (errors mostly at the liver dome / lung base and between
    segments), hence 200 training phantoms and 2500/5000 steps.
    """
    common = dict(net="ClipText_BasicNet", embed_dim=128, text_width=64, text_layers=1, batch_size=32, lr=1e-3,
                  milestones=(0.6, 0.85), save_every=100)
    return RunSpec(
        seed=seed, size="small",
        train=PhantomSplit((10000, 10200), "balanced", 10),
        val=PhantomSplit((20000, 20040), "natural", None),
        test=PhantomSplit((30000, 30040), "natural", None),
        coarse=StageConfig("coarse", (16, 16, 32), (12.0, 12.0, 12.0), skip_num=2, steps=2500, **common),  # type: ignore[arg-type]
        fine=StageConfig("fine", (16, 16, 16), (8.0, 8.0, 8.0), skip_num=5, steps=5000, **common),  # type: ignore[arg-type]
        crops_per_lesion=6, store_dtype="float16",
    )


def hclal_spec(seed: int = 0) -> RunSpec:
    """HCL-AL's published geometry and recipe (§1, §15): for a GPU and real data, not for this CPU."""
    return RunSpec(
        seed=seed, size="demo",
        train=PhantomSplit((10000, 11000), "balanced", 8),
        val=PhantomSplit((20000, 20100), "natural", None),
        test=PhantomSplit((30000, 30100), "natural", None),
        coarse=StageConfig("coarse", (96, 96, 128), (2.0, 2.0, 3.0), net="ClipText_ResidualNet", embed_dim=512,
                           text_width=512, text_layers=12, batch_size=48, steps=90000, skip_num=2, freeze_text=False),
        fine=StageConfig("fine", (64, 64, 64), (1.5, 1.5, 1.5), net="ClipText_ResidualNet", embed_dim=512,
                         text_width=512, text_layers=12, batch_size=64, steps=150000, skip_num=5, freeze_text=False),
        crops_per_lesion=8,
    )


PRESETS = {"demo": demo_spec, "hcl-al": hclal_spec}


def with_dataset(spec: RunSpec, root: str | Path) -> RunSpec:
    """``spec`` trained, calibrated and tested on a dataset directory instead of phantoms."""
    r = str(Path(root).resolve())
    spec.train, spec.val, spec.test = DatasetSplit(r, "train"), DatasetSplit(r, "val"), DatasetSplit(r, "test")
    spec.extra_test_seeds = ()
    return spec


@dataclass
class Run:
    out: Path
    work: Path
    spec: RunSpec
    device: str = "cpu"
    progress: bool = True
    _train_records: list[StudyRecord] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, out: str | Path, work: str | Path, spec: RunSpec | None = None, *, device: str = "cpu",
             progress: bool = True) -> Run:
        """Open a run; the first call freezes ``spec`` in ``work/run.json``, later calls must agree."""
        out, work = Path(out), Path(work)
        work.mkdir(parents=True, exist_ok=True)
        path = work / "run.json"
        if path.is_file():
            stored = RunSpec.from_json(json.loads(path.read_text()))
            if spec is not None and spec.to_json() != stored.to_json():
                raise ValueError(f"{path} holds a different run specification; use another --work directory")
            spec = stored
        elif spec is None:
            raise ValueError(f"{work} has no run.json: start with `locus train coarse` or `locus train all`")
        else:
            path.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
        return cls(out, work, spec, device, progress)

    # -- data -----------------------------------------------------------------------
    def train_records(self) -> list[StudyRecord]:
        if self._train_records is None:
            self._train_records = self.spec.train.records(self.spec.size)
        return self._train_records

    def vocabulary(self) -> Vocabulary:
        v, d = self.out / "anatomy_vocabulary_library.json", self.out / "augmented_location_descriptions.json"
        if not (v.is_file() and d.is_file()):
            finals = [f for r in self.train_records() for les in r.lesions for f in les.hclal_locations]
            write_vocabulary(training_vocabulary(finals), self.out)
        return Vocabulary.load(v, d)

    def bank(self) -> CropBank:
        path = self.work / "train_bank.pt"
        if path.is_file():
            return CropBank.load(str(path))
        stages = {"coarse": self.spec.coarse.preprocessing(), "fine": self.spec.fine.preprocessing()}
        bank = build_bank(self.train_records(), stages, crops_per_lesion=self.spec.crops_per_lesion,
                          seed=self.spec.seed, progress=self.progress)
        bank.save(str(path))
        return bank

    def data_summary(self, bank: CropBank) -> dict[str, Any]:
        s = self.spec
        source = (f"dataset in HCL-AL layout at {s.train.root}" if isinstance(s.train, DatasetSplit)
                  else f"Locus phantom (training/phantom), preset {s.size!r}: synthetic, not anatomy")
        return {
            "source": source,
            "train": {**asdict(s.train), "studies": len(self.train_records()), "lesions": len(bank),
                      "crops_per_lesion": s.crops_per_lesion,
                      "per_coarse": dict(Counter(c for it in bank.items for c in it.record.coarse_keys[:1]))},
            "validation": asdict(s.val), "test": asdict(s.test), "extra_test_seeds": list(s.extra_test_seeds),
        }

    # -- steps ----------------------------------------------------------------------
    def _metadata(self, vocab: Vocabulary, bank: CropBank, cfg: StageConfig, losses: list[float],
                  wall_s: float) -> dict[str, Any]:
        return {
            "library": load_library().stamp(),
            "vocabulary_sha256": vocab.vocabulary_sha256,
            "descriptions_sha256": vocab.descriptions_sha256,
            "training_data": self.data_summary(bank),
            "training": {"config": cfg.to_json(), "seed": self.spec.seed, "steps": len(losses),
                         "loss_first_50": float(sum(losses[:50]) / max(1, len(losses[:50]))),
                         "loss_last_50": float(sum(losses[-50:]) / max(1, len(losses[-50:]))),
                         "wall_s": round(wall_s, 1), "device": self.device, "torch": str(torch.__version__),
                         "platform": platform.platform()},
        }

    def train(self, stage: str, *, resume: bool = False) -> Path:
        vocab, bank = self.vocabulary(), self.bank()
        cfg = self.spec.coarse if stage == "coarse" else self.spec.fine
        labels = None
        if stage == "fine":
            coarse = self._network("coarse")
            labels = rank_bank(coarse, bank, "coarse", vocab, vocab.coarse_keys, topk=3, device=self.device)
        res = train_stage(cfg, bank, vocab, self.work, seed=self.spec.seed, device=self.device, resume=resume,
                          coarse_labels=labels, progress=self.progress)
        state = checkpoint_dict(res.net.cpu(), cfg, self._metadata(vocab, bank, cfg, res.losses, res.wall_s),
                                steps=res.steps, dtype=self.spec.store_dtype)
        return save_checkpoint(state, self.out / stage / "params.pth")

    def _network(self, stage: str):  # type: ignore[no-untyped-def]
        from pipelines.models.localizer.network import build_network

        return build_network(load_checkpoint(self.out / stage)).to(self.device)

    def localizer(self) -> Localizer:
        return Localizer.load(self.out / "coarse", self.out / "fine", self.out / "anatomy_vocabulary_library.json",
                              self.out / "augmented_location_descriptions.json", device=self.device)

    def calibrate(self) -> dict[str, Any]:
        loc = self.localizer()
        fits = fit_temperatures(loc, self.spec.val.records(self.spec.size))
        for stage in ("coarse", "fine"):
            update_metadata(self.out / stage / "params.pth", calibration={
                **fits[stage].to_json(), "method": "temperature scaling, NLL on the validation split",
                "split": asdict(self.spec.val)})
        return {k: v.to_json() for k, v in fits.items()}

    def evaluate(self) -> dict[str, Any]:
        loc = self.localizer()
        records = self.spec.test.records(self.spec.size)
        records += list(phantom_records(self.spec.extra_test_seeds, self.spec.size))
        ev = run_evaluation(loc, records, progress=self.progress)
        phantom = isinstance(self.spec.test, PhantomSplit)
        label = ("PHANTOM accuracy (synthetic studies; not clinical accuracy)" if phantom
                 else f"held-out studies of {self.spec.test.root}")  # type: ignore[union-attr]
        metrics = {**ev.metrics, "test": {**asdict(self.spec.test), "extra_seeds": list(self.spec.extra_test_seeds)},
                   "label": label}
        write_report(metrics, self.work / "report", title=f"Locus localizer evaluation: {label}",
                     notes="Phantom accuracy says nothing about patients." if phantom else "")
        headline = {k: metrics[k] for k in ("n", "final_top1", "final_top3", "coarse_top1", "coarse_top3", "unmatched")}
        for stage in ("coarse", "fine"):
            update_metadata(self.out / stage / "params.pth", metrics={**headline, "label": metrics["label"],
                                                                      "test": metrics["test"]})
        (self.out / "evaluation.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        return metrics


def default_work_dir(out: str | Path) -> Path:
    """A stable work directory per output directory, outside the source tree."""
    import tempfile

    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "locus-train" / key


def run_all(run: Run, *, resume: bool = False, steps: Sequence[str] = ("coarse", "fine", "calibrate", "evaluate")
            ) -> dict[str, Any]:
    timings: dict[str, float] = {}
    result: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        if step in ("coarse", "fine"):
            run.train(step, resume=resume)
        elif step == "calibrate":
            result["calibration"] = run.calibrate()
        elif step == "evaluate":
            result["metrics"] = run.evaluate()
        timings[step] = round(time.perf_counter() - t0, 1)
    result["timings_s"] = timings
    return result


def write_model_card(run: Run, result: dict[str, Any], command: str) -> Path:
    """``out/README.md``: what the model is, what it can name, how it was made, and its phantom accuracy."""
    vocab = run.vocabulary()
    m = result.get("metrics") or json.loads((run.out / "evaluation.json").read_text())
    cal = result.get("calibration") or {}
    s = run.spec
    names = []
    for region in vocab.regions:
        finals = [vocab.finals[(c, f)] for c in vocab.coarse_keys if vocab.region_of[c] == region
                  for f in vocab.children[c]]
        names.append(f"- **{region}** ({len(finals)}): {', '.join(finals)}")
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    rows = "\n".join(f"| {r} | {x['n']} | {pct(x['final_top1'])} | {pct(x['final_top3'])} | {pct(x['coarse_top1'])} |"
                     for r, x in m["per_region"].items())
    timings = result.get("timings_s", {})
    text = f"""# Demo localizer (phantom-trained; not for patients)

Small HCL-AL-compatible localizer weights in HCL-AL's release layout (`coarse/params.pth`,
`fine/params.pth`, `anatomy_vocabulary_library.json`, `augmented_location_descriptions.json`),
trained **only on Locus's synthetic phantom** (`training/phantom`). `locus demo` uses them. They name
phantom lesion sites; they know nothing about human anatomy and must not be used on patient data.

Reproduce (CPU, about {sum(timings.values()) / 60:.0f} min on this repository's 2-core machine):

    {command}

| | coarse | fine |
|---|---|---|
| network | `{s.coarse.net}`, crop {s.coarse.crop_size} at {s.coarse.spacing} mm | `{s.fine.net}`, crop {s.fine.crop_size} at {s.fine.spacing} mm |
| text tower | CLIP layout, width {s.coarse.text_width}, {s.coarse.text_layers} layer, trained from random init | same |
| training | {s.coarse.steps} steps x {s.coarse.batch_size} distinct coarse words, SkipTopN skip {s.coarse.skip_num} | {s.fine.steps} steps x {s.fine.batch_size} pairs (80 % related), skip {s.fine.skip_num} |
| temperature (fitted on {s.val.seeds[1] - s.val.seeds[0]} validation phantoms) | {cal.get('coarse', {}).get('temperature', float('nan')):.4f} | {cal.get('fine', {}).get('temperature', float('nan')):.4f} |
| stored as | float16 (Locus's loader casts to float32) | float16 |

Training data: phantom preset `{s.size}`, seeds {s.train.seeds[0]}-{s.train.seeds[1] - 1}, {s.train.n_lesions} lesions
each, sites drawn uniformly over the HCL-AL final strings the phantom can host; {s.crops_per_lesion} crops per lesion
(one plain, the rest with HCL-AL's jitter/rotation/scale augmentation, rotation about the crop centre).

## Phantom accuracy (held-out phantoms, not clinical accuracy)

{m['n']} lesions of phantom seeds {s.test.seeds[0]}-{s.test.seeds[1] - 1} (natural lesion placement) plus the demo study
(seed {', '.join(map(str, s.extra_test_seeds))}), HCL-AL's protocol (IoU > 0.5 box matching, prediction in the acceptable set):
**final-site top-1 {pct(m['final_top1'])}**, top-3 {pct(m['final_top3'])}; coarse top-1 {pct(m['coarse_top1'])},
top-3 {pct(m['coarse_top3'])}; reliability ECE {m['reliability']['ece']:.3f} ({m['confidence']}).

| region | n | final top-1 | final top-3 | coarse top-1 |
|---|---|---|---|---|
{rows}

"outside the model vocabulary": held-out lesions in phantom sites the training draw never hosts (scan-range
edges, structures mostly painted over by neighbours); they count as errors.

## What it can name ({len(vocab.finals)} final strings under {len(vocab.coarse_keys)} coarse keys)

{chr(10).join(names)}

Anything else is outside its vocabulary. HCL-AL strings map to coded library sites through
`library/data/hclal_crosswalk.yaml`; phantom sites finer than HCL-AL's names (lymph-node levels,
cerebral hemispheres, sternal parts) are scored against the nearest HCL-AL name
(`training/data/phantom.py`, `NEAREST_HCLAL`).
"""
    path = run.out / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
