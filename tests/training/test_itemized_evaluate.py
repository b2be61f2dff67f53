"""Phantom metrics of training.itemizedclip.evaluate: AUC, AFLoc CNR, pointing game on a forced map."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pipelines.models.itemizedclip import model as im
from pipelines.models.itemizedclip import wholebody as wb
from pipelines.models.study_encoder import model as hm
from training.itemizedclip import evaluate as ev
from training.itemizedclip.data import phantom_studies
from training.itemizedclip.text import write_text_dir


def test_auc_is_mann_whitney_with_half_ties() -> None:
    assert ev.auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert ev.auc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    assert ev.auc([0.5, 0.5, 0.4], [1, 0, 0]) == pytest.approx((0.5 + 1.0) / 2)
    assert np.isnan(ev.auc([0.3, 0.4], [1, 1]))


def test_cnr_follows_the_afloc_definition() -> None:
    m = np.array([[4.0, 2.0, 0.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    gt = np.array([[1, 1, 0, 0], [2, 1, 0, 0]])
    r = 2.0 * (m - m.min()) / (m.max() - m.min()) - 1.0
    a, b = r[gt == 1], r[gt == 0]
    want = (a.mean() - b.mean()) / np.sqrt(a.var() + b.var())
    assert ev.cnr(m, gt) == pytest.approx(want)
    assert ev.cnr(-m, gt) == pytest.approx(-want)  # signed
    assert ev.cnr(np.ones((2, 2)), np.array([[1, 0], [0, 0]])) == 0.0
    assert np.isnan(ev.cnr(m, np.zeros_like(gt)))


def test_pointing_game_hits_when_the_map_peaks_on_the_item_lesion(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    params = wb.PARAMS[wb.DEMO_MODEL]
    studies = phantom_studies([3], params, lesion_free_fraction=0.0) + phantom_studies([5], params, n_lesions=0)
    text = write_text_dir(tmp_path / "text")
    model = im.build_model(wb.DEMO_MODEL, text).eval()
    tok = hm.tokenizer_for(text, 77)
    patch = wb.TRUNK_SPECS[wb.DEMO_TRUNK].patch_size
    study = studies[0]

    def token_of(label: int) -> int:  # the token holding most of the lesion's voxels
        pd, ph, pw = patch
        counts = np.zeros((6, 6, 6))
        for k, j, i in zip(*np.nonzero(study.lesion_labels == label), strict=True):
            counts[k // pd, j // ph, i // pw] += 1
        return int(np.argmax(counts))

    real_head = ev.item_head

    def forced(model, tokens, feats, **kw):  # type: ignore[no-untyped-def]
        c, s, a, h = real_head(model, tokens, feats, **kw)
        if a.shape[1] != len([it for it in study.report.items if it.lesion_labels]) or tokens.shape[0] != 1:
            return c, s, a, h
        a = torch.full_like(a, 1e-3)
        for n, it in enumerate(x for x in study.report.items if x.lesion_labels):
            a[0, n, token_of(it.lesion_labels[0])] = 0.5
        return c, s, a, h

    monkeypatch.setattr(ev, "item_head", forced)
    result = ev.evaluate(model, tok, [study], patch)
    assert result.pointing_game == 1.0 and result.n_pointing == len(study.report.items)
    assert result.mean_cnr > 0.5
    monkeypatch.setattr(ev, "item_head", real_head)
    result = ev.evaluate(model, tok, studies, patch)
    assert result.n_studies == 2 and result.n_normal == 1
    assert set(result.per_item_auc) >= {"normal"} and 0.0 <= result.per_item_auc["normal"] <= 1.0
    assert result.to_json()["label"] == "phantom accuracy, not clinical accuracy"
