"""A few-step training run on tiny models: the loss falls, the export reloads strictly, resume is exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.models.checkpoints import load_checkpoint
from pipelines.models.localizer.model import Localizer
from pipelines.models.localizer.network import build_network
from pipelines.models.localizer.vocabulary import Vocabulary
from tests.training.conftest import fake_bank
from training.localizer.export import checkpoint_dict, save_checkpoint, update_metadata
from training.localizer.train import StageConfig, build_model, train_stage

FINALS = ["Left upper lobe", "Right lower lobe", "Mediastinum 4R", "Liver S1", "Liver S7", "Spleen",
          "Vertebra T4", "Vertebra T5", "Left rib 3", "Right rib 3"]


def tiny(stage: str, steps: int) -> StageConfig:
    return StageConfig(stage, (16, 16, 16), (8.0, 8.0, 8.0), embed_dim=32, text_width=64, text_layers=1,
                       batch_size=8, steps=steps, lr=1e-3, milestones=(0.9,), skip_num=2 if stage == "coarse" else 5,
                       save_every=5)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def test_loss_decreases_and_checkpoint_reloads_strictly(tmp_path: Path, vocab: Vocabulary,
                                                        vocab_files: tuple[Path, Path]) -> None:
    bank = fake_bank(FINALS * 2)
    nets = {}
    for stage in ("coarse", "fine"):
        cfg = tiny(stage, 40)
        res = train_stage(cfg, bank, vocab, tmp_path / "work", seed=3, progress=False)
        assert np.mean(res.losses[-8:]) < 0.8 * np.mean(res.losses[:8])
        meta = {"training": {"steps": res.steps}, "calibration": {"temperature": 0.05 if stage == "coarse" else 0.04}}
        save_checkpoint(checkpoint_dict(res.net, cfg, meta, steps=res.steps, dtype="float16"),
                        tmp_path / "out" / stage / "params.pth")
        nets[stage] = res.net
    ckpt = load_checkpoint(tmp_path / "out" / "coarse")
    assert all(k.startswith(("image_encoder.", "text_encoder.", "logit_scale")) for k in ckpt.state_dict)
    assert all(v.dtype != torch.float16 for v in ckpt.state_dict.values())  # stored fp16, loaded fp32
    assert ckpt.net == "ClipText_BasicNet" and ckpt.extra["locus"]["stored_dtype"] == "float16"
    reloaded = build_network(ckpt)  # strict: a missing or renamed tensor raises
    for k, v in nets["coarse"].state_dict().items():
        assert torch.allclose(reloaded.state_dict()[k].float(), v.float(), atol=2e-3, rtol=2e-3), k
    loc = Localizer.load(tmp_path / "out" / "coarse", tmp_path / "out" / "fine", *vocab_files)
    assert loc.temperatures == (0.05, 0.04)  # read from the checkpoints' Locus metadata
    update_metadata(tmp_path / "out" / "fine" / "params.pth", calibration=None)
    loc = Localizer.load(tmp_path / "out" / "coarse", tmp_path / "out" / "fine", *vocab_files)
    assert loc.temperatures is None  # never claim calibration unless both stages were fitted


def test_resume_gives_the_uninterrupted_result(tmp_path: Path, vocab: Vocabulary) -> None:
    bank = fake_bank(FINALS)
    cfg = tiny("coarse", 10)
    full = train_stage(cfg, bank, vocab, tmp_path / "a", seed=5, progress=False)
    again = train_stage(cfg, bank, vocab, tmp_path / "b", seed=5, progress=False)
    assert again.losses == full.losses  # seeded: the same run twice gives the same losses
    first = train_stage(cfg, bank, vocab, tmp_path / "c", seed=5, progress=False, stop_after=4)  # interrupted
    assert first.steps == 4 and torch.load(tmp_path / "c" / "coarse_state.pt", weights_only=False)["step"] == 4
    resumed = train_stage(cfg, bank, vocab, tmp_path / "c", seed=5, resume=True, progress=False)
    assert resumed.steps == 10 and resumed.losses == full.losses
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
    with pytest.raises(ValueError, match="another configuration"):
        train_stage(dataclasses.replace(cfg, lr=5e-4), bank, vocab, tmp_path / "c", seed=5, resume=True,
                    progress=False)


def test_text_fc_is_trained_because_inference_applies_it(tmp_path: Path, vocab: Vocabulary) -> None:
    cfg = dataclasses.replace(tiny("coarse", 3), net="ClipText_Fc_BasicNet")
    torch.manual_seed(0)  # train_stage seeds the same way, so this is its starting point
    start = build_model(cfg).text_fc.weight.detach().clone()  # type: ignore[union-attr]
    res = train_stage(cfg, fake_bank(FINALS), vocab, tmp_path, seed=0, progress=False)
    assert res.net.text_fc is not None and not torch.allclose(res.net.text_fc.weight, start)
