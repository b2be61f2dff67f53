"""Attention-MIL endpoint heads over a bag of slice embeddings (Ilse, Tomczak, Welling, ICML 2018).

Layout (attention MIL, Ilse et al. 2018, arXiv 1802.04712, as used by CLEAR; departures in docs/models/clear.md):

* instance encoder ``h_s = ReLU(W₁ x_s + b₁)``, ``D → 256``;
* attention score, **non-gated** by default (Ilse et al. eq. 8, CLEAR's head):
  ``e_s = wᵀ tanh(V h_s + b_V) + b_w``; **gated** on request (Ilse et al. eq. 9):
  ``e_s = wᵀ (tanh(V h_s + b_V) ⊙ sigmoid(U h_s + b_U)) + b_w``;
* attention ``a = softmax(e)`` over the slices of the bag **with a padding mask** (padded
  scores are −∞, so padding never takes weight — CLEAR's head lets zero rows take part);
* pooling ``z = Σ_s a_s h_s``; classifier ``LayerNorm(256) → Linear(256, 256) → Dropout(0.5)
  → SiLU → Linear(256, C)`` → logits (331,273 parameters for D = 768, C = 8, as CLEAR's).

Outputs are independent per label (multi-label, sigmoid).  Calibration: one temperature per
output, fitted on a validation split by the trainer and stored **in the head** (buffers
``temperature`` and ``calibrated``), so ``p = sigmoid(logit / T)``.  MIL attention says which
slices drove the score; it is not a calibrated localisation.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.errors import InputError, ModelError
from pipelines.models.checkpoints import load_torch_payload

HEAD_FORMAT = "locus-clear-abmil-1"
HEAD_IMPLEMENTATION = "locus-clear-abmil-1.0"


class AbmilHead(nn.Module):
    """Ilse et al. attention pooling + CLEAR's classifier; returns logits and per-slice attention."""

    # Buffers (saved with the head): one temperature per output, and whether they were fitted.
    temperature: torch.Tensor
    calibrated: torch.Tensor

    def __init__(self, in_dim: int, n_outputs: int, *, hidden: int = 256, attn_dim: int = 256,
                 gated: bool = False, dropout: float = 0.5) -> None:  # fmt: skip
        super().__init__()
        if in_dim < 1 or n_outputs < 1:
            raise ModelError("ABMIL head needs in_dim ≥ 1 and n_outputs ≥ 1", code="model_config_invalid")
        self.config = {"in_dim": in_dim, "n_outputs": n_outputs, "hidden": hidden, "attn_dim": attn_dim,
                       "gated": gated, "dropout": dropout}  # fmt: skip
        self.instance = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.SiLU(), nn.Linear(hidden, n_outputs)
        )
        self.register_buffer("temperature", torch.ones(n_outputs))
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def gated(self) -> bool:
        """Whether the head uses gated attention (Ilse et al. 2018), recorded with the checkpoint."""
        return self.attn_u is not None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, S, D]``, ``mask`` ``[B, S]`` (True = real slice) → ``(logits [B, C], attention [B, S])``."""
        if x.ndim != 3:
            raise InputError(f"ABMIL input must be [bags, slices, dim], got {tuple(x.shape)}", code="clear_bag_invalid")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if not bool(mask.any(dim=1).all()):
            raise InputError("an ABMIL bag has no slices", code="clear_bag_empty")
        h = self.instance(x)
        t = torch.tanh(self.attn_v(h))
        if self.attn_u is not None:
            t = t * torch.sigmoid(self.attn_u(h))
        e = self.attn_w(t).squeeze(-1).masked_fill(~mask, float("-inf"))
        a = torch.softmax(e, dim=1)
        z = torch.einsum("bs,bsh->bh", a, h)
        return self.classifier(z), a

    def calibrated_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits divided by the fitted per-output temperature (1 until calibrated), so probabilities are calibrated."""
        return logits / self.temperature

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode ``(probabilities [B, C] = sigmoid(logit / T), attention [B, S])``."""
        was = self.training
        self.eval()
        try:
            logits, a = self(x, mask)
        finally:
            self.train(was)
        return torch.sigmoid(self.calibrated_logits(logits)), a


def pad_bags(bags: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length bags ``[S_i, D]`` → ``(x [B, S_max, D] float32, mask [B, S_max])``."""
    if not bags:
        raise InputError("no bags", code="clear_bag_empty")
    ts = [torch.as_tensor(np.asarray(b, dtype=np.float32)) if not isinstance(b, torch.Tensor) else b.float() for b in bags]
    d = ts[0].shape[1]
    if any(t.ndim != 2 or t.shape[1] != d for t in ts):
        raise InputError("bags must all be [slices, same dim]", code="clear_bag_invalid")
    s = max(t.shape[0] for t in ts)
    x = torch.zeros(len(ts), s, d)
    mask = torch.zeros(len(ts), s, dtype=torch.bool)
    for i, t in enumerate(ts):
        x[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return x, mask


def top_evidence(attention: torch.Tensor | np.ndarray, k: int = 3) -> list[int]:
    """Indices of the ``k`` most attended slices of one bag, highest first (ties: lower index first)."""
    a = np.asarray(attention, dtype=np.float64).ravel()
    order = np.lexsort((np.arange(a.size), -a))
    return [int(i) for i in order[: min(k, a.size)]]


@dataclass(frozen=True)
class HeadInfo:
    """What a stored head says about itself (recorded beside every prediction)."""

    name: str
    labels: tuple[str, ...]
    encoder_model_id: str
    sha256: str
    calibrated: bool
    config: dict[str, Any]
    meta: dict[str, Any]

    @property
    def head_id(self) -> str:
        """An id that names the head and its weights' hash, so a report says exactly which head scored it."""
        return f"clear-head-{self.name}-{self.sha256[:12]}"


def save_head(path: str | Path, head: AbmilHead, *, name: str, labels: Sequence[str], encoder_model_id: str,
              meta: Mapping[str, Any] | None = None) -> str:  # fmt: skip
    """Write a weights-only head file (``torch.save`` of tensors and plain types); returns its SHA-256."""
    if len(labels) != head.config["n_outputs"]:
        raise ModelError(f"{len(labels)} labels for a head with {head.config['n_outputs']} outputs",
                         code="model_config_invalid")  # fmt: skip
    payload = {
        "format": HEAD_FORMAT, "implementation": HEAD_IMPLEMENTATION, "name": name, "labels": list(labels),
        "encoder_model_id": encoder_model_id, "config": dict(head.config), "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
    }  # fmt: skip
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_head(path: str | Path, *, expected_sha256: str = "") -> tuple[AbmilHead, HeadInfo]:
    """Read a head weights-only, build it from its own config, load strictly (eval mode)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"ABMIL head not found: {p.name}", code="checkpoint_missing")
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise ModelError(f"head sha256 {digest[:16]}… differs from the pinned {expected_sha256[:16]}…",
                         code="model_hash_mismatch")  # fmt: skip
    state = load_torch_payload(data)
    if not isinstance(state, Mapping) or state.get("format") != HEAD_FORMAT:
        raise ModelError(f"{p.name} is not a {HEAD_FORMAT} file", code="checkpoint_layout")
    try:
        cfg = dict(state["config"])
        head = AbmilHead(int(cfg["in_dim"]), int(cfg["n_outputs"]), hidden=int(cfg["hidden"]),
                         attn_dim=int(cfg["attn_dim"]), gated=bool(cfg["gated"]), dropout=float(cfg["dropout"]))  # fmt: skip
        head.load_state_dict(dict(state["state_dict"]), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"ABMIL head {p.name} does not match its own config: {str(exc)[:300]}",
                         code="checkpoint_layout") from exc  # fmt: skip
    head.eval()
    info = HeadInfo(name=str(state["name"]), labels=tuple(str(v) for v in state["labels"]),
                    encoder_model_id=str(state["encoder_model_id"]), sha256=digest,
                    calibrated=bool(head.calibrated.item()), config=cfg, meta=dict(state.get("meta", {})))  # fmt: skip
    return head, info
