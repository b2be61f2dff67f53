"""Whole-body PET/CT ItemizedCLIP variants: published load path, preprocessing geometry, CPU training loop, CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pipelines.errors import InputError, ModelError
from pipelines.models.itemizedclip import model as im
from pipelines.models.itemizedclip import wholebody as wb
from pipelines.models.itemizedclip.geometry import TokenGrid
from training.itemizedclip import train as tr
from training.itemizedclip.data import phantom_studies
from training.itemizedclip.text import write_text_dir
from training.phantom import make_phantom

DEMO = wb.PARAMS[wb.DEMO_MODEL]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_dir(tmp_path_factory.mktemp("report-bert"))


def test_demo_variant_round_trips_through_the_published_strict_loader(text_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = im.build_model(wb.DEMO_MODEL, text_dir)
    with torch.no_grad():
        model.visual_attn.ln_q.bias.normal_()
        model.logit_bias.fill_(-7.5)
    sd = model.state_dict()
    assert tuple(sd["visual.trunk.patch_embed.proj.weight"].shape) == (96, 2, 8, 12, 12)  # PET + CT channels
    assert {k for k in sd if k.startswith("visual_attn.")} == {
        f"visual_attn.{k}" for k in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                     "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_k.weight", "ln_k.bias",
                                     "ln_v.weight", "ln_v.bias")}  # fmt: skip
    ckpt = tr.save_checkpoint(model, None, tmp_path / "c.pt", epoch=3, name="demo", locus={"model_name": wb.DEMO_MODEL})
    raw = torch.load(ckpt, weights_only=True)
    assert set(raw) == {"epoch", "name", "state_dict", "optimizer", "locus"}
    assert all(k.startswith("module.") for k in raw["state_dict"])
    loaded, info = im.load_model(ckpt, text_dir, model_name=wb.DEMO_MODEL)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert info.adjustments == ()
    x = torch.rand(1, 1, 2, *DEMO.size_zyx)
    g, tokens = loaded.encode_image(x)
    assert tokens.shape == (1, 216, 64) and g.shape == (1, 64)

    broken = dict(raw["state_dict"])
    del broken["module.visual_attn.ln_v.bias"]
    torch.save({**raw, "state_dict": broken}, tmp_path / "missing.pt")
    with pytest.raises(ModelError, match="1 missing"):
        im.load_model(tmp_path / "missing.pt", text_dir, model_name=wb.DEMO_MODEL)
    one_channel = dict(raw["state_dict"])
    one_channel["module.visual.trunk.patch_embed.proj.weight"] = torch.zeros(96, 1, 8, 12, 12)  # a CT-only trunk
    torch.save({**raw, "state_dict": one_channel}, tmp_path / "ct_only.pt")
    with pytest.raises(ModelError, match="other shapes"):
        im.load_model(tmp_path / "ct_only.pt", text_dir, model_name=wb.DEMO_MODEL)


def test_full_size_wholebody_config_is_the_published_architecture_with_two_channels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Meta-device build (shapes only) of the full variant next to the published chest model."""
    from transformers import BertConfig

    BertConfig(vocab_size=30522).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        whole = {k: tuple(v.shape) for k, v in im.build_model(wb.WHOLEBODY_MODEL, tmp_path).state_dict().items()}
        chest = {k: tuple(v.shape) for k, v in im.build_model(im.CHEST_MODEL, tmp_path).state_dict().items()}
    assert set(whole) == set(chest) and len(whole) == 361  # the published key set (§4)
    differ = {k for k in whole if whole[k] != chest[k]}
    assert differ == {"visual.trunk.patch_embed.proj.weight", "visual.trunk.spatial_posemb"}
    assert whole["visual.trunk.patch_embed.proj.weight"] == (768, 2, 8, 12, 12)
    assert whole["visual.trunk.spatial_posemb"] == (1, 32, 12, 12, 768)  # 4,608 tokens of 32 x 48 x 48 mm
    assert wb.PARAMS[wb.WHOLEBODY_MODEL].size_zyx == (256, 144, 144)


def test_preprocessing_puts_pet_and_ct_on_one_lps_grid_and_lesions_where_they_are() -> None:
    ph = make_phantom(3, "tiny")
    prep = wb.preprocess_petct(ph.pet, ph.ct, DEMO)
    x = prep.tensor
    assert x.shape == (1, 1, 2, *DEMO.size_zyx) and x.dtype == torch.float32
    pet, ct = x[0, 0, 0].numpy(), x[0, 0, 1].numpy()
    assert pet.min() >= 0.0 and pet.max() <= 2.0 and ct.min() >= 0.0 and ct.max() <= 1.0
    lo = np.array(prep.crop_lps_min)
    spacing = np.array(DEMO.spacing_zyx_mm[::-1])
    assert np.allclose(np.array(prep.crop_lps_max) - lo, (np.array(DEMO.size_zyx[::-1]) - 1) * spacing)
    grid = TokenGrid.from_prepared(prep, wb.TRUNK_SPECS[wb.DEMO_TRUNK].patch_size)
    assert grid.grid == (6, 6, 6)
    body = pet[ct > 0.3]
    for les in ph.lesions:
        i, j, k = np.rint((np.array(les.center_mm) - lo) / spacing).astype(int)
        assert pet[k, j, i] > 2.0 * np.median(body)  # the lesion's uptake is at its LPS position
        token = (k // 8, j // 12, i // 12)
        centre = grid.affine @ np.array([token[2], token[1], token[0], 1.0])
        assert np.all(np.abs(centre[:3] - np.array(les.center_mm)) <= np.array([48, 48, 32]) + 1e-6)
    studies = phantom_studies([3], DEMO, lesion_free_fraction=0.0)
    labels = studies[0].lesion_labels
    for les in ph.lesions:
        i, j, k = np.rint((np.array(les.center_mm) - lo) / spacing).astype(int)
        assert labels[k, j, i] == les.label
    other = make_phantom(4, "tiny")
    with pytest.raises(InputError, match="frames of reference"):
        wb.preprocess_petct(ph.pet, other.ct, DEMO)


def test_optimiser_groups_text_lock_and_schedule(text_dir: Path) -> None:
    model = im.build_model(wb.DEMO_MODEL, text_dir)
    no_decay, decay = tr.param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "logit_bias", "visual_attn.ln_q.weight", "visual_attn.attn.in_proj_bias"} <= nd
    assert "visual_attn.attn.in_proj_weight" not in nd
    tr.lock_text_tower(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.")}
    assert "text.proj.weight" in trainable
    assert all(n == "text.proj.weight" or "LayerNorm" in n for n in trainable)
    spec = tr.TrainSpec(steps=100, warmup_steps=10, lr=1e-3)
    assert tr.lr_at(0, spec) == pytest.approx(1e-4) and tr.lr_at(9, spec) == pytest.approx(1e-3)
    assert tr.lr_at(55, spec) == pytest.approx(5e-4) and tr.lr_at(99, spec) < 1e-5


def test_cpu_training_on_phantoms_lowers_the_loss_and_reloads_strictly(text_dir: Path, tmp_path: Path) -> None:
    studies = phantom_studies([0, 1, 2], DEMO, lesion_free_fraction=0.0) + \
        phantom_studies([5], DEMO, n_lesions=0)  # fmt: skip
    assert [s.normal for s in studies] == [False, False, False, True]
    spec = tr.TrainSpec(steps=10, batch_size=3, lr=1e-3, warmup_steps=2, seed=1)
    result = tr.train(spec, tmp_path / "run", studies=studies, text_dir=text_dir)
    losses = [h["total"] for h in result.history]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    for h in result.history:
        assert h["ila"] > 0 and h["kta"] > 0 and h["mps"] > 0 and h["iis"] > 0
    model, ckpt = im.load_model(result.checkpoint, text_dir, model_name=wb.DEMO_MODEL)
    assert ckpt.sha256 == result.sha256
    assert float(model.logit_scale.detach()) <= math.log(100.0) + 1e-6
    meta = torch.load(result.checkpoint, weights_only=True)["locus"]
    assert meta["preprocessing"]["size_zyx"] == list(DEMO.size_zyx) and meta["model_name"] == wb.DEMO_MODEL
    report = json.loads((tmp_path / "run" / "train.json").read_text())
    assert report["n_normal"] == 1 and len(report["history"]) == 10


def test_locus_train_itemizedclip_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from node.cli import main  # the node's entry point, as an operator runs it

    result = CliRunner().invoke(main, ["train", "itemizedclip", "--help"])
    assert result.exit_code == 0, result.output
    for opt in ("--out", "--steps", "--seeds", "--recipe", "--lock-text", "--lesion-free-fraction", "--device"):
        assert opt in result.output
    result = CliRunner().invoke(main, ["train", "itemizedclip", "--out", str(tmp_path / "o"), "--steps", "2",
                                       "--batch-size", "2", "--seeds", "0-1", "--lr", "1e-3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 2 and Path(summary["checkpoint"]).is_file() and len(summary["sha256"]) == 64
    rel = CliRunner().invoke(main, ["train", "itemizedclip-release", "--run", str(tmp_path / "o"), "--out",
                                    str(tmp_path / "rel"), "--seeds", "1000-1002", "--lesion-free-fraction", "0.5"])
    assert rel.exit_code == 0, rel.output
    metrics = json.loads(rel.output.strip().splitlines()[-1])
    assert metrics["n_studies"] == 3 and metrics["label"] == "phantom accuracy, not clinical accuracy"
    manifest = json.loads((tmp_path / "rel" / "manifest.json").read_text())
    assert manifest["evaluation"]["seeds"] == [1000, 1002] and manifest["not_for_patients"] is True
    assert torch.load(tmp_path / "rel" / "checkpoint.pt", weights_only=True)["optimizer"] == {}
    _, info = im.load_model(tmp_path / "rel" / "checkpoint.pt", tmp_path / "rel" / "text", model_name=wb.DEMO_MODEL)
    assert info.sha256 == manifest["sha256"]
    assert "phantom accuracy" in (tmp_path / "rel" / "README.md").read_text().lower()
    bad = CliRunner().invoke(main, ["train", "itemizedclip", "--out", str(tmp_path / "b"), "--seeds", "5-1"])
    assert bad.exit_code != 0 and "seed range" in bad.output
