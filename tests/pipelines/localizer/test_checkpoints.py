"""Checkpoint reading: published dict layout, strict loading, uAI_model decryption, safety."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import pytest
import torch

from pipelines.errors import ModelError
from pipelines.models.checkpoints import decrypt_uai, load_checkpoint, strip_module_prefix
from pipelines.models.localizer.network import HclalClipNet, build_network, load_strict
from pipelines.models.text import TextTowerConfig

from . import factory as F


def test_plain_checkpoint_loads_strictly_with_metadata(model_dir: Path) -> None:
    ckpt = load_checkpoint(model_dir / "coarse")  # directory → params.pth, like the reference
    assert ckpt.net == "ClipText_ResidualNet" and not ckpt.encrypted
    # logit_scale + 100 image keys + 5 + 12 per layer text keys (2 small layers here; 12 → 250 keys)
    assert len(ckpt.state_dict) == 1 + 100 + 5 + 12 * 2
    assert not any(k.startswith("module.") for k in ckpt.state_dict)
    assert sum(k.startswith("image_encoder.") for k in ckpt.state_dict) == 100
    assert sum(k.startswith("text_encoder.") for k in ckpt.state_dict) == 5 + 12 * 2
    pre = ckpt.preprocessing
    assert pre.crop_size == (32, 32, 48) and pre.spacing == (4.0, 4.0, 6.0)
    assert pre.interpolation == ("linear", "linear", "nn") and pre.lesion_idx == (2,)
    assert [(n.mean, n.stddev, n.clip) for n in pre.normalizers] == [(40, 200, True), (3, 3, False), (0, 1, False)]
    net = build_network(ckpt)
    sd = net.state_dict()
    assert set(sd) == set(ckpt.state_dict)
    for k, v in ckpt.state_dict.items():
        assert torch.equal(sd[k], v), k
    assert net.text_encoder.heads == 1 and net.text_encoder.width == 64


def test_encrypted_checkpoint_decrypts_to_identical_bytes(model_dir: Path) -> None:
    plain = (model_dir / "fine" / "params.pth").read_bytes()
    enc = (model_dir / "fine_enc" / "params.pth").read_bytes()
    assert enc[:9] == b"uAI_model" and len(enc) > 1.3 * len(plain)
    assert decrypt_uai(enc) == plain
    a, b = load_checkpoint(model_dir / "fine"), load_checkpoint(model_dir / "fine_enc")
    assert b.encrypted and b.sha256 != a.sha256
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_cfb128_encryption_is_rejected(tmp_path: Path) -> None:
    payload = F.torch_bytes({"net": "ClipText_ResidualNet", "x": torch.arange(1000)})
    bad = F.encrypt_uai(payload, F.UAI_KEY, segment_size=128)
    assert F.encrypt_uai(payload, F.UAI_KEY) != bad
    with pytest.raises(ModelError) as err:
        decrypt_uai(bad)
    assert err.value.code == "checkpoint_decrypt_failed"
    path = tmp_path / "params.pth"
    path.write_bytes(bad)
    with pytest.raises(ModelError):
        load_checkpoint(path)


def test_wrong_key_is_rejected() -> None:
    enc = F.encrypt_uai(b"some torch bytes", F.UAI_KEY)
    assert decrypt_uai(enc, F.UAI_KEY) == b"some torch bytes"
    with pytest.raises(ModelError):
        decrypt_uai(enc, b"0123456789abcdef")


def test_module_prefix_handling() -> None:
    t = torch.zeros(1)
    assert strip_module_prefix({"module.a": t, "module.b.c": t}).keys() == {"a", "b.c"}
    assert strip_module_prefix({"a": t}).keys() == {"a"}  # single-GPU save: unchanged
    with pytest.raises(ModelError):
        strip_module_prefix({"module.a": t, "b": t})


def test_unprefixed_checkpoint_loads(tmp_path: Path) -> None:
    F.write_checkpoint(tmp_path / "params.pth", F.make_state(prefix="", seed=3))
    build_network(load_checkpoint(tmp_path / "params.pth"))


def test_weights_only_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("executed",))

    path = tmp_path / "params.pth"
    buf = io.BytesIO()
    torch.save({"net": "ClipText_ResidualNet", "state_dict": {}, "evil": Evil()}, buf, pickle_module=pickle)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    assert err.value.code == "checkpoint_unreadable"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"net": "ClipText_ViT"}, "checkpoint_net_unsupported"),
        ({"crop_normalizers": [{"type": 1, "mean": 0, "stddev": 1, "clip": False}] * 3}, "checkpoint_normalizer_unsupported"),
        ({"crop_size": [32, 32, 40]}, "checkpoint_metadata"),
        ({"interpolation": ["linear", "cubic", "nn"]}, "checkpoint_metadata"),
        ({"sample_method": "mixed"}, "checkpoint_metadata"),
    ],
)
def test_bad_metadata_is_a_model_error(tmp_path: Path, change: dict, code: str) -> None:
    state = F.make_state(seed=4)
    state.update(change)
    F.write_checkpoint(tmp_path / "params.pth", state)
    with pytest.raises(ModelError) as err:
        build_network(load_checkpoint(tmp_path / "params.pth"))
    assert err.value.code == code


def test_missing_or_renamed_tensor_fails_strict_load(tmp_path: Path) -> None:
    state = F.make_state(seed=5)
    sd = state["state_dict"]
    sd["module.image_encoder.down_64.rblock.ops.1.0.weightX"] = sd.pop("module.image_encoder.down_64.rblock.ops.1.0.weight")
    F.write_checkpoint(tmp_path / "params.pth", state)
    with pytest.raises(ModelError) as err:
        build_network(load_checkpoint(tmp_path / "params.pth"))
    assert err.value.code == "checkpoint_layout"


def test_crop_size_mismatch_with_fc_fails(tmp_path: Path) -> None:
    state = F.make_state(seed=6)
    state["crop_size"] = [32, 32, 32]  # fc was built for 32x32x48
    F.write_checkpoint(tmp_path / "params.pth", state)
    with pytest.raises(ModelError):
        build_network(load_checkpoint(tmp_path / "params.pth"))


@pytest.mark.parametrize("net", ["ClipText_BasicNet", "ClipText_BasicNet_SemiHardNegSample", "ClipText_Fc_BasicNet"])
def test_basicnet_family_loads(tmp_path: Path, net: str) -> None:
    F.write_checkpoint(tmp_path / "params.pth", F.make_state(net=net, seed=7))
    model = build_network(load_checkpoint(tmp_path / "params.pth"))
    assert (model.text_fc is not None) == (net == "ClipText_Fc_BasicNet")
    out = model.encode_image(torch.zeros(2, 3, 32, 32, 48))
    assert out.shape == (2, 64)


@pytest.mark.parametrize(
    ("crop", "total", "image", "fc"),
    [((96, 96, 128), 108_416_577, 44_988_480, 37_749_248), ((64, 64, 64), 79_056_449, 15_628_352, 8_389_120)],
)
def test_full_size_published_layout(crop: tuple[int, int, int], total: int, image: int, fc: int) -> None:
    """Full-size coarse/fine dicts (shapes only, on the meta device) load strictly; counts match §6/§12."""
    layout = F.expected_layout("ClipText_ResidualNet", crop)
    assert len(layout) == 250
    assert sum(k.startswith("image_encoder.") for k in layout) == 100
    assert sum(k.startswith("text_encoder.") for k in layout) == 149
    assert F.parameter_count(layout) == total
    assert F.parameter_count({k: v for k, v in layout.items() if k.startswith("image_encoder.")}) == image
    assert F.parameter_count({k: v for k, v in layout.items() if k.startswith("image_encoder.fc.")}) == fc
    sd = {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("tracked") else torch.float32)
          for k, s in layout.items()}  # fmt: skip
    cfg = TextTowerConfig.from_state_dict({k[13:]: v for k, v in sd.items() if k.startswith("text_encoder.")})
    assert cfg == TextTowerConfig(width=512, layers=12, heads=8, context_length=77, vocab_size=49408, output_dim=512)
    with torch.device("meta"):
        model = HclalClipNet("ClipText_ResidualNet", 3, crop, cfg)
    assert sum(p.numel() for p in model.parameters()) == total
    load_strict(model, sd)  # meta tensors: shape/name check without 430 MB of memory


def test_network_built_without_random_init_matches_a_conventional_build(model_dir: Path) -> None:
    """build_network builds on ``meta`` and assigns the checkpoint's tensors: same values, nothing left unset."""
    ckpt = load_checkpoint(model_dir / "fine")
    net = build_network(ckpt)
    assert not any(t.is_meta for t in (*net.parameters(), *net.buffers()))
    # the causal mask is not in the state dict: rebuilt as open_clip builds it
    conventional = HclalClipNet(ckpt.net, 3, ckpt.preprocessing.crop_size,
                                TextTowerConfig.from_state_dict(
                                    {k.removeprefix("text_encoder."): v for k, v in ckpt.state_dict.items()
                                     if k.startswith("text_encoder.")}),
                                num_features=int(ckpt.state_dict["image_encoder.fc.weight"].shape[0]))  # fmt: skip
    load_strict(conventional, ckpt.state_dict)
    assert torch.equal(net.text_encoder.attn_mask, conventional.text_encoder.attn_mask)
    for (name, a), (_, b) in zip(net.state_dict().items(), conventional.eval().state_dict().items()):
        assert a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b), name
    tokens = torch.randint(1, 400, (2, net.context_length))
    with torch.inference_mode():
        assert torch.equal(net.text_encoder(tokens), conventional.text_encoder(tokens))
    # by default the network owns its weights (training it leaves the checkpoint as read) ...
    key = "image_encoder.fc.weight"
    assert net.state_dict()[key].data_ptr() != ckpt.state_dict[key].data_ptr()
    # ... while share_weights=True (inference) uses the checkpoint's tensors without a copy
    shared = build_network(ckpt, share_weights=True)
    assert shared.state_dict()[key].data_ptr() == ckpt.state_dict[key].data_ptr()


def test_half_precision_weights_load_as_float32(model_dir: Path) -> None:
    """Assigning tensors must not change the network's dtype (copy_ used to cast)."""
    ckpt = load_checkpoint(model_dir / "fine")
    half = dataclasses.replace(ckpt, state_dict={k: v.half() if v.is_floating_point() else v
                                                 for k, v in ckpt.state_dict.items()})  # fmt: skip
    net = build_network(half)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert torch.equal(net.state_dict()["logit_scale"], ckpt.state_dict["logit_scale"].half().float())
