"""One training run, step by step: data -> coarse -> fine -> calibrate -> evaluate.

A run has two directories:

* ``out``: an HCL-AL release directory (``coarse/params.pth``, ``fine/params.pth``,
  ``anatomy_vocabulary_library.json``, ``augmented_location_descriptions.json``) that
  ``models.localizer_checkpoint`` can point at, plus ``evaluation.json``;
* ``work``: ``run.json`` (the frozen run specification), the crop banks, resumable
  training states, and the HTML report.

Each step reads what the previous ones wrote, so ``locus train coarse|fine|calibrate|
evaluate`` can run separately (and resume) or all at once (``locus train all`` /
``demo-weights``).  Data are phantom studies (:mod:`training.data.phantom`) or a dataset
directory in HCL-AL's layout (:func:`with_dataset`, e.g. ``locus dataset export``); the steps
only see :class:`~training.data.records.StudyRecord`, so other sources plug in.

A site fine-tunes an existing release (:func:`with_init`, ``--init``): both stages start
from its checkpoints (loaded strictly), keep its geometry and vocabulary, and learn from the
site's reviewed lesions.  A few reviewed studies cannot also feed a validation and a test
split, so ``split="all"`` trains on every study and records calibration as *not fitted*
(the init's temperatures are never carried over: they were fitted for other weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from library import load_library
from pipelines.models.checkpoints import HclalCheckpoint, load_checkpoint, sha256_file
from pipelines.models.localizer.model import Localizer
from pipelines.models.localizer.vocabulary import Vocabulary
from pipelines.models.text import TextTowerConfig
from training.data.phantom import phantom_records
from training.data.records import StudyRecord
from training.localizer.calibrate import calibrate as fit_temperatures
from training.localizer.evaluate import evaluate as run_evaluation
from training.localizer.export import checkpoint_dict, save_checkpoint, update_metadata
from training.localizer.heldout import figures_markdown, spec_role
from training.localizer.report import write_report
from training.localizer.samples import CropBank, build_bank
from training.localizer.train import StageConfig, rank_bank, train_stage
from training.localizer.vocab import pairs_of, training_vocabulary, write_vocabulary

log = logging.getLogger(__name__)

#: The demo phantom's own seed (``node/demo_study``); never used for training or calibration.
DEMO_STUDY_SEED = 7
#: The two files of an HCL-AL release besides the stage checkpoints (HCL-AL, Gao et al. 2025).
VOCABULARY_FILES = ("anatomy_vocabulary_library.json", "augmented_location_descriptions.json")
#: How a dataset directory is divided: by study-id hash 80/10/10, or every study for training.
DATASET_SPLITS = ("hash", "all")


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
    studies are added and never depends on file order; part ``"all"`` takes every study.
    """

    root: str
    part: str  # "train" | "val" | "test" | "all"
    fractions: tuple[float, float] = (0.8, 0.1)  # train, val; the rest is test

    def _part_of(self, study_id: str) -> str:
        u = int(hashlib.sha256(study_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return "train" if u < self.fractions[0] else "val" if u < sum(self.fractions) else "test"

    def _selects(self, study_id: str) -> bool:
        return self.part == "all" or self._part_of(study_id) == self.part

    def records(self, size: str) -> list[StudyRecord]:
        from training.data.hclal import iter_hclal_dataset

        return [r for r in iter_hclal_dataset(self.root) if self._selects(r.study_id)]

    def empty_reason(self, role: str) -> str | None:
        """None when the split holds a study; else why not and what to do (read from the CSVs only)."""
        from training.data.hclal import hclal_study_ids

        ids = hclal_study_ids(self.root)
        if any(self._selects(i) for i in ids):
            return None
        parts = Counter(self._part_of(i) for i in ids)
        return (f"the {role} split ({self.part!r}) of {self.root} holds no study: the dataset has {len(ids)} "
                f"studies, split by study-id hash into train {parts['train']}, val {parts['val']}, "
                f"test {parts['test']}; with this few studies use --split all (every study trains, "
                "calibration is recorded as not fitted, evaluation is skipped), typically with --init")


def _split_from_json(x: dict[str, Any] | None) -> PhantomSplit | DatasetSplit | None:
    if x is None:
        return None
    if "root" in x:
        return DatasetSplit(x["root"], x["part"], tuple(x["fractions"]))
    return PhantomSplit(tuple(x["seeds"]), x["placement"], x["n_lesions"])


@dataclass
class RunSpec:
    """What a run trains on and how; frozen in ``work/run.json`` at the first step."""

    seed: int
    size: str
    train: PhantomSplit | DatasetSplit
    val: PhantomSplit | DatasetSplit | None  # None: no calibration (recorded as not fitted)
    test: PhantomSplit | DatasetSplit | None  # None: no evaluation
    coarse: StageConfig
    fine: StageConfig
    crops_per_lesion: int = 6
    store_dtype: str = "float32"
    extra_test_seeds: tuple[int, ...] = (DEMO_STUDY_SEED,)
    init: str | None = None  # HCL-AL release directory both stages start from (fine-tuning)

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

        return cls(d["seed"], d["size"], split(d["train"]), split(d["val"]), split(d["test"]),  # type: ignore[arg-type]
                   stage(d["coarse"]), stage(d["fine"]), d["crops_per_lesion"], d["store_dtype"],
                   tuple(d["extra_test_seeds"]), d.get("init"))


def demo_spec(seed: int = 0) -> RunSpec:
    """Small CPU-trainable models for the shipped demo (phantom 'small' preset, like ``node/demo_study``).

    HCL-AL's coarse field of view (192x192x384 mm) and a wider fine one (128 mm cube instead
    of 96 mm: the phantom's lung and liver segments are cut by planes, so the fine stage needs
    the organ's extent) at a coarser resolution, BasicNet encoders, a 1-layer 64-wide text
    tower, embedding 128, and a 10x higher learning rate than HCL-AL's 1e-4 because the run
    is ~30x shorter.  Earlier attempts on the same phantoms (seeds 30000-30039, which is why
    they are the *validation* set of ``eval_spec.json``, not a test set): fine 96 mm at 6 mm,
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
        test=PhantomSplit((30000, 30040), "natural", None),  # the spec's validation set; test: eval_spec.json
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


def finetune_spec(seed: int = 0) -> RunSpec:
    """A site's fine-tuning recipe, meant for ``--init`` and ``--data``: short, at HCL-AL's learning rate.

    With ``--init`` each stage's geometry, network and text tower come from the init
    checkpoints (:func:`with_init`); what this preset sets is the schedule: 300 steps per
    stage at lr 1e-4 (§15's rate, 10x below the demo's from-scratch rate, so the shipped
    weights are adjusted rather than overwritten), batches of at most 16 words, 4 crops per
    lesion.  ``--steps`` shortens it further.
    """
    spec = demo_spec(seed)
    sched = {"steps": 300, "lr": 1e-4, "batch_size": 16, "milestones": (0.8,), "save_every": 50}
    spec.coarse = dataclasses.replace(spec.coarse, **sched)  # type: ignore[arg-type]
    spec.fine = dataclasses.replace(spec.fine, **sched)  # type: ignore[arg-type]
    spec.crops_per_lesion = 4
    return spec


PRESETS = {"demo": demo_spec, "hcl-al": hclal_spec, "finetune": finetune_spec}


def with_dataset(spec: RunSpec, root: str | Path, *, split: str = "hash") -> RunSpec:
    """``spec`` trained (and calibrated and tested, with ``split="hash"``) on a dataset directory.

    ``split="all"``: every study trains and there is no validation or test split, so
    calibration is recorded as not fitted and evaluation is skipped.
    """
    if split not in DATASET_SPLITS:
        raise ValueError(f"unknown dataset split {split!r}; use one of {DATASET_SPLITS}")
    r = str(Path(root).resolve())
    if split == "all":
        spec.train, spec.val, spec.test = DatasetSplit(r, "all"), None, None
    else:
        spec.train, spec.val, spec.test = DatasetSplit(r, "train"), DatasetSplit(r, "val"), DatasetSplit(r, "test")
    spec.extra_test_seeds = ()
    return spec


def with_steps(spec: RunSpec, steps: int) -> RunSpec:
    """``spec`` with ``steps`` training steps per stage (milestones stay fractions of it)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    spec.coarse = dataclasses.replace(spec.coarse, steps=steps, save_every=min(spec.coarse.save_every, steps))
    spec.fine = dataclasses.replace(spec.fine, steps=steps, save_every=min(spec.fine.save_every, steps))
    return spec


def load_init_stage(init: str | Path, stage: str) -> HclalCheckpoint:
    """One stage checkpoint of the init release (read and validated like any HCL-AL checkpoint)."""
    return load_checkpoint(Path(init) / stage)


def with_init(spec: RunSpec, init: str | Path) -> RunSpec:
    """``spec`` fine-tuning the HCL-AL release directory ``init`` instead of training from scratch.

    Each stage's network name, crop geometry and tower sizes are taken from the init
    checkpoint (they are baked into its weights); its preprocessing must be what Locus's
    crop bank produces (HCL-AL's channel normalisation, §4), otherwise the weights would be
    trained on inputs they were never made for, and this raises ``ValueError``.
    """
    root = Path(init).resolve()
    missing = [n for n in ("coarse", "fine", *VOCABULARY_FILES) if not (root / n).exists()]
    if missing:
        raise ValueError(f"--init {root} is not an HCL-AL release directory: it lacks {', '.join(missing)}")
    for stage in ("coarse", "fine"):
        ckpt = load_init_stage(root, stage)
        sd = ckpt.state_dict
        text = TextTowerConfig.from_state_dict({k.removeprefix("text_encoder."): v for k, v in sd.items()
                                                if k.startswith("text_encoder.")})
        cfg = dataclasses.replace(
            getattr(spec, stage), net=ckpt.net, crop_size=ckpt.preprocessing.crop_size,
            spacing=ckpt.preprocessing.spacing, embed_dim=int(sd["image_encoder.fc.weight"].shape[0]),
            text_width=text.width, text_layers=text.layers, context_length=text.context_length, text_weights=None)
        if cfg.preprocessing() != ckpt.preprocessing:
            raise ValueError(f"--init {root / stage}: its preprocessing {ckpt.preprocessing.to_json()} is not what "
                             f"Locus training produces ({cfg.preprocessing().to_json()}); it cannot be fine-tuned here")
        setattr(spec, stage, cfg)
    spec.init = str(root)
    return spec


def dataset_identity(root: str | Path) -> dict[str, Any]:
    """What pins a dataset directory: the SHA-256 of its manifest and CSVs, and the library it names."""
    r = Path(root)
    files = {name: sha256_file(r / name) for name in ("manifest.json", "anno.csv", "bbox.csv") if (r / name).is_file()}
    out: dict[str, Any] = {"sha256": files}
    if (r / "manifest.json").is_file():
        manifest = json.loads((r / "manifest.json").read_text(encoding="utf-8"))
        out["manifest_format"] = manifest.get("format")
        out["library"] = manifest.get("library")
    return out


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
    def _records(self, split: PhantomSplit | DatasetSplit, role: str) -> list[StudyRecord]:
        records = split.records(self.spec.size)
        if not records:
            reason = split.empty_reason(role) if isinstance(split, DatasetSplit) else None
            raise ValueError(reason or f"the {role} split {asdict(split)} holds no study")
        return records

    def check_splits(self, steps: Sequence[str]) -> None:
        """Fail before any training when a split that ``steps`` need holds no study (tiny datasets)."""
        needed = {"training": self.spec.train} if {"coarse", "fine"} & set(steps) else {}
        if "calibrate" in steps and self.spec.val is not None:
            needed["validation"] = self.spec.val
        if "evaluate" in steps and self.spec.test is not None:
            needed["test"] = self.spec.test
        for role, split in needed.items():
            reason = split.empty_reason(role) if isinstance(split, DatasetSplit) else None
            if reason:
                raise ValueError(reason)

    def train_records(self) -> list[StudyRecord]:
        if self._train_records is None:
            self._train_records = self._records(self.spec.train, "training")
        return self._train_records

    def vocabulary(self) -> Vocabulary:
        v, d = (self.out / name for name in VOCABULARY_FILES)
        if self.spec.init is not None:
            self._adopt_init_vocabulary()
        elif not (v.is_file() and d.is_file()):
            finals = [f for r in self.train_records() for les in r.lesions for f in les.hclal_locations]
            write_vocabulary(training_vocabulary(finals), self.out)
        vocab = Vocabulary.load(v, d)
        if self.spec.init is not None:
            self._check_teachable(vocab)
        return vocab

    def _adopt_init_vocabulary(self) -> None:
        """Fine-tuning keeps the init release's vocabulary files, byte for byte (its text embeddings' words)."""
        init = Path(self.spec.init)  # type: ignore[arg-type]
        self.out.mkdir(parents=True, exist_ok=True)
        for name in VOCABULARY_FILES:
            src, dst = init / name, self.out / name
            if not dst.is_file():
                shutil.copyfile(src, dst)
            elif sha256_file(dst) != sha256_file(src):
                raise ValueError(f"{dst} differs from the init release's {src}; a fine-tuned model keeps its "
                                 "init's vocabulary: use an empty --out")
        vocab = Vocabulary.load(*(self.out / n for n in VOCABULARY_FILES))
        for stage in ("coarse", "fine"):
            meta = load_init_stage(init, stage).extra.get("locus") or {}
            pinned = meta.get("vocabulary_sha256") if isinstance(meta, dict) else None
            if pinned and pinned != vocab.vocabulary_sha256:
                raise ValueError(f"--init {init}: {stage}/params.pth was trained with vocabulary sha256 "
                                 f"{pinned[:16]}…, but the release's {VOCABULARY_FILES[0]} has "
                                 f"{vocab.vocabulary_sha256[:16]}…; the release directory is inconsistent")

    def _check_teachable(self, vocab: Vocabulary) -> None:
        """Every training lesion needs an acceptable string the init vocabulary can name.

        Fine-tuning cannot add a word to a model (the candidates are the vocabulary's texts),
        so a lesion confirmed at a site outside it would be silently unlearnable.
        """
        outside = [f"{r.study_id}/{les.lesion_id}: {', '.join(les.hclal_locations) or '(no ground truth)'}"
                   for r in self.train_records() for les in r.lesions if not pairs_of(vocab, les.hclal_locations)]
        if outside:
            raise ValueError(
                f"{len(outside)} training lesion(s) have no location in the vocabulary of --init "
                f"{self.spec.init} ({len(vocab.finals)} final strings): {'; '.join(outside[:10])}"
                f"{' ...' if len(outside) > 10 else ''}. Fine-tuning cannot add names to a model; train "
                "without --init to build a vocabulary from the data, or leave these lesions out of the export")

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
        records = self.train_records()
        summary: dict[str, Any] = {
            "source": (f"dataset in HCL-AL layout at {s.train.root}" if isinstance(s.train, DatasetSplit)
                       else f"Locus phantom (training/phantom), preset {s.size!r}: synthetic, not anatomy"),
            "train": {**asdict(s.train), "studies": len(records), "lesions": len(bank),
                      "crops_per_lesion": s.crops_per_lesion,
                      "per_coarse": dict(Counter(c for it in bank.items for c in it.record.coarse_keys[:1]))},
            "validation": asdict(s.val) if s.val is not None else None,
            "test": asdict(s.test) if s.test is not None else None, "extra_test_seeds": list(s.extra_test_seeds),
        }
        if isinstance(s.train, DatasetSplit):
            summary["dataset"] = dataset_identity(s.train.root)
            summary["train"]["study_sources"] = sorted(r.source for r in records)
        return summary

    # -- steps ----------------------------------------------------------------------
    def _metadata(self, vocab: Vocabulary, bank: CropBank, cfg: StageConfig, losses: list[float],
                  wall_s: float, init: HclalCheckpoint | None) -> dict[str, Any]:
        return {
            "library": load_library().stamp(),
            "init": None if init is None else {"release": self.spec.init, "checkpoint_sha256": init.sha256,
                                               "steps": init.batch},
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
        init = load_init_stage(self.spec.init, stage) if self.spec.init is not None else None
        res = train_stage(cfg, bank, vocab, self.work, seed=self.spec.seed, device=self.device, resume=resume,
                          coarse_labels=labels, progress=self.progress, init=init)
        state = checkpoint_dict(res.net.cpu(), cfg, self._metadata(vocab, bank, cfg, res.losses, res.wall_s, init),
                                steps=res.steps, dtype=self.spec.store_dtype)
        return save_checkpoint(state, self.out / stage / "params.pth")

    def _network(self, stage: str):
        from pipelines.models.localizer.network import build_network

        return build_network(load_checkpoint(self.out / stage)).to(self.device)

    def localizer(self) -> Localizer:
        return Localizer.load(self.out / "coarse", self.out / "fine", self.out / "anatomy_vocabulary_library.json",
                              self.out / "augmented_location_descriptions.json", device=self.device)

    def calibrate(self) -> dict[str, Any]:
        """Fit the temperatures on the validation split; without one, record them as not fitted."""
        if self.spec.val is None:
            note = {"fitted": False, "reason": "no validation split (dataset split 'all'): temperatures not fitted; "
                                               "scores are uncalibrated"}
            for stage in ("coarse", "fine"):
                update_metadata(self.out / stage / "params.pth", calibration=note)
            log.warning("calibration not fitted: the run has no validation split")
            return note
        loc = self.localizer()
        fits = fit_temperatures(loc, self._records(self.spec.val, "validation"))
        for stage in ("coarse", "fine"):
            update_metadata(self.out / stage / "params.pth", calibration={
                **fits[stage].to_json(), "fitted": True, "method": "temperature scaling, NLL on the validation split",
                "split": asdict(self.spec.val)})
        return {k: v.to_json() for k, v in fits.items()}

    def evaluate(self) -> dict[str, Any]:
        if self.spec.test is None:
            raise ValueError("this run has no test split (dataset split 'all'); evaluate on other studies with "
                             "a run that holds them out")
        loc = self.localizer()
        records = self._records(self.spec.test, "test")
        records += list(phantom_records(self.spec.extra_test_seeds, self.spec.size))
        ev = run_evaluation(loc, records, progress=self.progress)
        phantom = isinstance(self.spec.test, PhantomSplit)
        label = ("PHANTOM accuracy (synthetic studies; not clinical accuracy)" if phantom
                 else f"held-out studies of {self.spec.test.root}")  # type: ignore[union-attr]
        if phantom and spec_role(self.spec.test.seeds) == "validation":  # type: ignore[union-attr]
            label += ("; these seeds are the evaluation spec's VALIDATION set (they chose the demo recipe): "
                      "test figures come from `locus train evaluate --spec test`")
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
    run.check_splits(steps)
    timings: dict[str, float] = {}
    result: dict[str, Any] = {}
    for step in steps:
        t0 = time.perf_counter()
        if step in ("coarse", "fine"):
            run.train(step, resume=resume)
        elif step == "calibrate":
            result["calibration"] = run.calibrate()
        elif step == "evaluate":
            if run.spec.test is None:  # split "all": nothing held out, nothing to claim
                result["metrics"] = None
                log.warning("evaluation skipped: the run has no test split")
                continue
            result["metrics"] = run.evaluate()
        timings[step] = round(time.perf_counter() - t0, 1)
    result["timings_s"] = timings
    return result


def accuracy_markdown(out: Path, run_metrics: dict[str, Any]) -> str:
    """The model card's accuracy section: the spec's test (and validation) figures when scored, else the run's own.

    The run's own split is labelled by what it is; a phantom split that chose the recipe is
    called validation, never test (``training/localizer/eval_spec.json``).
    """
    test, val = (out / "evaluation_test.json"), (out / "evaluation_validation.json")
    if test.is_file():
        v = json.loads(val.read_text(encoding="utf-8")) if val.is_file() else None
        return figures_markdown(json.loads(test.read_text(encoding="utf-8")), v)
    m = run_metrics
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    rows = "\n".join(f"| {r} | {x['n']} | {x.get('outside_vocabulary', '')} | {pct(x['final_top1'])} | "
                     f"{pct(x['final_top3'])} | {pct(x['coarse_top1'])} |" for r, x in m["per_region"].items())
    return f"""{m['label']}. {m['n']} lesions of the run's held-out split {m['test']}, named from their ground-truth
boxes (naming given a perfect segmentation, not detection), HCL-AL's protocol: final-site top-1 {pct(m['final_top1'])},
top-3 {pct(m['final_top3'])}; coarse top-1 {pct(m['coarse_top1'])}, top-3 {pct(m['coarse_top3'])}; ECE
{m['reliability']['ece']:.3f} ({m['confidence']}). No test-set figures yet: run `locus train evaluate --out OUT --spec test`.

| region (true site) | n | outside vocabulary | final top-1 | final top-3 | coarse top-1 |
|---|---|---|---|---|---|
{rows}
"""


def write_model_card(run: Run, result: dict[str, Any], command: str) -> Path:
    """``out/README.md``: what the model is, what it can name, how it was made, and its phantom accuracy."""
    vocab = run.vocabulary()
    m = result.get("metrics") or json.loads((run.out / "evaluation.json").read_text())
    cal = result.get("calibration") or {}
    s = run.spec
    if not isinstance(s.train, PhantomSplit) or not isinstance(s.val, PhantomSplit):
        raise ValueError("the model card describes a phantom-trained run (train and val are phantom splits)")
    names = []
    for region in vocab.regions:
        finals = [vocab.finals[(c, f)] for c in vocab.coarse_keys if vocab.region_of[c] == region
                  for f in vocab.children[c]]
        names.append(f"- **{region}** ({len(finals)}): {', '.join(finals)}")
    timings = result.get("timings_s", {})
    accuracy = accuracy_markdown(run.out, m)
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

## Phantom accuracy (not clinical accuracy)

{accuracy}
## What it can name ({len(vocab.finals)} final strings under {len(vocab.coarse_keys)} coarse keys)

{chr(10).join(names)}

These are the HCL-AL names of the phantom sites the balanced training draw hosts (inside the preset's scan range
by at least 40 mm and at least 30 % visible; `training/data/phantom.py`, `eligible_sites`). Anything else is outside
its vocabulary, and the phantom's own placement still puts some lesions there (neck lymph-node levels, the thyroid,
the ischium, ...): they are counted in the accuracy section above, as errors. HCL-AL strings map to coded library sites through
`library/data/hclal_crosswalk.yaml`; phantom sites finer than HCL-AL's names (lymph-node levels,
cerebral hemispheres, sternal parts) are scored against the nearest HCL-AL name
(`training/data/phantom.py`, `NEAREST_HCLAL`).
"""
    path = run.out / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
