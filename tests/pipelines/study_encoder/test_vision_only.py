"""HLIP without a text tower: embeddings from a vision-only checkpoint; content-based model ids;
open_clip's false random-initialisation warning silenced before a strict load."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipelines.errors import ModelError
from pipelines.models.study_encoder import interpret
from pipelines.models.study_encoder import model as hm
from tests.pipelines.study_encoder.conftest import TINY_MODEL
from tests.pipelines.study_encoder.phantoms import torso


def _state(tiny_dirs: dict[str, Path]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v.contiguous()
            for k, v in torch.load(tiny_dirs["checkpoint"], weights_only=True)["state_dict"].items()}


def _config(tiny_dirs: dict[str, Path], checkpoint: Path, text_dir: Path | None) -> hm.StudyEncoderConfig:
    return hm.StudyEncoderConfig(checkpoint=checkpoint, text_dir=text_dir, model_name=TINY_MODEL,
                                 config_dir=tiny_dirs["configs"])


@pytest.fixture(scope="module")
def full(tiny_dirs: dict[str, Path]) -> hm.StudyEncoder:
    return hm.StudyEncoder(_config(tiny_dirs, tiny_dirs["checkpoint"], tiny_dirs["text"]))


def test_vision_only_checkpoint_gives_the_same_embeddings(tiny_dirs: dict[str, Path], full: hm.StudyEncoder,
                                                          tmp_path: Path) -> None:  # fmt: skip
    vision = {k: v for k, v in _state(tiny_dirs).items() if k.startswith("visual.")}
    path = tmp_path / "visual.pt"
    torch.save({"state_dict": vision}, path)
    enc = hm.StudyEncoder(_config(tiny_dirs, path, None))
    assert enc.vision_only and enc.classifier is None
    x = torch.randn(2, 1, 1, 16, 48, 48)
    assert torch.allclose(enc.embed(x), full.embed(x), atol=1e-6)
    assert enc.model_info.model_id == full.model_info.model_id  # same visual weights: comparable embeddings

    encoding = enc.encode(torso(60, 5.0, -150.0, (-60.0, 120.0)), body_part_examined="CHEST")
    assert len(encoding.embedding) == 16 and encoding.findings == () and encoding.prompt_set_version is None
    flag = next(f for f in encoding.flags if f.code == "zero_shot_unavailable")
    assert "no text tower" in flag.message and "zero-shot findings need" in flag.message
    with pytest.raises(ModelError) as err:  # explaining a finding needs the text tower too
        interpret.relevance_map(enc, torso(60, 5.0, -150.0, (-60.0, 120.0)), "emphysema")
    assert err.value.code == "text_tower_missing"


def test_full_checkpoint_without_text_dir_is_embeddings_only(tiny_dirs: dict[str, Path],
                                                             full: hm.StudyEncoder) -> None:  # fmt: skip
    enc = hm.StudyEncoder(_config(tiny_dirs, tiny_dirs["checkpoint"], None))
    assert enc.vision_only and "study_encoder_text_dir" in enc.zero_shot_flags()[0].message
    x = torch.randn(1, 1, 1, 16, 48, 48)
    assert torch.allclose(enc.embed(x), full.embed(x), atol=1e-6)


def test_model_id_names_the_weights_not_the_file(tiny_dirs: dict[str, Path], full: hm.StudyEncoder,
                                                 tmp_path: Path) -> None:  # fmt: skip
    from safetensors.torch import save_file

    path = tmp_path / "copy.safetensors"
    save_file(_state(tiny_dirs), str(path))
    copy = hm.StudyEncoder(_config(tiny_dirs, path, tiny_dirs["text"]))
    assert copy.checkpoint.sha256 != full.checkpoint.sha256  # other file bytes
    assert (copy.model_info.model_id, copy.model_info.sha256) == (full.model_info.model_id, full.model_info.sha256)


def test_no_random_init_warning_before_a_strict_load(tiny_dirs: dict[str, Path],
                                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with caplog.at_level(logging.WARNING):
        hm.StudyEncoder(_config(tiny_dirs, tiny_dirs["checkpoint"], tiny_dirs["text"]))
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
