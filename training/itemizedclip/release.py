"""Evaluate a trained whole-body ItemizedCLIP run on held-out phantoms and write its release directory.

Release layout (like ``node/demo_localizer``): ``checkpoint.pt`` in the published layout (optimizer state dropped),
``text/`` (the text tower's config and vocabulary), ``manifest.json`` (model name, sha256 of the checkpoint,
preprocessing, report templates, training spec and the held-out phantom metrics) and ``README.md``.
Everything is loaded back through :func:`pipelines.models.itemizedclip.model.load_model` (strict) before it is
written, and the metrics are labelled phantom accuracy.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.models.checkpoints import sha256_file
from pipelines.models.itemizedclip import model as im
from pipelines.models.itemizedclip import wholebody
from pipelines.models.study_encoder import model as hlip_model
from training.itemizedclip.data import phantom_studies
from training.itemizedclip.evaluate import Evaluation, evaluate


def evaluate_run(checkpoint: str | Path, text_dir: str | Path, model_name: str, seeds: Sequence[int], *,
                 size: str = "tiny", lesion_free_fraction: float = 0.2) -> Evaluation:  # fmt: skip
    """Load ``checkpoint`` strictly and score held-out phantom ``seeds``."""
    model, _ = im.load_model(checkpoint, text_dir, model_name=model_name)
    params = wholebody.PARAMS[model_name]
    studies = phantom_studies(seeds, params, size=size, lesion_free_fraction=lesion_free_fraction)
    tokenizer = hlip_model.tokenizer_for(text_dir, 77)
    trunk = wholebody.TRUNK_SPECS[_trunk_name(model_name)]
    return evaluate(model, tokenizer, studies, trunk.patch_size)


def _trunk_name(model_name: str) -> str:
    import open_clip

    return str(open_clip.get_model_config(model_name)["vision_cfg"]["timm_model_name"])


def write_release(run_dir: str | Path, out: str | Path, metrics: Evaluation, *, eval_seeds: Sequence[int],
                  command: str) -> Path:  # fmt: skip
    """Copy a run into the release layout with its manifest and README."""
    run_dir, out = Path(run_dir), Path(out)
    raw = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    locus: dict[str, Any] = dict(raw.get("locus", {}))
    model_name = str(locus.get("model_name", raw.get("name", "")))
    out.mkdir(parents=True, exist_ok=True)
    if (out / "text").exists():
        shutil.rmtree(out / "text")
    shutil.copytree(run_dir / "text", out / "text")
    ckpt = out / "checkpoint.pt"
    torch.save({"epoch": raw["epoch"], "name": raw["name"], "state_dict": raw["state_dict"], "optimizer": {},
                "locus": locus}, ckpt)  # fmt: skip
    _, loaded = im.load_model(ckpt, out / "text", model_name=model_name)
    train_info = json.loads((run_dir / "train.json").read_text()) if (run_dir / "train.json").is_file() else {}
    manifest = {
        "model_name": model_name, "checkpoint": "checkpoint.pt", "sha256": sha256_file(ckpt), "text_dir": "text",
        "preprocessing": locus.get("preprocessing"), "report_templates": locus.get("report_templates"),
        "training": {"spec": locus.get("spec"), "timings_s": train_info.get("timings_s"), "command": command},
        "evaluation": {**metrics.to_json(), "seeds": [min(eval_seeds), max(eval_seeds)]},
        "not_for_patients": True,
    }  # fmt: skip
    assert loaded.sha256 == manifest["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    m = metrics
    auc_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in sorted(m.per_item_auc.items()) if not math.isnan(v))
    (out / "README.md").write_text(f"""# Demo whole-body PET/CT ItemizedCLIP (phantom-trained; not for patients)

`{model_name}` (see `docs/models/itemizedclip-wholebody.md`), trained **only on Locus's synthetic phantom** with
itemized template reports. It knows nothing about human anatomy or clinical reports.

Reproduce: `{command}` (timings in `manifest.json`).

## Phantom accuracy (held-out phantom seeds {min(eval_seeds)}-{max(eval_seeds)}; not clinical accuracy)

{m.n_studies} studies ({m.n_normal} lesion-free): mean per-item AUC **{m.mean_auc:.3f}**, pointing game
**{m.pointing_game:.3f}** ({m.n_pointing} items), mean CNR **{m.mean_cnr:.3f}**.

| item (site group) | AUC |
|---|---|
{auc_rows}
""")
    return out
