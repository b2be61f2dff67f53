"""Published architecture and checkpoint layout (ItemizedCLIP, arXiv 2512.11141), strict and safe loading."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from library.prompts import PromptSetError
from library.prompts.itemized import load_item_prompt_set
from pipelines.errors import ModelError
from pipelines.models.checkpoints import sha256_file
from pipelines.models.itemizedclip import encoder as ie
from pipelines.models.itemizedclip import model as im
from pipelines.models.itemizedclip.head import PureAttentionPoolingBlock
from pipelines.models.study_encoder import model as hm
from tests.pipelines.itemizedclip.conftest import TINY_MODEL, TINY_SPEC, write_text_dir

BLOCK_KEYS = {
    "visual_attn.attn.in_proj_weight", "visual_attn.attn.in_proj_bias", "visual_attn.attn.out_proj.weight",
    "visual_attn.attn.out_proj.bias", "visual_attn.ln_q.weight", "visual_attn.ln_q.bias", "visual_attn.ln_k.weight",
    "visual_attn.ln_k.bias", "visual_attn.ln_v.weight", "visual_attn.ln_v.bias",
}  # fmt: skip


def _config(dirs: dict[str, Path], **kw: object) -> ie.ItemizedClipConfig:
    base: dict[str, object] = {"checkpoint": dirs["checkpoint"], "text_dir": dirs["text"], "model_name": TINY_MODEL,
                               "config_dir": dirs["configs"]}  # fmt: skip
    base.update(kw)
    return ie.ItemizedClipConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def enc(tiny_itemized: dict[str, Path]) -> ie.ItemizedClipEncoder:
    return ie.ItemizedClipEncoder(_config(tiny_itemized, thresholds={"pleural_effusion": 0.0, "emphysema": 0.99}))


def _state(dirs: dict[str, Path]) -> dict[str, torch.Tensor]:
    return dict(torch.load(dirs["checkpoint"], weights_only=True)["state_dict"])


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"epoch": 1, "name": "x", "state_dict": sd, "optimizer": {}, "scaler": {}}, path)
    return path


# ------------------------------------------------------------------ the full-size published model (meta tensors)


@pytest.fixture(scope="module")
def bert_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT-base config (V = 30,522, 12 × 768) with a placeholder vocabulary: shapes only."""
    from transformers import BertConfig

    d = tmp_path_factory.mktemp("bert-base")
    BertConfig(vocab_size=30522).save_pretrained(d)
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    return d


@pytest.fixture()
def meta_build(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Build full-size models on the meta device (shapes, no memory): the HLIP trunk reads its
    drop-path schedule with ``float()``, which needs a real tensor, so ``linspace`` stays on the CPU."""
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))

    def build(name: str, text_dir: Path, itemized: bool = True) -> torch.nn.Module:
        with torch.device("meta"):
            if itemized:
                return im.build_model(name, text_dir)
            # HLIP: what hm.build_model builds, minus open_clip's final move to a real device
            import copy

            import open_clip
            from open_clip.model import CustomTextCLIP

            hm.register_configs()
            cfg = copy.deepcopy(open_clip.get_model_config(name))
            cfg.pop("custom_text")
            cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir))
            return CustomTextCLIP(**cfg)

    return build


def test_published_chest_model_has_the_published_key_set(bert_base_dir: Path, meta_build) -> None:  # type: ignore[no-untyped-def]
    model = meta_build(im.CHEST_MODEL, bert_base_dir)
    hlip = meta_build("vit_base_singlescan_h2_token2744", bert_base_dir, itemized=False)
    sd = model.state_dict()
    assert len(sd) == 361
    assert sum(v.numel() for v in sd.values()) == 201_435_650
    groups = {"visual.": (151, 91_097_088), "text.": (198, 109_284_864), "visual_attn.": (10, 1_053_696)}
    for prefix, (n_keys, n_params) in groups.items():
        keys = [k for k in sd if k.startswith(prefix)]
        assert (len(keys), sum(sd[k].numel() for k in keys)) == (n_keys, n_params), prefix
    assert {k for k in sd if k.startswith("visual_attn.")} == BLOCK_KEYS
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["visual_attn.attn.in_proj_weight"] == (1536, 512)
    assert shapes["visual.trunk.spatial_posemb"] == (1, 14, 14, 14, 768)
    assert shapes["visual.trunk.patch_embed.proj.weight"] == (768, 1, 8, 24, 24)
    assert shapes["visual.head.proj.weight"] == (512, 768) and "visual.head.proj.bias" not in sd
    assert shapes["text.proj.weight"] == (512, 768) and shapes["logit_scale"] == () and shapes["logit_bias"] == ()
    assert not any("pooler" in k or "position_ids" in k or "sequential_posemb" in k for k in sd)
    # visual.* names and shapes identical to HLIP v1's; ItemizedCLIP adds exactly logit_bias + the block (§4)
    hsd = hlip.state_dict()
    assert {k: tuple(v.shape) for k, v in hsd.items() if k.startswith("visual.")} == \
        {k: v for k, v in shapes.items() if k.startswith("visual.") and not k.startswith("visual_attn.")}
    assert set(sd) - set(hsd) == BLOCK_KEYS | {"logit_bias"}
    # constructor values (§1, §3)
    block = model.visual_attn
    assert block.attn.num_heads == 8 and block.attn.head_dim == 64 and block.attn.batch_first
    assert block.attn.bias_k is None and block.attn.dropout == 0.0
    assert block.attn._qkv_same_embed_dim and block.attn.in_proj_bias is not None
    assert all(ln.eps == 1e-5 and ln.elementwise_affine for ln in (block.ln_q, block.ln_k, block.ln_v))
    import open_clip

    cfg = open_clip.get_model_config(im.CHEST_MODEL)
    assert cfg["init_logit_scale"] == pytest.approx(np.log(1 / 0.07), abs=1e-5) and cfg["init_logit_bias"] == -10
    assert cfg["text_cfg"]["context_length"] == 77
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_base_singlescan_h2_token2744"


def test_add_zero_attn_is_the_null_slot() -> None:
    """All tokens masked → all weight on the last (null) column and the output is out_proj's bias."""
    torch.manual_seed(0)
    block = PureAttentionPoolingBlock(context_dim=16).eval()
    with torch.no_grad():
        block.attn.out_proj.bias.normal_()
    q, t = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.zeros(2 * 8, 3, 5)
    out, w = block(q, t, t, mask=mask, output_attn_weights=True)
    assert w.shape == (2, 3, 6)
    torch.testing.assert_close(w[..., -1], torch.ones(2, 3))
    torch.testing.assert_close(out, block.attn.out_proj.bias.expand(2, 3, 16))
    # keep everything: the null logit is exactly 0, so its weight is 1 / (1 + Σ exp(logits)) per head
    _, w_heads = block(q, t, t, mask=torch.ones(16, 3, 5), output_attn_weights=True, average_attn_weights=False)
    _, w_free = block(q, t, t, output_attn_weights=True, average_attn_weights=False)
    torch.testing.assert_close(w_heads, w_free)
    assert bool((w_free[..., -1] > 0).all())


# ------------------------------------------------------------------ tiny checkpoint in the published layout


def test_tiny_checkpoint_is_in_the_published_layout(tiny_itemized: dict[str, Path]) -> None:
    raw = torch.load(tiny_itemized["checkpoint"], weights_only=True)
    assert set(raw) == {"epoch", "name", "state_dict", "optimizer", "scaler"}
    keys = set(raw["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    assert {f"module.{k}" for k in BLOCK_KEYS} <= keys and "module.logit_bias" in keys
    assert not any("pooler" in k for k in keys)


def test_strict_load_reproduces_the_checkpoint(tiny_itemized: dict[str, Path], enc: ie.ItemizedClipEncoder) -> None:
    raw = _state(tiny_itemized)
    own = enc.model.state_dict()
    assert set(own) == {k.removeprefix("module.") for k in raw}
    for k, v in raw.items():
        torch.testing.assert_close(own[k.removeprefix("module.")], v, rtol=0, atol=0)
    digest = sha256_file(tiny_itemized["checkpoint"])
    assert enc.model_info.sha256 == digest and enc.model_info.model_id == f"itemizedclip-{digest[:12]}"
    assert "ct-rate-16" in enc.model_info.version and enc.model_info.library_hash
    assert enc.adjustments == ()


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_missing_extra_or_reshaped_key_is_refused(tiny_itemized: dict[str, Path], tmp_path: Path, change: str) -> None:
    sd = _state(tiny_itemized)
    if change == "missing":
        del sd["module.visual_attn.ln_k.bias"]
        expect = "visual_attn.ln_k.bias"
    elif change == "extra":
        sd["module.visual_attn.attn.bias_k"] = torch.zeros(1, 1, 32)
        expect = "visual_attn.attn.bias_k"
    else:
        sd["module.visual_attn.attn.in_proj_bias"] = torch.zeros(64)
        expect = "visual_attn.attn.in_proj_bias"
    bad = _save(sd, tmp_path / "bad.pt")
    with pytest.raises(ModelError) as err:
        ie.ItemizedClipEncoder(_config(tiny_itemized, checkpoint=bad))
    assert err.value.code == "checkpoint_layout"
    assert expect in str(err.value) and "ItemizedCLIP layout" in str(err.value)


def test_hlip_checkpoint_is_refused_with_a_hint(tiny_itemized: dict[str, Path], tmp_path: Path) -> None:
    sd = {k: v for k, v in _state(tiny_itemized).items() if "visual_attn" not in k and k != "module.logit_bias"}
    bad = _save(sd, tmp_path / "hlip.pt")
    with pytest.raises(ModelError) as err:
        ie.ItemizedClipEncoder(_config(tiny_itemized, checkpoint=bad))
    assert err.value.code == "checkpoint_layout" and "11 missing" in str(err.value) and "HLIP checkpoint" in str(err.value)


def test_itemized_checkpoint_is_refused_by_the_hlip_loader(bert_base_dir: Path, meta_build) -> None:  # type: ignore[no-untyped-def]
    itemized = meta_build(im.CHEST_MODEL, bert_base_dir)
    hlip = meta_build("vit_base_singlescan_h2_token2744", bert_base_dir, itemized=False)
    with pytest.raises(ModelError) as err:
        hm.load_strict(hlip, itemized.state_dict())
    assert "11 unexpected" in str(err.value)


def test_reader_tolerates_exactly_what_upstream_tolerates(tiny_itemized: dict[str, Path], tmp_path: Path) -> None:
    sd = _state(tiny_itemized)
    sd["module.text.transformer.embeddings.position_ids"] = torch.arange(96)[None]
    sd["module.logit_scale"] = sd["module.logit_scale"].reshape(1)
    sd["module.logit_bias"] = sd["module.logit_bias"].reshape(1)
    path = _save(sd, tmp_path / "old.pt")
    enc = ie.ItemizedClipEncoder(_config(tiny_itemized, checkpoint=path))
    assert len(enc.adjustments) == 3 and any("position_ids" in a for a in enc.adjustments)
    assert enc.model.logit_bias.shape == ()


def test_pickled_code_is_never_loaded(tiny_itemized: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _state(tiny_itemized), "hook": Path("/tmp")}, path)  # a non-weights object
    with pytest.raises(ModelError) as err:
        ie.ItemizedClipEncoder(_config(tiny_itemized, checkpoint=path))
    assert err.value.code == "checkpoint_unreadable"


def test_pinned_hash_mismatch_is_refused(tiny_itemized: dict[str, Path]) -> None:
    with pytest.raises(ModelError) as err:
        ie.ItemizedClipEncoder(_config(tiny_itemized, expected_sha256="0" * 64))
    assert err.value.code == "model_hash_mismatch"


def test_built_offline(tiny_itemized: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("network access while building the model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    enc = ie.ItemizedClipEncoder(_config(tiny_itemized))
    assert enc.text_features.shape == (16, 32)


def test_text_dir_without_config_is_refused(tiny_itemized: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "text"
    empty.mkdir()
    with pytest.raises(ModelError) as err:
        ie.ItemizedClipEncoder(_config(tiny_itemized, text_dir=empty))
    assert err.value.code == "text_tower_missing"


def test_hlip_config_is_not_an_itemizedclip_config(tmp_path: Path) -> None:
    text = write_text_dir(tmp_path / "t", {"x"})
    with pytest.raises(ModelError) as err:
        im.build_model("vit_base_singlescan_h2_token2744", text)
    assert err.value.code == "model_unknown"


# ------------------------------------------------------------------ outputs


def test_global_embedding_is_the_hlip_study_embedding(enc: ie.ItemizedClipEncoder) -> None:
    """The class token through head.proj equals HLIP's ``visual(x)`` (the shared tower, §2)."""
    x = torch.randn(1, 1, 1, *TINY_SPEC.img_size)
    with torch.no_grad():
        g, tokens = enc.model.encode_image(x)
        hlip_global = enc.model.visual(x)
    torch.testing.assert_close(g, hlip_global, atol=1e-6, rtol=1e-5)
    d, h, w = TINY_SPEC.grid_size
    assert tokens.shape == (1, d * h * w, 32)


def test_output_dict_matches_upstream(enc: ie.ItemizedClipEncoder) -> None:
    x = torch.randn(1, 1, 1, *TINY_SPEC.img_size)
    with torch.no_grad():
        out = enc.model(x, enc.tokenizer(["findings consistent with emphysema"]))
    assert set(out) == {"image_features", "text_features", "image_tokens", "logit_scale", "visual_proj", "logit_bias"}
    torch.testing.assert_close(out["logit_scale"], enc.model.logit_scale.exp())
    assert out["visual_proj"] is enc.model.visual_attn
    torch.testing.assert_close(out["text_features"][0], enc.text_features[0], atol=1e-6, rtol=1e-5)


def test_analyse_outputs_and_thresholds(enc: ie.ItemizedClipEncoder) -> None:
    from pipelines.models.study_encoder.preprocess import PreparedInput

    x = torch.randn(1, 1, 1, *TINY_SPEC.img_size)
    res = enc.analyse(PreparedInput(x, (0.0, 0.0, 0.0), (63.0, 47.0, 69.0), {}))
    assert [f.finding_id for f in res.findings] == load_item_prompt_set().ids
    for f in res.findings:
        assert -1.0 <= f.score <= 1.0 and 0.0 < f.null_weight < 1.0
        assert f.token_map.shape == TINY_SPEC.grid_size and f.token_map.dtype == np.float32
        assert f.embedding.shape == (32,) and abs(float(np.linalg.norm(f.embedding)) - 1) < 1e-5
        assert f.peak_weight == pytest.approx(float(f.token_map.max()))
    eff, emph, other = res.finding("pleural_effusion"), res.finding("emphysema"), res.finding("atelectasis")
    assert eff.threshold == 0.0 and eff.present is (eff.score > 0.0)
    assert emph.present is False and other.present is None and other.threshold is None
    assert res.prompt_set_version == "ct-rate-16/itemizedclip-ctrate-1" and "null slot" in res.map_rule
    # findings differ: each finding gets its own map and embedding
    assert not np.allclose(res.findings[0].token_map, res.findings[2].token_map)


def test_threshold_configuration_is_checked(tiny_itemized: dict[str, Path]) -> None:
    with pytest.raises(ModelError) as err:
        ie.ItemizedClipEncoder(_config(tiny_itemized, thresholds={"no_such_finding": 0.1}))
    assert err.value.code == "threshold_config"
    with pytest.raises(ModelError) as err:
        ie.ItemizedClipEncoder(_config(tiny_itemized, thresholds={"emphysema": 1.5}))
    assert err.value.code == "threshold_config"


def test_prompt_loader_refuses_other_protocols(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match="protocol"):
        load_item_prompt_set("ct_rate_hlip_v1")
    data = json.loads(Path(load_item_prompt_set.__code__.co_filename).with_name("ct_rate_itemizedclip_v1.json").read_text())
    data["templates"] = ["findings consistent with {}", "{} is present"]
    two = tmp_path / "two.json"
    two.write_text(json.dumps(data))
    with pytest.raises(PromptSetError, match="exactly one template"):
        load_item_prompt_set(two)
    data["templates"] = ["findings consistent with {}"]
    data["findings"].append(dict(data["findings"][0]))
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(data))
    with pytest.raises(PromptSetError, match="unique"):
        load_item_prompt_set(dup)
    assert len([f for f in load_item_prompt_set().findings if f.rad_chestct]) == 15


def test_encode_a_ct_volume_end_to_end(enc: ie.ItemizedClipEncoder) -> None:
    """Worker entry point: thorax selection + the HLIP chest preprocessing + one forward for every finding."""
    from pipelines.errors import InputError
    from tests.pipelines.study_encoder.phantoms import torso

    ct = torso(60, 5.0, -150.0, (-100.0, 100.0))
    ct.frame_of_reference_uid = "1.2.826.0.1.3680043.10.1"
    res = enc.encode(ct, body_part_examined="CHEST")
    assert len(res.findings) == 16 and res.grid.grid == TINY_SPEC.grid_size
    assert res.grid.frame_of_reference_uid == ct.frame_of_reference_uid
    assert "hlip_orientation_unvalidated" in {f.code for f in res.flags} and "chest field of view" in res.crop_description
    # every peak is inside the crop, in patient coordinates
    lo = res.grid.crop_affine[:3, 3]
    hi = (res.grid.crop_affine @ [63, 47, 23, 1.0])[:3]
    for f in res.findings:
        assert bool(np.all(np.array(f.peak_lps) >= lo - 1e-6) and np.all(np.array(f.peak_lps) <= hi + 1e-6))
    with pytest.raises(InputError) as err:
        enc.encode(torso(30, 5.0, 400.0, None))
    assert err.value.code == "ct_not_chest"


def test_maps_and_results_are_stored_compactly_and_read_back(enc: ie.ItemizedClipEncoder, tmp_path: Path) -> None:
    from pipelines.models.study_encoder.preprocess import PreparedInput

    x = torch.randn(1, 1, 1, *TINY_SPEC.img_size)
    res = enc.analyse(PreparedInput(x, (-10.0, 5.0, 20.0), (53.0, 52.0, 89.0), {}), frame_of_reference_uid="1.2.3")
    data = json.loads(json.dumps(res.to_json()))
    assert [f["finding_id"] for f in data["findings"]] == [f.finding_id for f in res.findings]
    assert data["model"]["sha256"] == enc.model_info.sha256 and data["grid"]["grid_dhw"] == list(TINY_SPEC.grid_size)
    path = res.save_maps(tmp_path / "maps.npz")
    stored = ie.load_maps(path)
    assert stored.finding_ids == tuple(f.finding_id for f in res.findings) and stored.model_id == enc.model_info.model_id
    np.testing.assert_allclose(stored.maps, np.stack([f.token_map for f in res.findings]), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(stored.null_weight, [f.null_weight for f in res.findings], rtol=1e-3)
    np.testing.assert_allclose(stored.grid.affine, res.grid.affine)
    assert stored.grid.frame_of_reference_uid == "1.2.3"
    for k, f in enumerate(res.findings):
        assert stored.grid.peak(stored.maps[k])[0] == f.peak_dhw or np.isclose(
            stored.maps[k].max(), stored.maps[k][f.peak_dhw], rtol=1e-3)  # float16 ties only
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError) as err:
        ie.load_maps(tmp_path / "bad.npz")
    assert err.value.code == "maps_unreadable"
