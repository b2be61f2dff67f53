"""``locus train ...``: localizer training commands, attached to ``locus`` through the
``locus.commands`` entry-point group (the node never imports :mod:`training`).

Every command takes ``--out`` (the HCL-AL release directory written), ``--work`` (run
state; default: a per-``--out`` directory under the system temp dir), ``--seed``,
``--device`` and ``--resume``; ``--data``/``--split``/``--init``/``--steps`` shape a new
run (a site fine-tuning the shipped weights on its exported reviews:
``locus train all --preset finetune --data EXPORT --split all --init node/demo_localizer``).
A run that cannot proceed (empty split, incompatible init, ...) exits with its reason.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

REPO_DEMO_DIR = Path(__file__).resolve().parents[2] / "node" / "demo_localizer"


def _clear_failure(f: Callable[..., Any]) -> Callable[..., Any]:
    """A run that cannot proceed ends with its reason on stderr and exit status 1, not a traceback."""
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipelines.errors import LocusError

        try:
            return f(*args, **kwargs)
        except (ValueError, LocusError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _options(f):
    f = _clear_failure(f)
    f = click.option("--no-progress", is_flag=True, help="Hide progress bars.")(f)
    f = click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Training steps per stage, instead of the preset's (new runs only).")(f)
    f = click.option("--init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Fine-tune this HCL-AL release directory (e.g. node/demo_localizer): both stages start "
                          "from its checkpoints (strict load) and keep its geometry and vocabulary.")(f)
    f = click.option("--split", type=click.Choice(["hash", "all"]), default="hash", show_default=True,
                     help="With --data: 'hash' = 80/10/10 train/val/test by study id; 'all' = every study "
                          "trains, calibration recorded as not fitted, evaluation skipped (few studies).")(f)
    f = click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Dataset directory in HCL-AL's layout (HCL-AL data or `locus dataset export`) instead of "
                          "phantoms; see --split.")(f)
    f = click.option("--resume", is_flag=True, help="Continue from the last saved training state in --work.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1, ...")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling, augmentation and init.")(f)
    f = click.option("--preset", type=click.Choice(["demo", "hcl-al", "finetune"]), default="demo", show_default=True,
                     help="Run specification used when --work has none yet.")(f)
    f = click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Run state directory (crop banks, training states, report).")(f)
    f = click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Output HCL-AL release directory (coarse/, fine/, vocabulary JSONs).")(f)
    return f


def _open(out: Path, work: Path | None, preset: str, seed: int, device: str, progress: bool,
          data: Path | None = None, split: str = "hash", init: Path | None = None, steps: int | None = None):
    from training.localizer.pipeline import (
        PRESETS,
        Run,
        default_work_dir,
        with_dataset,
        with_init,
        with_steps,
    )

    logging.getLogger("training").setLevel(logging.INFO)
    if split != "hash" and data is None:
        raise click.UsageError("--split applies to --data")
    work = work or default_work_dir(out)
    spec = None
    if not (work / "run.json").is_file():
        spec = PRESETS[preset](seed)
        if data is not None:
            spec = with_dataset(spec, data, split=split)
        if init is not None:
            spec = with_init(spec, init)
        if steps is not None:
            spec = with_steps(spec, steps)
    click.echo(f"run state: {work}", err=True)
    return Run.open(out, work, spec, device=device, progress=progress)


@click.group()
def train() -> None:
    """Train, calibrate and evaluate the HCL-AL-compatible localizer (needs the `train` extra)."""


@train.command()
@_options
def coarse(out: Path, work: Path | None, preset: str, seed: int, device: str, resume: bool, no_progress: bool,
           data: Path | None, split: str, init: Path | None, steps: int | None) -> None:
    """Train the coarse stage and write OUT/coarse/params.pth."""
    run = _open(out, work, preset, seed, device, not no_progress, data, split, init, steps)
    click.echo(str(run.train("coarse", resume=resume)))


@train.command()
@_options
def fine(out: Path, work: Path | None, preset: str, seed: int, device: str, resume: bool, no_progress: bool,
           data: Path | None, split: str, init: Path | None, steps: int | None) -> None:
    """Train the fine stage (uses the coarse stage's rankings) and write OUT/fine/params.pth."""
    run = _open(out, work, preset, seed, device, not no_progress, data, split, init, steps)
    click.echo(str(run.train("fine", resume=resume)))


@train.command()
@_options
def calibrate(out: Path, work: Path | None, preset: str, seed: int, device: str, resume: bool,
              no_progress: bool, data: Path | None, split: str, init: Path | None, steps: int | None) -> None:
    """Fit one temperature per stage on the validation split; store it in both checkpoints."""
    run = _open(out, work, preset, seed, device, not no_progress, data, split, init, steps)
    click.echo(json.dumps(run.calibrate(), indent=2))


def _pct_ci(m: dict, key: str) -> str:
    ci = m.get("intervals", {}).get(key)
    return f"{100 * m[key]:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


@train.command()
@_options
@click.option("--spec", "spec_set", default=None, metavar="SET",
              help="Score the release in OUT on a fixed set of the evaluation spec (`test` or `validation`) "
                   "instead of the run's split: bootstrap 95 % intervals, per-region counts, lesions outside "
                   "the vocabulary counted; writes OUT/evaluation_SET.json and WORK/report_SET. Needs no run.")
@click.option("--spec-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Evaluation spec to read instead of training/localizer/eval_spec.json.")
def evaluate(out: Path, work: Path | None, preset: str, seed: int, device: str, resume: bool,
             no_progress: bool, data: Path | None, split: str, init: Path | None, steps: int | None,
             spec_set: str | None, spec_file: Path | None) -> None:
    """Evaluate OUT on the held-out split (HCL-AL protocol), or with --spec on a fixed set; HTML report in WORK."""
    if spec_set is not None:
        _evaluate_spec(out, work, spec_set, spec_file, device, not no_progress)
        return
    if spec_file is not None:
        raise click.UsageError("--spec-file applies to --spec")
    run = _open(out, work, preset, seed, device, not no_progress, data, split, init, steps)
    m = run.evaluate()
    click.echo(f"final top-1 {m['final_top1']:.3f}  top-3 {m['final_top3']:.3f}  coarse top-1 {m['coarse_top1']:.3f}"
               f"  top-3 {m['coarse_top3']:.3f}  (n={m['n']}, {m['label']})")
    click.echo(f"report: {run.work / 'report' / 'index.html'}")


def _evaluate_spec(out: Path, work: Path | None, name: str, spec_file: Path | None, device: str,
                   progress: bool) -> None:
    """``evaluate --spec SET``: score an existing release on a set fixed in the evaluation spec."""
    from training.localizer.heldout import SPEC_PATH, evaluate_release, load_eval_spec
    from training.localizer.pipeline import default_work_dir
    from training.localizer.report import write_report

    spec = load_eval_spec(spec_file or SPEC_PATH)
    if name not in spec.sets:
        raise click.UsageError(f"--spec {name!r}: the evaluation spec has the sets {', '.join(sorted(spec.sets))}")
    work = work or default_work_dir(out)
    click.echo(f"run state: {work}", err=True)
    m = evaluate_release(out, spec.sets[name], spec, work / f"outcomes_{name}.jsonl", device=device,
                         progress=progress)
    (out / f"evaluation_{name}.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    report = write_report(m, work / f"report_{name}", title=f"Locus localizer evaluation: {m['label']}",
                          notes=f"Phantom accuracy says nothing about patients. {m['naming']}")
    click.echo(f"{name} ({m['set']['role']}): {m['n']} lesions of {m['studies']} studies; "
               f"final top-1 {_pct_ci(m, 'final_top1')}, top-3 {_pct_ci(m, 'final_top3')}; "
               f"coarse top-1 {_pct_ci(m, 'coarse_top1')}, top-3 {_pct_ci(m, 'coarse_top3')}; "
               f"ECE {m['reliability']['ece']:.3f} [{m['intervals']['ece'][0]:.3f}, {m['intervals']['ece'][1]:.3f}]")
    click.echo(f"outside the model vocabulary: {m['outside_vocabulary']} lesions (counted wrong); "
               f"no voxel on the label grid: {m['no_voxels']}")
    for region, r in m["per_region"].items():
        click.echo(f"  {region}: n={r['n']} (outside vocabulary {r['outside_vocabulary']}), "
                   f"final top-1 {_pct_ci(r, 'final_top1')}")
    click.echo(f"written: {out / f'evaluation_{name}.json'}; report: {report}")


@train.command(name="all")
@_options
def all_steps(out: Path, work: Path | None, preset: str, seed: int, device: str, resume: bool,
              no_progress: bool, data: Path | None, split: str, init: Path | None, steps: int | None) -> None:
    """coarse, fine, calibrate and evaluate in one go; prints timings, calibration and the headline metrics."""
    from training.localizer.pipeline import run_all

    run = _open(out, work, preset, seed, device, not no_progress, data, split, init, steps)
    result = run_all(run, resume=resume)
    m = result.get("metrics")
    evaluation = ("skipped: no test split" if m is None else
                  {k: m[k] for k in ("n", "final_top1", "final_top3", "coarse_top1", "coarse_top3", "label")})
    click.echo(json.dumps({"timings_s": result["timings_s"], "calibration": result.get("calibration"),
                           "evaluation": evaluation}))


def _spec_evaluations(out: Path, work: Path, device: str) -> None:
    """Score a fresh release on the spec's validation and test sets (the figures the model card reports)."""
    from training.localizer.heldout import evaluate_release, load_eval_spec

    spec = load_eval_spec()
    for name in ("validation", "test"):
        m = evaluate_release(out, spec.sets[name], spec, work / f"outcomes_{name}.jsonl", device=device,
                             progress=True)
        (out / f"evaluation_{name}.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")


@train.command(name="demo-weights")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=REPO_DEMO_DIR, show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--resume", is_flag=True)
def demo_weights(out: Path, work: Path | None, seed: int, device: str, resume: bool) -> None:
    """Reproduce the shipped demo localizer (node/demo_localizer) from phantom data, scored on the spec's sets."""
    from training.localizer.pipeline import Run, default_work_dir, demo_spec, run_all, write_model_card

    work = work or default_work_dir(out)
    run = Run.open(out, work, None if (work / "run.json").is_file() else demo_spec(seed), device=device)
    result = run_all(run, resume=resume)
    _spec_evaluations(out, work, device)
    write_model_card(run, result, f"locus train demo-weights --seed {seed} --device {device}")
    m = result["metrics"]
    click.echo(json.dumps({"timings_s": result["timings_s"], "final_top1": m["final_top1"],
                           "final_top3": m["final_top3"], "coarse_top1": m["coarse_top1"],
                           "coarse_top3": m["coarse_top3"], "n": m["n"]}, indent=2))


def _attach_itemizedclip() -> None:
    """``locus train itemizedclip`` lives in :mod:`training.itemizedclip.cli` (imports torch only when run)."""
    from training.itemizedclip.cli import itemizedclip, itemizedclip_release

    train.add_command(itemizedclip)
    train.add_command(itemizedclip_release)


_attach_itemizedclip()
