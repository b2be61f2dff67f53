"""HCL-AL batch samplers: distinct coarse words, region weighting, related fine pairs, T2 positives."""

from __future__ import annotations

from collections import Counter

import numpy as np

from pipelines.models.localizer.vocabulary import Vocabulary
from tests.training.conftest import fake_bank
from training.localizer.samplers import REGION_WEIGHTS, CoarseSampler, FineSampler

FINALS = ["Left upper lobe", "Right lower lobe", "Mediastinum 4R", "Thoracic aorta", "Liver S1", "Liver S7",
          "Abdominal aorta", "Spleen", "Vertebra T4", "Vertebra T5", "Left rib 3", "Right rib 3"]


def test_coarse_batches_hold_distinct_words_with_matching_lesions(vocab: Vocabulary) -> None:
    bank = fake_bank(FINALS * 2)
    sampler = CoarseSampler(bank, vocab, batch_size=6)
    rng = np.random.default_rng(0)
    for _ in range(50):
        b = sampler.sample(rng)
        assert len(set(b.words)) == len(b.words) == 6
        assert b.positives.diagonal().all() and int(b.positives.sum()) == 6
        for lesion, word in zip(b.lesions, b.words):
            assert word in sampler.gt[lesion]


def test_coarse_regions_drawn_by_weight(vocab: Vocabulary) -> None:
    """With a batch of 2, the first drawn region decides the batch: frequencies follow the weights."""
    bank = fake_bank(FINALS)
    sampler = CoarseSampler(bank, vocab, batch_size=2)
    rng = np.random.default_rng(1)
    first = Counter(vocab.region_of[sampler.sample(rng).words[0]] for _ in range(3000))
    w = {r: REGION_WEIGHTS[r] for r in ("Chest", "Abdomen", "Axial skeleton")}
    for r in w:
        assert abs(first[r] / 3000 - w[r] / sum(w.values())) < 0.05


def test_fine_batches_mix_related_pairs_and_mark_shared_texts(vocab: Vocabulary) -> None:
    bank = fake_bank(FINALS * 2)
    # stage 1 ranked the Vertebra T4 lesions under T5 and both rib lesions under the other side
    labels = {i: ["Vertebra T4", "Vertebra T5", "Rib L3", "Rib R3"] for i, it in enumerate(bank.items)
              if it.record.hclal_locations[0] in ("Vertebra T4", "Left rib 3")}
    sampler = FineSampler(bank, vocab, batch_size=8, coarse_labels=labels)
    assert ("Vertebra T5", "Thoracic spine") in sampler.related[FINALS.index("Vertebra T4")]
    rng = np.random.default_rng(2)
    saw_shared = False
    for _ in range(100):
        b = sampler.sample(rng)
        pairs = list(zip(b.words, b.lesions))
        assert len(set(zip([sampler.gt_pairs[i][0] for i in b.lesions], b.words))) == len(b.words)  # distinct pairs
        for i, (_w, lesion) in enumerate(pairs):
            for j, (w2, _) in enumerate(pairs):
                assert bool(b.positives[i, j]) == (w2 in sampler.gt_words[lesion])
        if b.words.count("Rib") >= 2 or b.words.count("Thoracic spine") >= 2:
            saw_shared = True
            k = [i for i, w in enumerate(b.words) if w in ("Rib", "Thoracic spine")]
            assert any(b.positives[i, j] for i in k for j in k if i != j)  # T2: same text = positive
    assert saw_shared
