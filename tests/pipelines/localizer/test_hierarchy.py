"""Vocabulary parsing and the reference coarse → fine decision rules (§9, §10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.errors import ModelError
from pipelines.models.localizer import hierarchy as H
from pipelines.models.localizer.vocabulary import Vocabulary

from . import factory as F


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    v, d = F.synthetic_vocabulary()
    return Vocabulary.from_objects(v, d)


def test_vocabulary_structure(vocab: Vocabulary, vocab_paths: tuple[Path, Path]) -> None:
    assert vocab.coarse_keys[:3] == ("Left lung", "Right lung", "Mediastinum")  # file order
    assert vocab.parents["Rib"] == ("Rib L3", "Rib R3")
    assert vocab.parents["Aorta"] == ("Mediastinum", "Retroperitoneum")
    assert vocab.final("Retroperitoneum", "Aorta") == "Abdominal aorta"
    assert vocab.orphans == ("Lung",)
    assert vocab.counts()["pairs"] == 19 and not vocab.matches_published_counts()
    loaded = Vocabulary.load(*vocab_paths)
    assert loaded.coarse_keys == vocab.coarse_keys and len(loaded.vocabulary_sha256) == 64
    assert loaded.library_hash != vocab.library_hash  # hashes recorded only for files


def test_vocabulary_rejects_missing_or_duplicate_descriptions(tmp_path: Path) -> None:
    v, d = F.synthetic_vocabulary()
    with pytest.raises(ModelError):
        Vocabulary.from_objects(v, {k: s for k, s in d.items() if k != "Rib"})
    dup = dict(d)
    dup["Spleen"] = dup["Liver"]
    with pytest.raises(ModelError):
        Vocabulary.from_objects(v, dup)
    bad = tmp_path / "v.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError):
        Vocabulary.load(bad, bad)


def test_coarse_ranking_drops_exact_zeros_and_keeps_topk(vocab: Vocabulary) -> None:
    keys = vocab.coarse_keys
    cos = torch.full((len(keys),), -0.5)
    cos[keys.index("Liver")] = 0.6
    cos[keys.index("Spleen")] = 0.58
    cos[keys.index("Rib L3")] = -0.45  # 1.05 below the best: underflows to exactly 0 at scale 100
    p = H.scaled_softmax(cos)
    assert float(p[keys.index("Rib L3")]) == 0.0
    r = H.rank_coarse(p, keys, topk=3)
    assert r.labels == ("Liver", "Spleen")  # only two nonzero probabilities
    assert r.probs[0] > r.probs[1] > 0
    assert H.rank_coarse(p, keys, topk=1).labels == ("Liver",)


def test_shared_fine_words_attach_to_highest_ranked_parent(vocab: Vocabulary) -> None:
    coarse = H.CoarseResult(("Rib R3", "Vertebra T5", "Rib L3"), (0.5, 0.3, 0.2))
    cands = H.fine_candidates(coarse, vocab)
    assert cands.words == ("Rib", "Thoracic spine", "Spinous process")  # "Rib" once, from Rib R3
    assert cands.parents == ("Rib R3", "Vertebra T5", "Vertebra T5")
    res = H.decide_fine(cands, [0.7, 0.2, 0.1], coarse, vocab, (20.0, 20.0, 20.0))
    assert res.labels == ("Rib", "Thoracic spine", "Spinous process")
    assert res.to_coarse == ("Rib R3", "Vertebra T5", "Vertebra T5")
    assert res.pred == "Right rib 3" and not res.large_lesion
    # a fine word mapped through the probability-sorted parent list
    coarse2 = H.CoarseResult(("Vertebra T4", "Vertebra T5"), (0.6, 0.4))
    c2 = H.fine_candidates(coarse2, vocab)
    res2 = H.decide_fine(c2, [0.1, 0.9], coarse2, vocab, (10.0, 10.0, 10.0))
    assert res2.pred == "Spinous process of vertebra T4"


def test_large_lesion_rule_uses_smallest_side(vocab: Vocabulary) -> None:
    coarse = H.CoarseResult(("Liver", "Spleen"), (0.9, 0.1))
    cands = H.fine_candidates(coarse, vocab)
    probs = [0.05, 0.8, 0.1, 0.05]
    assert H.decide_fine(cands, probs, coarse, vocab, (150.0, 120.0, 100.0)).pred == "Liver S7"  # min = 100: not > 100
    big = H.decide_fine(cands, probs, coarse, vocab, (150.0, 120.0, 100.5))
    assert big.large_lesion and big.pred == "Liver"  # a coarse key (B9)


def test_zero_fine_probabilities_dropped_and_fusion_off_by_default(vocab: Vocabulary) -> None:
    coarse = H.CoarseResult(("Liver", "Spleen"), (0.9, 0.1))
    cands = H.fine_candidates(coarse, vocab)
    res = H.decide_fine(cands, [0.0, 0.6, 0.4, 0.0], coarse, vocab, (10.0, 10.0, 10.0))
    assert res.labels == ("Liver S7", "Around the liver") and res.probs == (0.6, 0.4)
    fused = H.decide_fine(cands, [0.1, 0.2, 0.3, 0.4], coarse, vocab, (10.0, 10.0, 10.0), fuse_coarse_threshold=0.5)
    assert fused.labels[0] == "Around the liver"
    assert fused.probs[0] == pytest.approx(0.5 * 0.9 + 0.5 * 0.3)


def test_vocabulary_json_key_order_is_preserved(tmp_path: Path) -> None:
    v, d = F.synthetic_vocabulary()
    reordered = dict(reversed(list(v.items())))
    (tmp_path / "v.json").write_text(json.dumps(reordered), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(d), encoding="utf-8")
    assert Vocabulary.load(tmp_path / "v.json", tmp_path / "d.json").regions == tuple(reordered)
