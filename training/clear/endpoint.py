"""Training of one ABMIL endpoint head from stored slice features (docs/models/clear.md, Endpoint heads).

Protocol (Locus's, departing from CLEAR's code where that code has a defect):

* **patient-grouped k-fold** cross-validation (no patient's studies in both train and test),
  shuffled with a fixed seed; a **fresh head per fold** (CLEAR continues one model across folds);
* inside every training part, a patient-grouped **validation split** used for early stopping
  and for temperature calibration (calibration never sees the fold's test patients);
* loss ``BCEWithLogits`` with ``pos_weight = n_neg / n_pos`` per label from the training part
  (CLEAR passes ``n_pos/n_neg`` as ``weight``, which down-weights rare labels) or none;
* Adam (lr 1e-4 by default), up to 32 epochs, early stop after 9 epochs without a better
  validation loss, and the **best** epoch's weights deep-copied and restored (CLEAR keeps the last);
* per-label **temperature** fitted on the validation split by minimising the BCE of
  ``logit / T`` (Guo et al. 2017, "On Calibration of Modern Neural Networks"), stored in the head;
* AUROC per label on **probabilities** (Mann-Whitney U with tie correction), not on 0/1 predictions.

The shipped head is trained on all studies with the same inner validation split; the
cross-validation metrics describe that recipe, not that exact head.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from pipelines.models.clear.abmil import AbmilHead, pad_bags, save_head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointData:
    """Stored per-study slice features with multi-label targets."""

    features: Sequence[np.ndarray]  # per study [S_i, D] (float16 as stored)
    labels: np.ndarray  # [N, C] in {0, 1}
    patient_ids: Sequence[str]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        y = np.asarray(self.labels)
        if y.ndim != 2 or y.shape[0] != len(self.features) or len(self.patient_ids) != y.shape[0]:
            raise ValueError("features, labels [N, C] and patient_ids must describe the same N studies")
        if y.shape[1] != len(self.label_names):
            raise ValueError("one label name per label column")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 0 or 1")
        dims = {np.asarray(f).shape[1] for f in self.features}
        if len(dims) != 1 or any(np.asarray(f).shape[0] == 0 for f in self.features):
            raise ValueError("every study needs ≥ 1 slice and all features the same width")

    @property
    def dim(self) -> int:
        return int(np.asarray(self.features[0]).shape[1])


@dataclass(frozen=True)
class EndpointConfig:
    folds: int = 5
    seed: int = 1337
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 64
    max_epochs: int = 32
    patience: int = 9
    val_fraction: float = 0.2
    class_weight: Literal["pos_weight", "none"] = "pos_weight"
    gated: bool = False
    hidden: int = 256
    attn_dim: int = 256
    dropout: float = 0.5


@dataclass
class FitResult:
    head: AbmilHead
    best_epoch: int
    best_val_loss: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (train loss, val loss) per epoch


@dataclass
class EndpointResult:
    head: AbmilHead  # trained on all studies, calibrated
    fold_auroc: list[list[float]]  # [fold][label], NaN where a test fold lacks one class
    oof_probabilities: np.ndarray  # [N, C] out-of-fold calibrated probabilities
    final: FitResult

    @property
    def mean_auroc(self) -> list[float]:
        a = np.asarray(self.fold_auroc, dtype=np.float64)
        return [float(np.nanmean(col)) if np.isfinite(col).any() else float("nan") for col in a.T]


# ----------------------------------------------------------------------------- splits and metrics


def patient_folds(patient_ids: Sequence[str], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled k-fold over unique patients → ``[(train study indices, test study indices)]``."""
    patients = sorted(set(patient_ids))
    if k < 2 or k > len(patients):
        raise ValueError(f"{k} folds need between 2 and {len(patients)} patients")
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[p]: i % k for i, p in enumerate(order)}
    ids = np.asarray([fold_of[p] for p in patient_ids])
    return [(np.flatnonzero(ids != f), np.flatnonzero(ids == f)) for f in range(k)]


def split_patients(indices: np.ndarray, patient_ids: Sequence[str], fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Patient-grouped (train, validation) split of ``indices``; at least one patient each side."""
    patients = sorted({patient_ids[i] for i in indices})
    if len(patients) < 2:
        raise ValueError("a validation split needs at least two patients")
    order = np.random.default_rng(seed).permutation(len(patients))
    n_val = min(len(patients) - 1, max(1, round(fraction * len(patients))))
    val_patients = {patients[p] for p in order[:n_val]}
    is_val = np.asarray([patient_ids[i] in val_patients for i in indices])
    return indices[~is_val], indices[is_val]


def pos_weight(labels: np.ndarray) -> torch.Tensor:
    """``n_neg / n_pos`` per label; a label without positives (or negatives) in the split gets 1."""
    y = np.asarray(labels, dtype=np.float64)
    pos, neg = y.sum(axis=0), (1 - y).sum(axis=0)
    w = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(w, dtype=torch.float32)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = Mann-Whitney U / (n_pos·n_neg), ties counted half; NaN if one class is absent."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, bounds: tuple[float, float] = (0.05, 20.0)
                    ) -> torch.Tensor:  # fmt: skip
    """Per-label temperature minimising the BCE of ``logits / T`` on a calibration set (``[N, C]``)."""
    z, y = logits.detach().double(), labels.double()
    out = []
    for c in range(z.shape[1]):
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

        def closure(c: int = c, log_t: torch.Tensor = log_t, opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z[:, c] / log_t.exp(), y[:, c])
            loss.backward()
            return loss

        if 0 < float(y[:, c].sum()) < y.shape[0]:  # both classes present: T is identifiable
            opt.step(closure)
        t = float(log_t.detach().exp())
        out.append(min(max(t, bounds[0]), bounds[1]) if math.isfinite(t) else 1.0)
    return torch.tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------- training


def _batches(idx: np.ndarray, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(idx) if rng is not None else idx
    return [order[a : a + size] for a in range(0, len(order), size)]


def _forward(head: AbmilHead, data: EndpointData, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x, mask = pad_bags([data.features[i] for i in idx])
    return head(x, mask)


@torch.no_grad()
def predict_logits(head: AbmilHead, data: EndpointData, idx: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    head.eval()
    parts = [_forward(head, data, b)[0] for b in _batches(idx, batch_size, None)]
    return torch.cat(parts) if parts else torch.zeros(0, len(data.label_names))


def _loss(head: AbmilHead, data: EndpointData, idx: np.ndarray, pw: torch.Tensor | None, batch_size: int) -> float:
    logits = predict_logits(head, data, idx, batch_size)
    y = torch.as_tensor(np.asarray(data.labels)[idx], dtype=torch.float32)
    return float(F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw))


def fit_head(data: EndpointData, train_idx: np.ndarray, val_idx: np.ndarray, config: EndpointConfig,
             *, seed: int) -> FitResult:  # fmt: skip
    """A fresh head trained on ``train_idx``, early-stopped on ``val_idx``, best weights restored, calibrated."""
    torch.manual_seed(seed)
    head = AbmilHead(data.dim, len(data.label_names), hidden=config.hidden, attn_dim=config.attn_dim,
                     gated=config.gated, dropout=config.dropout)  # fmt: skip
    y_all = np.asarray(data.labels, dtype=np.float32)
    pw = pos_weight(y_all[train_idx]) if config.class_weight == "pos_weight" else None
    opt = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(seed)
    best_state, best_loss, best_epoch, stale = copy.deepcopy(head.state_dict()), math.inf, -1, 0
    history: list[tuple[float, float]] = []
    for epoch in range(config.max_epochs):
        head.train()
        total, n = 0.0, 0
        for b in _batches(train_idx, config.batch_size, rng):
            logits, _ = _forward(head, data, b)
            loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y_all[b]), pos_weight=pw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(b), n + len(b)
        val = _loss(head, data, val_idx, pw, config.batch_size)
        history.append((total / max(n, 1), val))
        if val < best_loss - 1e-6:
            best_state, best_loss, best_epoch, stale = copy.deepcopy(head.state_dict()), val, epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    temps = fit_temperature(predict_logits(head, data, val_idx, config.batch_size),
                            torch.from_numpy(y_all[val_idx]))  # fmt: skip
    head.temperature.copy_(temps)
    head.calibrated.fill_(True)
    return FitResult(head, best_epoch, best_loss, history)


def train_endpoint(data: EndpointData, config: EndpointConfig = EndpointConfig()) -> EndpointResult:
    """Patient-grouped cross-validation, then the shipped head on all studies (module docstring)."""
    y = np.asarray(data.labels)
    oof = np.full(y.shape, np.nan)
    fold_auroc: list[list[float]] = []
    for f, (train_idx, test_idx) in enumerate(patient_folds(data.patient_ids, config.folds, config.seed)):
        tr, va = split_patients(train_idx, data.patient_ids, config.val_fraction, config.seed + 1 + f)
        fit = fit_head(data, tr, va, config, seed=config.seed + 100 + f)
        logits = predict_logits(fit.head, data, test_idx, config.batch_size)
        probs = torch.sigmoid(fit.head.calibrated_logits(logits)).numpy()
        oof[test_idx] = probs
        fold_auroc.append([auroc(probs[:, c], y[test_idx, c]) for c in range(y.shape[1])])
        log.info("endpoint fold %d: best epoch %d, val loss %.4f, AUROC %s", f, fit.best_epoch, fit.best_val_loss,
                 [round(a, 3) for a in fold_auroc[-1]])  # fmt: skip
    all_idx = np.arange(len(data.features))
    tr, va = split_patients(all_idx, data.patient_ids, config.val_fraction, config.seed)
    final = fit_head(data, tr, va, config, seed=config.seed)
    return EndpointResult(final.head, fold_auroc, oof, final)


def save_endpoint(result: EndpointResult, path: str | Path, *, name: str, labels: Sequence[str], encoder_model_id: str,
                  config: EndpointConfig, label_map: dict[str, str] | None = None) -> str:  # fmt: skip
    """Write the shipped head with what it was validated by (fold AUROCs, best epoch, config, label map stamp)."""
    meta = {
        "fold_auroc": [[None if math.isnan(v) else v for v in fold] for fold in result.fold_auroc],
        "mean_auroc": [None if math.isnan(v) else v for v in result.mean_auroc],
        "best_epoch": result.final.best_epoch,
        "config": asdict(config),
        "label_map": dict(label_map or {}),
        "temperature_fitted_on": "validation split (patient-grouped)",
    }
    return save_head(path, result.head, name=name, labels=labels, encoder_model_id=encoder_model_id, meta=meta)
