"""Localizer start-up: the verified text-feature cache, and model ids from the weights content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.models.checkpoints import load_checkpoint, state_dict_sha256
from pipelines.models.localizer import Localizer
from pipelines.models.text import encode_texts, load_text_tower
from pipelines.models.text_cache import TextFeatureCache

from . import factory as F


def _tower(seed: int) -> torch.nn.Module:
    state = F.make_state(seed=seed, crop_size=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
    sd = {k.removeprefix("module.text_encoder."): v for k, v in state["state_dict"].items()
          if k.startswith("module.text_encoder.")}
    return load_text_tower(sd)


def _tokens(n: int = 5, context: int = 77) -> torch.Tensor:
    from pipelines.models.text import ClipTokenizer

    return ClipTokenizer(context).tokenize([f"lesion in region number {i}" for i in range(n)])


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    return _tower(21)


def test_cold_then_warm_gives_the_same_bytes(tower: torch.nn.Module, tmp_path: Path) -> None:
    tokens = _tokens()
    fresh = encode_texts(tower, tokens)
    cache = TextFeatureCache(tmp_path)
    said: list[str] = []
    cold = cache.features(tower, tokens, what="5 test texts", progress=said.append)
    assert cache.last is not None and not cache.last.hit and cache.last.reason == "absent"
    assert said and "encoding 5 test texts" in said[0] and str(tmp_path) in said[0]  # a cold start says so
    warm = TextFeatureCache(tmp_path).features(tower, tokens, progress=said.append)
    assert torch.equal(cold, fresh) and torch.equal(warm, fresh) and warm.dtype == torch.float32
    assert len(said) == 1  # the warm start encoded nothing
    # the entry is two plain arrays and a JSON key: no pickle anywhere
    npz = next(tmp_path.glob("*.npz"))
    with np.load(npz, allow_pickle=False) as data:
        assert sorted(data.files) == ["features", "token_ids"]
    key = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert key["tower_sha256"] and key["token_ids_sha256"] and key["features_sha256"]


def test_other_texts_or_weights_are_not_served_from_the_cache(tower: torch.nn.Module, tmp_path: Path) -> None:
    cache = TextFeatureCache(tmp_path)
    cache.features(tower, _tokens(5))
    other_texts = cache.features(tower, _tokens(6))
    assert not cache.last.hit and torch.equal(other_texts, encode_texts(tower, _tokens(6)))
    other_tower = _tower(22)
    got = cache.features(other_tower, _tokens(5))
    assert not cache.last.hit and torch.equal(got, encode_texts(other_tower, _tokens(5)))
    cache.features(tower, _tokens(5))
    assert cache.last.hit


def test_a_tampered_entry_is_rebuilt(tower: torch.nn.Module, tmp_path: Path) -> None:
    tokens = _tokens()
    cache = TextFeatureCache(tmp_path)
    expected = cache.features(tower, tokens)
    npz = next(tmp_path.glob("*.npz"))
    with np.load(npz, allow_pickle=False) as data:
        feats, ids = np.array(data["features"]), np.array(data["token_ids"])
    feats[0, 0] += 1.0
    np.savez(npz, features=feats, token_ids=ids)
    got = cache.features(tower, tokens)
    assert not cache.last.hit and cache.last.reason == "stale (checksum)"
    assert torch.equal(got, expected)
    assert cache.features(tower, tokens) is not None and cache.last.hit  # rewritten correctly

    meta = next(tmp_path.glob("*.json"))
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "tower_sha256": "0" * 64}))
    cache.features(tower, tokens)
    assert not cache.last.hit and cache.last.reason == "stale (key differs)"

    npz.write_bytes(b"not an npz")
    assert torch.equal(cache.features(tower, tokens), expected)
    assert not cache.last.hit and cache.last.reason.startswith("unreadable")


def test_unwritable_cache_directory_is_not_an_error(tower: torch.nn.Module, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    got = TextFeatureCache(blocker / "cache").features(tower, _tokens())
    assert torch.equal(got, encode_texts(tower, _tokens()))


def test_localizer_with_cache_has_identical_text_embeddings(model_dir: Path, vocab_paths, tmp_path: Path) -> None:
    plain = Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths)
    cold = Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths,
                          text_cache=TextFeatureCache(tmp_path))
    cache = TextFeatureCache(tmp_path)
    warm = Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, text_cache=cache)
    assert cache.last is not None and cache.last.hit
    for loc in (cold, warm):
        assert torch.equal(loc.coarse.text_emb, plain.coarse.text_emb)
        assert torch.equal(loc.fine.text_emb, plain.fine.text_emb)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # one entry per stage


def test_plain_and_encrypted_copies_are_one_model(model_dir: Path, vocab_paths) -> None:
    plain_ckpt = load_checkpoint(model_dir / "fine" / "params.pth")
    enc_ckpt = load_checkpoint(model_dir / "fine_enc" / "params.pth")
    assert plain_ckpt.sha256 != enc_ckpt.sha256  # the files differ
    assert plain_ckpt.content_sha256 == enc_ckpt.content_sha256 == state_dict_sha256(plain_ckpt.state_dict)
    plain = Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths)
    enc = Localizer.load(model_dir / "coarse", model_dir / "fine_enc", *vocab_paths)
    assert plain.model_info.model_id == enc.model_info.model_id
    assert plain.model_info.sha256 == enc.model_info.sha256
    # the registry still pins the files as stored
    assert plain.spec.fine.sha256 != enc.spec.fine.sha256


def test_state_dict_hash_sees_names_dtypes_shapes_and_values() -> None:
    sd = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor(3)}
    base = state_dict_sha256(sd)
    assert state_dict_sha256(dict(reversed(list(sd.items())))) == base  # order of insertion does not matter
    assert state_dict_sha256({**sd, "a": sd["a"].reshape(3, 2)}) != base
    assert state_dict_sha256({**sd, "a": sd["a"].double()}) != base
    assert state_dict_sha256({"c": sd["a"], "b": sd["b"]}) != base
    changed = sd["a"].clone()
    changed[1, 2] += 1
    assert state_dict_sha256({**sd, "a": changed}) != base
    assert state_dict_sha256({**sd, "a": sd["a"].t().contiguous().t()}) == base  # layout is not content


def _count_text_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from open_clip.transformer import TextTransformer

    calls: list[int] = []
    original = TextTransformer.forward

    def counting(self: TextTransformer, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TextTransformer, "forward", counting)
    return calls


def test_warm_localizer_start_does_not_run_the_text_encoder(
    model_dir: Path, vocab_paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_text_forwards(monkeypatch)
    Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, text_cache=TextFeatureCache(tmp_path))
    assert calls  # cold: both towers encode their texts
    calls.clear()
    cache = TextFeatureCache(tmp_path)
    Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, text_cache=cache)
    assert cache.last is not None and cache.last.hit
    assert calls == []


def test_changed_text_tower_weights_in_a_checkpoint_rebuild_the_cache(
    model_dir: Path, vocab_paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm key comes from the checkpoint's content hash; one changed tower tensor must miss."""
    cache_dir = tmp_path / "cache"
    Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, text_cache=TextFeatureCache(cache_dir))
    state = torch.load(model_dir / "fine" / "params.pth", map_location="cpu", weights_only=True)
    name = next(k for k in state["state_dict"] if k.endswith("text_encoder.token_embedding.weight"))
    state["state_dict"][name] = state["state_dict"][name].clone()
    state["state_dict"][name][5, 0] += 0.25
    tuned = tmp_path / "tuned" / "params.pth"
    tuned.parent.mkdir()
    torch.save(state, tuned)
    calls = _count_text_forwards(monkeypatch)
    cache = TextFeatureCache(cache_dir)
    loc = Localizer.load(model_dir / "coarse", tuned, *vocab_paths, text_cache=cache)
    assert cache.last is not None and not cache.last.hit and cache.last.reason == "absent"
    assert calls  # the fine texts were encoded again with the changed tower
    fresh = Localizer.load(model_dir / "coarse", tuned, *vocab_paths)
    assert torch.equal(loc.fine.text_emb, fresh.fine.text_emb)
    assert len(list(cache_dir.glob("*.npz"))) == 3
