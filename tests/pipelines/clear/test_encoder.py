"""Slice encoder: offline build, registry entry with preprocessing, weights-only strict loading, float16 output."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.errors import ModelError
from pipelines.models.clear.encoder import (
    ClearEncoderSpec,
    build_backbone,
    load_encoder,
    save_encoder_checkpoint,
)
from pipelines.models.clear.slices import SliceGrid, SlicePreprocessing, SliceStack
from pipelines.models.clear.store import SliceFeatures
from pipelines.models.registry import PinnedFile

PRE = SlicePreprocessing(size=32, z_spacing_mm=5.0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, torch.nn.Module]:
    torch.manual_seed(0)
    net, dim = build_backbone("resnet18")
    assert dim == 512
    with torch.no_grad():  # zero_init_residual leaves many zeros; make the weights distinctive
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    digest = save_encoder_checkpoint(path, net, "resnet18", PRE, trained_on="unit-test")
    return path, digest, net.eval()


def _stack(n: int = 3) -> SliceStack:
    rng = np.random.default_rng(0)
    grid = SliceGrid(0.0, 0.0, -10.0, 1.0, 5.0, 32, n)
    return SliceStack(rng.random((n, 3, 32, 32), dtype=np.float32), grid, grid.z_of(np.arange(n)),
                      np.arange(n, dtype=np.int32), False, "1.2", "1.2.3", "", PRE)  # fmt: skip


def test_backbone_is_built_offline_with_512d_output() -> None:
    net, dim = build_backbone("resnet18")
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, dim)
    with pytest.raises(ModelError):
        build_backbone("vit_huge_from_the_internet")


def test_registry_entry_round_trips_through_json(saved, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, digest, _ = saved
    spec = ClearEncoderSpec("clear-enc-1", "resnet18", PinnedFile(str(path), digest), PRE)
    back = ClearEncoderSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec and back.preprocessing == PRE
    info = spec.model_info()
    assert info.model_id == "clear-enc-1" and info.sha256 == digest and "resnet18" in info.version


def test_load_and_encode_matches_the_saved_network(saved) -> None:  # type: ignore[no-untyped-def]
    path, digest, net = saved
    enc = load_encoder(ClearEncoderSpec("clear-enc-1", "resnet18", PinnedFile(str(path), digest), PRE))
    stack = _stack()
    feats = enc.encode(stack, batch_size=2)
    assert isinstance(feats, SliceFeatures) and feats.features.dtype == np.float16 and feats.features.shape == (3, 512)
    assert feats.model_id == "clear-enc-1"
    np.testing.assert_array_equal(feats.z_mm, stack.z_mm.astype(np.float32))
    x = (torch.from_numpy(stack.images) - 0.5) / 0.25
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(feats.features.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def test_hash_preprocessing_and_arch_mismatches_are_refused(saved, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, digest, _ = saved
    with pytest.raises(ModelError) as e1:
        load_encoder(ClearEncoderSpec("m", "resnet18", PinnedFile(str(path), "0" * 64), PRE))
    assert e1.value.code == "model_hash_mismatch"
    with pytest.raises(ModelError) as e2:
        load_encoder(ClearEncoderSpec("m", "resnet18", PinnedFile(str(path), digest), SlicePreprocessing(size=64)))
    assert e2.value.code == "preprocessing_mismatch"
    with pytest.raises(ModelError) as e3:
        load_encoder(ClearEncoderSpec("m", "resnet34", PinnedFile(str(path), digest), PRE))
    assert e3.value.code == "checkpoint_layout"
    enc = load_encoder(ClearEncoderSpec("m", "resnet18", PinnedFile(str(path), digest), PRE))
    other = SliceStack(**{**_stack().__dict__, "preprocessing": SlicePreprocessing(size=32, z_spacing_mm=3.0)})
    with pytest.raises(ModelError):
        enc.encode(other)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"format": "locus-clear-encoder-1", "x": _Evil()}))
    with pytest.raises(ModelError) as exc:
        load_encoder(ClearEncoderSpec("m", "resnet18", PinnedFile(str(p)), PRE))
    assert exc.value.code == "checkpoint_unreadable"




def test_manifest_hook_reads_clear_encoders(saved, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pipelines.models.clear.encoder import encoders_from_manifest

    path, digest, _ = saved
    spec = ClearEncoderSpec("clear-enc-1", "resnet18", PinnedFile(str(path), digest), PRE)
    manifest = tmp_path / "models.json"
    manifest.write_text(json.dumps({"models": [], "clear_encoders": [spec.to_json()]}), encoding="utf-8")
    assert encoders_from_manifest(manifest) == {"clear-enc-1": spec}
    other = {**spec.to_json(), "arch": "resnet34"}
    manifest.write_text(json.dumps({"clear_encoders": [spec.to_json(), other]}), encoding="utf-8")
    with pytest.raises(ModelError):
        encoders_from_manifest(manifest)
