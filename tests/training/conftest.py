"""Shared small fixtures for training tests: a synthetic vocabulary and a fake crop bank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.models.localizer.vocabulary import Vocabulary
from tests.pipelines.localizer.factory import synthetic_vocabulary
from training.data.records import LesionRecord
from training.localizer.samples import CropBank, LesionItem


@pytest.fixture()
def vocab() -> Vocabulary:
    v, d = synthetic_vocabulary()
    return Vocabulary.from_objects(v, d)


@pytest.fixture()
def vocab_files(tmp_path: Path) -> tuple[Path, Path]:
    v, d = synthetic_vocabulary()
    pv, pd = tmp_path / "anatomy_vocabulary_library.json", tmp_path / "augmented_location_descriptions.json"
    pv.write_text(json.dumps(v), encoding="utf-8")
    pd.write_text(json.dumps(d), encoding="utf-8")
    return pv, pd


def fake_bank(finals: list[str], crop: tuple[int, int, int] = (16, 16, 16), crops: int = 2, seed: int = 0,
              separable: bool = True) -> CropBank:
    """One lesion per final string; with ``separable`` each final gets its own input pattern."""
    gen = torch.Generator().manual_seed(seed)
    items, xs = [], []
    patterns: dict[str, torch.Tensor] = {}
    for i, f in enumerate(finals):
        items.append(LesionItem("s", LesionRecord(f"l{i}", i + 1, (), (f,), ()), (0.0, 0.0, 0.0), (10.0, 10.0, 10.0)))
        base = patterns.setdefault(f, torch.randn(3, *crop, generator=gen)) if separable else torch.zeros(3, *crop)
        xs.append(torch.stack([base + 0.1 * torch.randn(3, *crop, generator=gen) for _ in range(crops)]))
    x = torch.stack(xs).half()
    return CropBank(items, {"coarse": x, "fine": x})
