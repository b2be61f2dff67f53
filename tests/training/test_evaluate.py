"""Evaluation on a hand-built case with known answers: IoU matching, multi-label GT, top-k, regions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.localizer.evaluate import GroundTruth, Prediction, match, summarize
from training.localizer.report import write_report


def gt(study: str, lid: str, box: list[float], finals: tuple[str, ...], coarse: tuple[str, ...],
       region: str) -> GroundTruth:
    return GroundTruth(study, lid, np.array(box, dtype=float), finals, coarse, region)


def pred(study: str, box: list[float], p: str, top3: tuple[str, ...], coarse: tuple[str, ...],
         conf: float) -> Prediction:
    return Prediction(study, np.array(box, dtype=float), p, top3, coarse, conf)


TRUTHS = [
    # study A: a liver lesion with two acceptable answers, and a rib lesion
    gt("A", "a1", [0, 0, 0, 10, 10, 10], ("Liver S7", "Liver S8"), ("Liver",), "Abdomen"),
    gt("A", "a2", [100, 0, 0, 10, 10, 10], ("Rib R3",), ("Rib R3",), "Axial skeleton"),
    # study B: a lung lesion whose only prediction overlaps with IoU < 0.5 (unmatched = wrong)
    gt("B", "b1", [0, 0, 0, 10, 10, 10], ("Right upper lobe",), ("Right lung",), "Chest"),
    gt("B", "b2", [50, 50, 50, 10, 10, 10], ("Mediastinum 4R",), ("Mediastinum",), "Chest"),
]
PREDICTIONS = [
    # listed in the other order, slightly shifted (IoU 0.82): matching must pair by IoU, not position
    pred("A", [100.5, 0, 0, 10, 10, 10], "Rib R4", ("Rib R4", "Rib R3"), ("Rib R4", "Rib R3"), 0.6),
    pred("A", [0.5, 0, 0, 10, 10, 10], "Liver S8", ("Liver S8",), ("Liver",), 0.9),
    pred("B", [4, 0, 0, 10, 10, 10], "Right upper lobe", ("Right upper lobe",), ("Right lung",), 0.95),  # IoU 0.43
    pred("B", [50, 50, 50, 10, 10, 10], "Thoracic aorta", ("Thoracic aorta", "Esophagus", "Mediastinum 4R"),
         ("Mediastinum",), 0.3),
]


def test_iou_matching_is_one_to_one_by_overlap() -> None:
    out = {o.truth.lesion_id: o for o in match(TRUTHS, PREDICTIONS)}
    assert out["a1"].prediction is PREDICTIONS[1] and out["a2"].prediction is PREDICTIONS[0]
    assert out["b1"].prediction is None  # IoU 6/14 = 0.43 <= 0.5
    assert abs(out["a1"].iou - 9.5 / 10.5) < 1e-9


def test_known_metrics() -> None:
    m = summarize(match(TRUTHS, PREDICTIONS))
    assert m["n"] == 4 and m["unmatched"] == 1
    assert m["final_top1"] == 0.25  # only the liver lesion (second acceptable answer)
    assert m["final_top3"] == 0.75  # + rib R3 and mediastinum 4R in the top 3
    assert m["coarse_top1"] == 0.5  # liver, mediastinum
    assert m["coarse_top3"] == 0.75
    assert m["per_region"]["Chest"] == {"n": 2, "final_top1": 0.0, "final_top3": 0.5, "coarse_top1": 0.5,
                                        "coarse_top3": 0.5, "outside_vocabulary": 0}
    assert m["per_region"]["Abdomen"]["final_top1"] == 1.0
    confusions = {(c["truth"], c["predicted"]): c["count"] for c in m["confusions"]}
    assert confusions == {("Rib R3", "Rib R4"): 1, ("Right upper lobe", "(unmatched)"): 1,
                          ("Mediastinum 4R", "Thoracic aorta"): 1}
    rel = m["reliability"]
    assert rel["n"] == 3 and sum(b["n"] for b in rel["bins"]) == 3
    # bins: 0.3 (wrong), 0.6 (wrong), 0.9 (right) -> ECE = (0.3 + 0.6 + 0.1) / 3
    assert abs(rel["ece"] - (0.3 + 0.6 + 0.1) / 3) < 1e-9


def test_report_files(tmp_path: Path) -> None:
    m = summarize(match(TRUTHS, PREDICTIONS))
    html = write_report(m, tmp_path, title="hand-built case")
    assert "final top-1" in html.read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["final_top1"] == 0.25
    for png in ("per_region.png", "reliability.png", "confusions.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
