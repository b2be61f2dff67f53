"""Run specifications: frozen in run.json, stable dataset splits, refusal of a changed spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.localizer.pipeline import DatasetSplit, Run, RunSpec, demo_spec, with_dataset


def test_spec_round_trips_and_is_frozen(tmp_path: Path) -> None:
    spec = demo_spec(3)
    assert RunSpec.from_json(spec.to_json()).to_json() == spec.to_json()
    Run.open(tmp_path / "out", tmp_path / "work", spec)
    assert Run.open(tmp_path / "out", tmp_path / "work").spec.to_json() == spec.to_json()
    changed = demo_spec(3)
    changed.fine.steps += 1
    with pytest.raises(ValueError, match="different run specification"):
        Run.open(tmp_path / "out", tmp_path / "work", changed)


def test_dataset_split_is_stable_and_proportional(tmp_path: Path) -> None:
    spec = with_dataset(demo_spec(0), tmp_path)
    assert RunSpec.from_json(spec.to_json()).to_json() == spec.to_json()
    parts = [DatasetSplit(str(tmp_path), "train")._part_of(f"study-{i}") for i in range(3000)]
    assert parts == [DatasetSplit(str(tmp_path), "test")._part_of(f"study-{i}") for i in range(3000)]
    for part, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(parts.count(part) / 3000 - share) < 0.03
