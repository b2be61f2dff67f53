"""``locus train itemizedclip``: train a whole-body PET/CT ItemizedCLIP variant on phantoms (CPU-sized by default)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click


def _seeds(text: str) -> tuple[int, ...]:
    """``"0-63"`` or ``"1,2,5-9"`` → the seeds."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-", 1))
            if hi < lo:
                raise click.BadParameter(f"empty seed range {part!r}")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    if not out:
        raise click.BadParameter("no seeds")
    return tuple(out)


@click.command(name="itemizedclip")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory: checkpoint.pt (published layout), text/, train.json.")
@click.option("--model", "model_name", default="LOCUS_WholeBody_PETCT_demo_itemizedclip", show_default=True,
              help="Whole-body PET/CT variant (pipelines/models/itemizedclip/configs).")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--items", "items_per_study", type=click.IntRange(min=1), default=4, show_default=True,
              help="Items per study K (padding items carry mask 0).")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--warmup", "warmup_steps", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--recipe", type=click.Choice(["chest_ct", "mri_ct"]), default="chest_ct", show_default=True,
              help="Published loss factors (ItemizedCLIP, arXiv 2512.11141, training objectives).")
@click.option("--lock-text", is_flag=True, help="Freeze the BERT except its LayerNorms (published --lock-text).")
@click.option("--size", "phantom_size", type=click.Choice(["tiny", "small", "demo"]), default="tiny", show_default=True)
@click.option("--seeds", default="0-63", show_default=True, help="Phantom seeds for training, e.g. 0-63 or 1,4,7-9.")
@click.option("--lesion-free-fraction", type=click.FloatRange(0.0, 1.0), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling, masking and init.")
@click.option("--device", default="cpu", show_default=True)
def itemizedclip(out: Path, model_name: str, steps: int, batch_size: int, items_per_study: int, lr: float,
                 warmup_steps: int, recipe: str, lock_text: bool, phantom_size: str, seeds: str,
                 lesion_free_fraction: float, seed: int, device: str) -> None:  # fmt: skip
    """Train ItemizedCLIP (whole-body PET/CT) on phantoms with itemized reports; prints a JSON summary."""
    from pipelines.errors import LocusError
    from training.itemizedclip.train import TrainSpec, train

    logging.getLogger("training").setLevel(logging.INFO)
    spec = TrainSpec(model_name=model_name, steps=steps, batch_size=batch_size, items_per_study=items_per_study,
                     lr=lr, warmup_steps=min(warmup_steps, steps), recipe=recipe, lock_text=lock_text,
                     phantom_size=phantom_size, train_seeds=_seeds(seeds), lesion_free_fraction=lesion_free_fraction,
                     seed=seed)  # fmt: skip
    try:
        result = train(spec, out, device=device)
    except (ValueError, LocusError) as exc:
        raise click.ClickException(str(exc)) from exc
    h = result.history
    click.echo(json.dumps({"checkpoint": str(result.checkpoint), "sha256": result.sha256, "steps": len(h),
                           "loss_first": h[0]["total"], "loss_last": h[-1]["total"],
                           "seconds": round(result.seconds, 1)}))  # fmt: skip


@click.command(name="itemizedclip-release")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Directory written by `locus train itemizedclip`.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Release directory.")
@click.option("--seeds", default="1000-1031", show_default=True, help="Held-out phantom seeds for the evaluation.")
@click.option("--size", "phantom_size", type=click.Choice(["tiny", "small", "demo"]), default="tiny", show_default=True)
@click.option("--lesion-free-fraction", type=click.FloatRange(0.0, 1.0), default=0.2, show_default=True)
def itemizedclip_release(run_dir: Path, out: Path, seeds: str, phantom_size: str, lesion_free_fraction: float) -> None:
    """Evaluate a run on held-out phantoms (per-item AUC, pointing game, CNR) and write its release directory."""
    import torch

    from training.itemizedclip.release import evaluate_run, write_release

    raw = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model_name = str(raw.get("locus", {}).get("model_name", raw.get("name")))
    seed_list = _seeds(seeds)
    metrics = evaluate_run(run_dir / "checkpoint.pt", run_dir / "text", model_name, seed_list, size=phantom_size,
                           lesion_free_fraction=lesion_free_fraction)  # fmt: skip
    spec = raw.get("locus", {}).get("spec", {})
    train_seeds = spec.get("train_seeds") or [0]
    command = (f"locus train itemizedclip --out RUN --steps {spec.get('steps')} --batch-size {spec.get('batch_size')} "
               f"--seeds {min(train_seeds)}-{max(train_seeds)} --size {spec.get('phantom_size')} "
               f"--lesion-free-fraction {spec.get('lesion_free_fraction')} --recipe {spec.get('recipe')} "
               f"--lr {spec.get('lr')} --warmup {spec.get('warmup_steps')} --seed {spec.get('seed')} && "
               f"locus train itemizedclip-release --run RUN --out OUT --seeds {seeds}")  # fmt: skip
    write_release(run_dir, out, metrics, eval_seeds=seed_list, command=command)
    click.echo(json.dumps(metrics.to_json()))
