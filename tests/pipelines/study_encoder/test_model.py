"""Strict loading of the published checkpoint layout, offline text tower, StudyEncoder.encode, zero-shot."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from library.prompts import load_prompt_set
from pipelines.errors import InputError, ModelError
from pipelines.models.checkpoints import sha256_file, state_dict_sha256
from pipelines.models.study_encoder import model as hm
from pipelines.models.study_encoder import zeroshot
from tests.pipelines.study_encoder.conftest import TINY_MODEL
from tests.pipelines.study_encoder.phantoms import torso


@pytest.fixture(scope="module")
def encoder(tiny_dirs: dict[str, Path]) -> hm.StudyEncoder:
    return hm.StudyEncoder(hm.StudyEncoderConfig(
        checkpoint=tiny_dirs["checkpoint"], text_dir=tiny_dirs["text"], model_name=TINY_MODEL,
        config_dir=tiny_dirs["configs"], thresholds={"pleural_effusion": 0.5, "emphysema": 0.0},
    ))  # fmt: skip


def test_checkpoint_layout_is_published(tiny_dirs: dict[str, Path]) -> None:
    raw = torch.load(tiny_dirs["checkpoint"], weights_only=True)
    keys = set(raw["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    for k in ("module.visual.trunk.cls_token", "module.visual.trunk.spatial_posemb",
              "module.visual.trunk.patch_embed.proj.weight", "module.visual.trunk.blocks.2.attn.qkv.weight",
              "module.visual.trunk.norm.weight", "module.visual.head.proj.weight",
              "module.text.transformer.embeddings.word_embeddings.weight", "module.text.proj.weight",
              "module.logit_scale"):  # fmt: skip
        assert k in keys
    assert not any("pooler" in k or k.endswith("pos_embed") for k in keys)


def test_strict_load_reproduces_the_source_model(tiny_dirs: dict[str, Path], encoder: hm.StudyEncoder) -> None:
    raw = torch.load(tiny_dirs["checkpoint"], weights_only=True)["state_dict"]
    own = encoder.model.state_dict()
    assert set(own) == {k.removeprefix("module.") for k in raw}
    for k, v in raw.items():
        torch.testing.assert_close(own[k.removeprefix("module.")], v)
    # identity from the weights content (the file's own hash is kept for pinning)
    sd = {k.removeprefix("module."): v for k, v in raw.items()}
    assert encoder.checkpoint.sha256 == sha256_file(tiny_dirs["checkpoint"])
    assert encoder.model_info.sha256 == state_dict_sha256(sd)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    assert encoder.model_info.model_id == f"hlip-{state_dict_sha256(visual)[:12]}"


def test_missing_or_extra_keys_fail_loudly(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    sd = dict(torch.load(tiny_dirs["checkpoint"], weights_only=True)["state_dict"])
    del sd["module.visual.head.proj.weight"]
    sd["module.visual.trunk.pos_embed"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(ModelError) as err:
        hm.StudyEncoder(hm.StudyEncoderConfig(checkpoint=bad, text_dir=tiny_dirs["text"], model_name=TINY_MODEL,
                                              config_dir=tiny_dirs["configs"]))  # fmt: skip
    assert err.value.code == "checkpoint_layout"
    assert "visual.head.proj.weight" in str(err.value) and "visual.trunk.pos_embed" in str(err.value)


def test_pinned_hash_mismatch_refused(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(ModelError) as err:
        hm.StudyEncoder(hm.StudyEncoderConfig(checkpoint=tiny_dirs["checkpoint"], text_dir=tiny_dirs["text"],
                                              model_name=TINY_MODEL, config_dir=tiny_dirs["configs"],
                                              expected_sha256="0" * 64))  # fmt: skip
    assert err.value.code == "model_hash_mismatch"


def test_safetensors_plain_state_dict_and_no_network(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from safetensors.torch import save_file

    sd = {k.removeprefix("module."): v.contiguous()
          for k, v in torch.load(tiny_dirs["checkpoint"], weights_only=True)["state_dict"].items()}  # fmt: skip
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = hm.StudyEncoder(hm.StudyEncoderConfig(checkpoint=path, text_dir=tiny_dirs["text"], model_name=TINY_MODEL,
                                                config_dir=tiny_dirs["configs"]))  # fmt: skip
    x = torch.randn(1, 1, 1, 16, 48, 48)
    assert enc.embed(x).shape == (1, 16)


def test_missing_text_dir_files(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        hm.build_model(TINY_MODEL, tmp_path)
    assert err.value.code == "text_tower_missing"


def test_tokenizer_knows_every_prompt_word(encoder: hm.StudyEncoder) -> None:
    prompts = load_prompt_set()
    texts = [t for f in prompts.findings for pair in prompts.texts(f) for t in pair]
    ids = encoder.tokenizer(texts)
    assert ids.shape == (len(texts), 64)
    assert not (ids == 1).any()  # [UNK]
    assert (ids[:, 0] == 2).all()  # [CLS]


def test_zero_shot_follows_paired_prompt_protocol(encoder: hm.StudyEncoder) -> None:
    prompts = encoder.prompts
    assert len(prompts.findings) == 16 and prompts.templates == ("The volume shows: {}.",)
    f = prompts.findings[5]
    assert (f.finding, f.negative, f.positive) == ("Pleural effusion", "Not pleural effusion", "Pleural effusion")
    with torch.no_grad():
        t_neg = encoder.model.encode_text(encoder.tokenizer(["The volume shows: Not pleural effusion."]), normalize=True)
        t_pos = encoder.model.encode_text(encoder.tokenizer(["The volume shows: Pleural effusion."]), normalize=True)
    torch.testing.assert_close(encoder.classifier.weights[5], torch.cat([t_neg, t_pos]))
    emb = encoder.embed(torch.randn(1, 1, 1, 16, 48, 48))[0]
    scale = float(encoder.model.logit_scale.detach().exp())
    assert scale == pytest.approx(np.exp(2.0))
    logits = scale * torch.stack([emb @ t_neg[0], emb @ t_pos[0]])
    expected = torch.softmax(logits, 0)[1].item()
    assert encoder.classifier.scores(emb)[5] == pytest.approx(expected, rel=1e-5)


def test_classifier_scores_by_hand() -> None:
    prompts = load_prompt_set()
    w = torch.zeros(len(prompts.findings), 2, 2)
    w[:, 0] = torch.tensor([1.0, 0.0])
    w[:, 1] = torch.tensor([0.0, 1.0])
    clf = zeroshot.ZeroShotClassifier(prompts, w, logit_scale=10.0)
    s = clf.scores(torch.tensor([0.6, 0.8]))
    assert s == pytest.approx(np.full(16, 1 / (1 + np.exp(-10 * 0.2))))
    found = zeroshot.to_findings(s, prompts, {"emphysema": 0.9, "atelectasis": 0.5})
    assert (found[0].present, found[1].present, found[2].present) == (False, True, None)
    assert found[2].threshold is None


def test_unknown_threshold_key_refused() -> None:
    with pytest.raises(ModelError) as err:
        zeroshot.check_thresholds(load_prompt_set(), {"pleural_efusion": 0.4})
    assert err.value.code == "threshold_config"


def test_encode_chest_phantom(encoder: hm.StudyEncoder) -> None:
    ct = torso(60, 5.0, -150.0, (-60.0, 120.0))  # 300 mm chest-length CT with lungs
    enc = encoder.encode(ct, body_part_examined="CHEST")
    assert len(enc.embedding) == 16
    assert float(np.linalg.norm(enc.embedding)) == pytest.approx(1.0, abs=1e-5)
    assert enc.model == encoder.model_info
    assert enc.preprocessing_version == "locus-hlip-chestct-1"
    assert enc.prompt_set_version == "ct-rate-16/hlip-v1-volume-1"
    assert [f.finding for f in enc.findings][:3] == ["Emphysema", "Atelectasis", "Lung nodule"]
    by_name = {f.finding: f for f in enc.findings}
    assert by_name["Emphysema"].present is True and by_name["Emphysema"].threshold == 0.0
    assert by_name["Pleural effusion"].present == (by_name["Pleural effusion"].score > 0.5)
    assert by_name["Cardiomegaly"].present is None
    assert "published_centre" in enc.crop_description
    assert {f.code for f in enc.flags} == {"hlip_orientation_unvalidated"}
    assert set(encoder.last_timings) == {"preprocess_s", "forward_s", "zeroshot_s"}
    # deterministic
    assert encoder.encode(ct).embedding == enc.embedding


def test_encode_refuses_ct_without_chest(encoder: hm.StudyEncoder) -> None:
    with pytest.raises(InputError) as err:
        encoder.encode(torso(30, 5.0, 0.0, None), body_part_examined="CHEST")
    assert err.value.code == "ct_not_chest"
