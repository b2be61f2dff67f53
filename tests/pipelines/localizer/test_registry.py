"""Model registry: every result names the exact files (hashes) and preprocessing that produced it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipelines.errors import ModelError
from pipelines.models.localizer import Localizer
from pipelines.models.registry import LocalizerSpec, ModelRegistry, PinnedFile


def test_spec_records_hashes_preprocessing_and_model_info(localizers, model_dir: Path, vocab_paths) -> None:
    loc = localizers["corrected"]
    spec = loc.spec
    assert spec.coarse.sha256 == hashlib.sha256((model_dir / "coarse" / "params.pth").read_bytes()).hexdigest()
    assert spec.vocabulary.sha256 == hashlib.sha256(vocab_paths[0].read_bytes()).hexdigest()
    assert spec.nets == ("ClipText_ResidualNet", "ClipText_ResidualNet")
    assert spec.preprocessing["coarse"]["crop_size"] == [32, 32, 48]
    assert spec.preprocessing["fine"]["crop_normalizers"][0] == {"type": 0, "mean": 40, "stddev": 200, "clip": True}
    info = loc.model_info
    assert info.model_id == spec.model_id and spec.model_id.startswith("hclal-")
    assert info.sha256 == spec.weights_sha256 and len(info.sha256) == 64
    assert info.library_hash == spec.library_sha256 == loc.vocab.library_hash
    assert "ClipText_ResidualNet" in info.version


def test_registry_round_trip_and_pinned_hash_check(localizers, model_dir: Path, vocab_paths, tmp_path: Path) -> None:
    spec = localizers["corrected"].spec
    reg = ModelRegistry([spec])
    reg.to_file(tmp_path / "models.json")
    again = ModelRegistry.from_file(tmp_path / "models.json")
    assert again.get(spec.model_id) == spec and len(again) == 1
    with pytest.raises(ModelError):
        again.get("nope")
    assert PinnedFile(spec.coarse.path, spec.coarse.sha256).verify().sha256 == spec.coarse.sha256
    with pytest.raises(ModelError) as err:
        PinnedFile(spec.coarse.path, "0" * 64).verify()
    assert err.value.code == "model_hash_mismatch"

    wrong = LocalizerSpec.from_json({**spec.to_json(), "fine": {"path": spec.fine.path, "sha256": "f" * 64}})
    with pytest.raises(ModelError) as err:
        Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, expected=wrong)
    assert err.value.code == "model_hash_mismatch"
    ok = Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, expected=spec)
    assert ok.model_info == localizers["corrected"].model_info
