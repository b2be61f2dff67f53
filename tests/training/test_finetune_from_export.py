"""A site fine-tunes the shipped demo localizer on its own reviewed study, end to end.

The node analyses the bundled demo study with the shipped weights (``node/demo_localizer``), a
radiologist confirms one predicted site and corrects another (tests/node/review_export_helpers.py),
``locus dataset export`` writes HCL-AL's layout, and ``locus train all --preset finetune --data
EXPORT --split all --init node/demo_localizer --steps 3`` fine-tunes both stages from the shipped
checkpoints on every exported study (one study cannot feed a validation split, so calibration is
recorded as not fitted and evaluation is skipped).  The release written reloads strictly through
``Localizer.load`` and localizes every lesion of the exported study; its checkpoints name the
dataset (manifest hash, library stamp) and the init weights they started from.  Tiny datasets
and vocabulary mismatches fail before any training with a reason.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from library import load_library
from library.hclal_format import crosswalk_tree
from node.cli_demo import DEMO_LOCALIZER
from pipelines.datasets.hclal_layout import ANNO_COLUMNS, read_csv
from pipelines.models.checkpoints import load_checkpoint, sha256_file
from pipelines.models.localizer.model import Localizer
from pipelines.models.localizer.network import build_network
from pipelines.models.localizer.vocabulary import Vocabulary
from tests.node.review_export_helpers import CONFIRMED, LESION, analysed_and_reviewed_node, run_cli
from training.data.hclal import read_hclal_dataset
from training.localizer.cli import train
from training.localizer.pipeline import RunSpec

STEPS = 3
VOCAB_FILES = ("anatomy_vocabulary_library.json", "augmented_location_descriptions.json")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The node's reviewed demo study, exported (reviewed lesions only) as `locus dataset export` writes it."""
    torch.set_num_threads(1)
    settings, study_uid = analysed_and_reviewed_node(tmp_path_factory.mktemp("node"), DEMO_LOCALIZER)
    out = tmp_path_factory.mktemp("export") / "dataset"
    with pytest.MonkeyPatch.context() as mp:
        result = run_cli(settings, mp, "dataset", "export", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["studies"] == [study_uid] and summary["ground_truth_rows"] == 2
    return out


def _train(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(train, ["all", "--no-progress", *args])


def test_a_site_fine_tunes_the_demo_weights_on_its_exported_reviews(export_dir: Path, tmp_path: Path) -> None:
    out, work = tmp_path / "release", tmp_path / "work"
    result = _train("--out", str(out), "--work", str(work), "--preset", "finetune", "--data", str(export_dir),
                    "--split", "all", "--init", str(DEMO_LOCALIZER), "--steps", str(STEPS))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["calibration"]["fitted"] is False and summary["evaluation"] == "skipped: no test split"
    frozen = json.loads((work / "run.json").read_text())  # the run spec survives a reopen (resume, separate steps)
    assert json.loads(json.dumps(RunSpec.from_json(frozen).to_json())) == frozen
    assert (frozen["init"], frozen["train"]["part"], frozen["val"], frozen["test"]) == (
        str(DEMO_LOCALIZER.resolve()), "all", None, None)

    # the vocabulary is the init's, byte for byte
    for name in VOCAB_FILES:
        assert (out / name).read_bytes() == (DEMO_LOCALIZER / name).read_bytes()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    (record,) = read_hclal_dataset(export_dir)
    assert [les.lesion_id for les in record.lesions] == [CONFIRMED, LESION]

    for stage in ("coarse", "fine"):
        ckpt = load_checkpoint(out / stage)
        init = load_checkpoint(DEMO_LOCALIZER / stage)
        meta = ckpt.extra["locus"]
        # a few real steps, with a finite loss recorded per step
        state = torch.load(work / f"{stage}_state.pt", map_location="cpu", weights_only=True)
        assert state["step"] == STEPS == ckpt.batch == meta["training"]["steps"]
        assert len(state["losses"]) == STEPS and all(math.isfinite(v) for v in state["losses"])
        assert math.isfinite(meta["training"]["loss_first_50"]) and math.isfinite(meta["training"]["loss_last_50"])
        # started from the init weights, kept their geometry, and moved
        assert meta["init"] == {"release": str(DEMO_LOCALIZER.resolve()), "checkpoint_sha256": init.sha256,
                                "steps": init.batch}
        assert (ckpt.net, ckpt.preprocessing) == (init.net, init.preprocessing)
        tuned, start = build_network(ckpt).state_dict(), build_network(init).state_dict()  # strict loads
        assert tuned.keys() == start.keys()
        assert not torch.allclose(tuned["image_encoder.fc.weight"], start["image_encoder.fc.weight"])
        # the data it learnt from: this export's manifest, its library, its study version
        data = meta["training_data"]
        assert data["dataset"]["sha256"]["manifest.json"] == sha256_file(export_dir / "manifest.json")
        assert data["dataset"]["sha256"]["anno.csv"] == sha256_file(export_dir / "anno.csv")
        assert data["dataset"]["library"] == manifest["library"] == meta["library"] == load_library().stamp()
        assert data["train"]["study_sources"] == [record.source] and data["train"]["lesions"] == 2
        assert (data["validation"], data["test"]) == (None, None)
        # calibration: recorded as not fitted, and the init's phantom temperatures are not carried over
        assert init.extra["locus"]["calibration"].get("temperature")
        assert meta["calibration"]["fitted"] is False and "temperature" not in meta["calibration"]
        assert meta["vocabulary_sha256"] == Vocabulary.load(*(out / n for n in VOCAB_FILES)).vocabulary_sha256
    assert not (out / "evaluation.json").exists()

    # the release reloads strictly through the node's loader and localizes every exported lesion
    loc = Localizer.load(out / "coarse", out / "fine", *(out / n for n in VOCAB_FILES))
    assert loc.temperatures is None  # nothing claims calibration
    exported = [row["locus_label"] for row in csv.DictReader((export_dir / "bbox.csv").open())]
    labels = sorted(int(v) for v in np.unique(record.labels.array) if v)
    assert sorted(int(x) for x in exported) == labels and len(labels) == 5
    masks = [record.labels.with_array((record.labels.array == lab).astype(np.uint8)) for lab in labels]
    outputs = loc.localize(record.ct, record.suv, masks)
    finals = set(loc.vocab.finals.values())
    assert len(outputs) == 5 and all(o.final_label in finals and o.coarse_ranking for o in outputs)


def test_tiny_datasets_and_unteachable_sites_fail_before_training_with_a_reason(export_dir: Path,
                                                                                   tmp_path: Path) -> None:
    # the default 80/10/10 study-id split cannot give one study to train, validation and test
    result = _train("--out", str(tmp_path / "a"), "--work", str(tmp_path / "wa"), "--preset", "finetune",
                    "--data", str(export_dir), "--init", str(DEMO_LOCALIZER), "--steps", "1")
    assert result.exit_code == 1
    assert "holds no study: the dataset has 1 studies" in result.output and "--split all" in result.output
    assert not (tmp_path / "a" / "coarse").exists()

    # a lesion confirmed at a site the init vocabulary cannot name cannot be learnt by fine-tuning
    demo = Vocabulary.load(*(DEMO_LOCALIZER / n for n in VOCAB_FILES))
    unknown = next(final for cm in crosswalk_tree(load_library()).values() for fm in cm.values()
                   for final in fm.values() if final not in set(demo.finals.values()))
    edited = tmp_path / "edited"
    edited.mkdir()
    for p in export_dir.iterdir():
        (edited / p.name).symlink_to(p)
    (edited / "anno.csv").unlink()
    rows = read_csv(export_dir / "anno.csv", ANNO_COLUMNS)
    rows[-1]["GT"], rows[-1]["locus_site_id"] = unknown, ""
    with (edited / "anno.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = _train("--out", str(tmp_path / "b"), "--work", str(tmp_path / "wb"), "--preset", "finetune",
                    "--data", str(edited), "--split", "all", "--init", str(DEMO_LOCALIZER), "--steps", "1")
    assert result.exit_code == 1
    assert "1 training lesion(s) have no location in the vocabulary of --init" in result.output
    assert f"/{LESION}: {unknown}" in result.output
    assert not (tmp_path / "b" / "coarse").exists()


def test_init_must_be_a_release_directory(tmp_path: Path) -> None:
    result = _train("--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--preset", "finetune",
                    "--init", str(tmp_path), "--steps", "1")
    assert result.exit_code == 1 and "is not an HCL-AL release directory" in result.output
