"""ABMIL endpoint trainer: patient-grouped folds, class weights, early stopping, calibration, a toy endpoint."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.models.clear.abmil import load_head, pad_bags, top_evidence
from training.clear.endpoint import (
    EndpointConfig,
    EndpointData,
    auroc,
    fit_head,
    fit_temperature,
    patient_folds,
    pos_weight,
    save_endpoint,
    split_patients,
    train_endpoint,
)

D = 12


def _toy(n_patients: int = 30, seed: int = 0) -> tuple[EndpointData, list[int]]:
    """Bags of noise; label 0 = a slice shifted along e₀ is present, label 1 = one along e₁.

    Some patients have two studies.  Returns the data and, per study, the index of its label-0
    slice (−1 if none), so attention can be checked.
    """
    rng = np.random.default_rng(seed)
    feats, labels, pids, where = [], [], [], []
    for p in range(n_patients):
        for _ in range(1 + (p % 3 == 0)):
            n = int(rng.integers(8, 20))
            x = rng.normal(size=(n, D)).astype(np.float32)
            y = [int(rng.random() < 0.4), int(rng.random() < 0.5)]
            w = -1
            if y[0]:
                w = int(rng.integers(n))
                x[w, 0] += 6.0
            if y[1]:
                x[int(rng.integers(n)), 1] += 6.0
            feats.append(x.astype(np.float16))
            labels.append(y)
            pids.append(f"P{p}")
            where.append(w)
    return EndpointData(feats, np.asarray(labels), pids, ("loc_a", "loc_b")), where


FAST = EndpointConfig(folds=3, lr=3e-3, batch_size=8, max_epochs=40, patience=8, hidden=32, attn_dim=16, dropout=0.1)


def test_folds_and_validation_splits_never_split_a_patient() -> None:
    data, _ = _toy()
    folds = patient_folds(data.patient_ids, 5, 1337)
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen.tolist()) == list(range(len(data.features)))
    for tr, te in folds:
        assert not {data.patient_ids[i] for i in tr} & {data.patient_ids[i] for i in te}
        a, b = split_patients(tr, data.patient_ids, 0.2, 0)
        assert not {data.patient_ids[i] for i in a} & {data.patient_ids[i] for i in b}
        assert sorted(np.concatenate([a, b]).tolist()) == sorted(tr.tolist())
    with pytest.raises(ValueError):
        patient_folds(["a", "a"], 2, 0)


def test_pos_weight_is_neg_over_pos() -> None:
    y = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]])
    torch.testing.assert_close(pos_weight(y), torch.tensor([3.0, 3.0, 1.0]))


def test_auroc_on_probabilities_with_ties() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == pytest.approx(0.5)
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_temperature_recovers_a_known_scale() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 1, generator=g) * 2
    y = torch.bernoulli(torch.sigmoid(z), generator=g)
    t = fit_temperature(z * 3.0, y)  # logits 3× too confident → T ≈ 3
    assert float(t[0]) == pytest.approx(3.0, rel=0.15)


def test_early_stopping_restores_the_best_epoch() -> None:
    data, _ = _toy(12)
    idx = np.arange(len(data.features))
    tr, va = split_patients(idx, data.patient_ids, 0.3, 0)
    cfg = EndpointConfig(lr=3e-2, batch_size=4, max_epochs=25, patience=3, hidden=16, attn_dim=8, dropout=0.0)
    fit = fit_head(data, tr, va, cfg, seed=0)
    vals = [v for _, v in fit.history]
    assert fit.best_epoch == int(np.argmin(vals)) and fit.best_val_loss == pytest.approx(min(vals))
    assert len(vals) <= fit.best_epoch + 1 + cfg.patience
    # the returned weights are the best epoch's: recomputing the validation loss reproduces it
    x, mask = pad_bags([data.features[i] for i in va])
    fit.head.eval()
    logits, _ = fit.head(x, mask)
    yv = torch.as_tensor(data.labels[va], dtype=torch.float32)
    recomputed = torch.nn.functional.binary_cross_entropy_with_logits(logits, yv, pos_weight=pos_weight(data.labels[tr]))
    assert float(recomputed) == pytest.approx(fit.best_val_loss, rel=1e-5)
    assert bool(fit.head.calibrated)


def test_learns_a_separable_toy_endpoint_with_evidence(tmp_path: Path) -> None:
    data, where = _toy()
    result = train_endpoint(data, FAST)
    digest = save_endpoint(result, tmp_path / "head.pt", name="toy", labels=data.label_names,
                           encoder_model_id="enc-1", config=FAST, label_map={"version": "1.0.0"})  # fmt: skip
    loaded, info = load_head(tmp_path / "head.pt", expected_sha256=digest)
    x0 = torch.as_tensor(data.features[0], dtype=torch.float32)[None]
    torch.testing.assert_close(loaded.predict(x0)[0], result.head.predict(x0)[0])
    assert info.calibrated and info.meta["mean_auroc"] == pytest.approx(result.mean_auroc)
    assert info.meta["config"]["folds"] == 3 and info.meta["label_map"] == {"version": "1.0.0"}
    assert len(result.fold_auroc) == 3
    assert min(result.mean_auroc) > 0.9, result.fold_auroc
    assert np.isfinite(result.oof_probabilities).all()
    head = result.head
    assert bool(head.calibrated) and torch.all(head.temperature > 0)
    # attention puts the label-0 slice among the top-3 for most positive studies
    hits, total = 0, 0
    for i, w in enumerate(where):
        if w < 0:
            continue
        _, att = head.predict(torch.as_tensor(data.features[i], dtype=torch.float32)[None])
        hits += w in top_evidence(att[0], 3)
        total += 1
    assert hits / total > 0.8


def test_bad_endpoint_data_is_refused() -> None:
    with pytest.raises(ValueError):
        EndpointData([np.zeros((2, 3), np.float16)], np.array([[2]]), ["p"], ("a",))
    with pytest.raises(ValueError):
        EndpointData([np.zeros((0, 3), np.float16)], np.array([[1]]), ["p"], ("a",))
