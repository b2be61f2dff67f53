"""Attention × gradient relevance maps for one zero-shot finding (Chefer et al., CVPR 2021).

What it explains: the HLIP paired-prompt decision for one finding, i.e. the logit difference
``exp(logit_scale) · e · (t_positive − t_negative)`` of the unit-norm study embedding ``e``
(hlip-compat §10).  It is a review aid showing which 24 mm patches the CLS score drew on,
**not a trained localiser** (hlip-compat §11).

Rule (Chefer et al. 2021, "Generic attention-model explainability", eq. for self-attention):
for every block ``b`` with attention probabilities ``A_b`` and their gradient ``∇A_b`` w.r.t.
the target, ``Ā_b = mean_heads(clamp(∇A_b ⊙ A_b, min=0))`` and ``R ← R + Ā_b · R`` from
``R = I``; the map is the CLS row of ``R`` over the patch tokens.  Upstream HLIP applies the
rule to the last block only; here it runs through **all** blocks, across the HLIP windows:

* a window block (slice or scan level) has one attention matrix per window, each with its
  own CLS copy.  In the study-level token set (one CLS + every patch) its ``Ā`` is
  block-diagonal over the windows' patches; the copies' rows are **averaged** into the CLS
  row and their columns map onto the CLS column, as the forward pass averages the copies
  going coarser and broadcasts the CLS going finer (hlip-compat §5);
* only the CLS row of ``R`` is needed, so ``e₀ᵀ (I + Ā_L) … (I + Ā_1)`` is evaluated as a
  vector from the left (``O(T²)`` per study block instead of ``O(T³)``); it equals the dense
  rule exactly (tested against it).

The CLS row is reshaped to the patch grid, upsampled trilinearly to the preprocessed volume
and returned with that volume's geometry in patient LPS, exportable as NIfTI.  Cost: one
forward and one backward pass with explicit (unfused) attention; for the chest model the four
study-level blocks keep ≈ 360 MB of attention each.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.dicom.volume import Volume
from pipelines.errors import InputError, ModelError
from pipelines.findings import Flag, ModelInfo
from pipelines.models.study_encoder import preprocess
from pipelines.models.study_encoder.model import StudyEncoder, input_flags

METHOD = ("chefer2021 attention x gradient rule, all blocks through HLIP windows; "
          "target = paired-prompt logit difference")


@dataclass(frozen=True)
class RelevanceMap:
    """Relevance of the preprocessed CT's voxels for one finding's score (non-negative, unitless)."""

    finding_id: str
    finding: str
    volume: Volume  # float32 [z, y, x] on the preprocessed grid, affine in patient LPS
    patch_relevance: np.ndarray  # float32 [N_scans, d, h, w]: the CLS row before upsampling
    logit_difference: float  # positive − negative logit of the finding (the explained quantity)
    score: float  # the finding's zero-shot score for this input
    model: ModelInfo
    preprocessing_version: str
    flags: tuple[Flag, ...] = ()
    method: str = METHOD

    def to_nifti(self, path: str | Path) -> Path:
        """Write the map as compressed NIfTI (RAS on disk, so it overlays the CT in any viewer).

        SimpleITK converts the LPS geometry of :class:`Volume` to the NIfTI RAS convention.
        """
        import SimpleITK as sitk

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(self.volume.to_sitk(), str(out), useCompression=True)
        return out


# --------------------------------------------------------------------- attention capture


@dataclass
class _Captured:
    attention: list[torch.Tensor]  # per block, [windows, heads, L, L] (softmax output, in the graph)


@contextmanager
def capture_attention(trunk: torch.nn.Module) -> Iterator[_Captured]:
    """Run the trunk's blocks with explicit attention and collect each block's probabilities.

    timm's ``Attention`` computes ``softmax(qkᵀ)`` itself when ``fused_attn`` is off; a forward
    hook on its ``attn_drop`` (identity at inference) sees that tensor, which stays in the
    autograd graph so ``torch.autograd.grad`` can return its gradient.  The blocks are changed
    for the duration: do not use on a model another thread is running (``locus encode-study``
    builds its own encoder).
    """
    captured = _Captured([])
    saved, hooks = [], []
    # timm VisionTransformer.blocks: attn.fused_attn / attn.attn_drop are not typed through nn.Module
    blocks: Any = trunk.blocks
    for block in blocks:
        attn = block.attn
        saved.append(attn.fused_attn)
        attn.fused_attn = False
        hooks.append(attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.attention.append(out)))
    try:
        yield captured
    finally:
        for block, fused, hook in zip(blocks, saved, hooks, strict=True):
            block.attn.fused_attn = fused
            hook.remove()


# --------------------------------------------------------------------- relevance rule


def block_cam(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``mean_heads(clamp(∇A ⊙ A, min=0))`` of one block: ``[windows, L, L]`` float64 on the CPU.

    The product is formed in the attention's precision (one ``[W, heads, L, L]`` temporary,
    ≈ 360 MB for a chest-CT study block) and only the head mean is widened.
    """
    return (gradient * attention).clamp_(min=0).mean(dim=1).double().cpu()


def block_cams_by_backward(target: torch.Tensor, attention: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`block_cam` of every block from one backward pass of ``target``.

    Each block's gradient is folded into its cam by a tensor hook as the backward pass
    reaches it, so at most one block's gradient exists at a time (the chest model's four
    study blocks would otherwise hold ≈ 1.4 GB of gradients together).  Every attention lies
    on the path from the target to the first block's attention, so differentiating w.r.t.
    that one tensor visits them all.  ``attention`` is emptied (its tensors stay alive only
    as long as the graph needs them).
    """
    cams: list[torch.Tensor | None] = [None] * len(attention)

    def fold(i: int, a: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            cams[i] = block_cam(a.detach(), grad)

        return hook

    handles = [a.register_hook(fold(i, a)) for i, a in enumerate(attention)]
    first = attention[0]
    attention.clear()
    try:
        torch.autograd.grad(target, [first])
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, c in enumerate(cams) if c is None]
    if missing:
        raise RuntimeError(f"no gradient reached the attention of blocks {missing}")
    return cams  # type: ignore[return-value]


def cls_relevance(cams: Sequence[torch.Tensor], n_patches: int) -> torch.Tensor:
    """CLS row of ``R = Π (I + Ā_b)`` over the study-level tokens ``[CLS, patches…]`` → ``[1 + P]``.

    ``cams[b]`` is ``[W, 1 + P/W, 1 + P/W]`` for a block with ``W`` windows whose patches are
    contiguous in study order (true for HLIP slice, scan and study windows).  Each window's
    local row/column 0 is its CLS copy (see the module docstring for how copies map).
    """
    v = torch.zeros(1 + n_patches, dtype=torch.float64)
    v[0] = 1.0
    for cam in reversed(cams):  # e0ᵀ (I + Ā_L) … (I + Ā_1), evaluated left to right
        w, length, _ = cam.shape
        m = length - 1
        if w * m != n_patches:
            raise ValueError(f"attention of {w} windows x {m} patches does not cover {n_patches} patches")
        local = torch.cat([v[:1].expand(w, 1) / w, v[1:].reshape(w, m)], dim=1)  # CLS copies share v_cls
        out = torch.einsum("wi,wij->wj", local, cam)
        v = v + torch.cat([out[:, 0].sum().reshape(1), out[:, 1:].reshape(-1)])
    return v


def dense_global_cam(cam: torch.Tensor) -> torch.Tensor:
    """The study-level ``Ā`` ``[T, T]`` a windowed ``cam`` stands for (reference for tests; O(T²) memory)."""
    w, length, _ = cam.shape
    m = length - 1
    t = 1 + w * m
    out = torch.zeros(t, t, dtype=cam.dtype)
    for i in range(w):
        sl = slice(1 + i * m, 1 + (i + 1) * m)
        out[0, 0] += cam[i, 0, 0] / w
        out[0, sl] += cam[i, 0, 1:] / w
        out[sl, 0] += cam[i, 1:, 0]
        out[sl, sl] = cam[i, 1:, 1:]
    return out


# --------------------------------------------------------------------- the map


def _affine_lps(prepared: preprocess.PreparedInput) -> np.ndarray:
    """Index (i, j, k) = (x, y, z) of the preprocessed ``[z, y, x]`` array → patient LPS mm."""
    d, h, w = prepared.tensor.shape[-3:]
    lo, hi = np.array(prepared.crop_lps_min), np.array(prepared.crop_lps_max)
    n = np.array([w, h, d], dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = np.diag((hi - lo) / np.maximum(n - 1, 1))  # canonical axes: identity direction cosines
    aff[:3, 3] = lo
    return aff


def relevance_map(encoder: StudyEncoder, ct: Volume, finding_id: str, *, body_part_examined: str | None = None,
                  flags: Sequence[Flag] = ()) -> RelevanceMap:  # fmt: skip
    """Relevance of the preprocessed CT for ``finding_id`` (a prompt-set finding id) under ``encoder``."""
    if encoder.classifier is None:
        raise ModelError("a relevance map explains a zero-shot finding, which needs the HLIP text tower; "
                         + encoder.zero_shot_flags()[0].message, code="text_tower_missing")  # fmt: skip
    ids = [f.id for f in encoder.prompts.findings]
    if finding_id not in ids:
        raise InputError(f"unknown finding {finding_id!r}; the prompt set has {', '.join(ids)}", code="unknown_finding")
    index = ids.index(finding_id)
    sel, prepared = encoder.prepare(ct, body_part_examined=body_part_examined)
    model = encoder.model
    trunk = cast(nn.Module, cast(nn.Module, model.visual).trunk)  # open_clip TimmModel.trunk (a timm ViT)
    param = next(model.parameters())
    x = prepared.tensor.to(param.device, param.dtype)
    # [2, D] rows (negative, positive); cloned because the classifier was built in inference mode
    weights = encoder.classifier.weights[index].clone().to(param.device)
    with capture_attention(trunk) as cap, torch.enable_grad():
        emb = model.encode_image(x, normalize=True)[0].float()  # type: ignore[operator]
        logits = encoder.classifier.logit_scale * (weights @ emb)
        target = logits[1] - logits[0]
        cams = block_cams_by_backward(target, cap.attention)
    n, _c, depth, height, width = x.shape[1:]
    pd, ph, pw = encoder.spec.patch_size
    grid = (n, depth // pd, height // ph, width // pw)
    row = cls_relevance(cams, int(np.prod(grid)))[1:].float().reshape(grid)
    up = F.interpolate(row[:1][None], size=(depth, height, width), mode="trilinear", align_corners=False)[0, 0]
    volume = Volume(up.clamp(min=0).numpy().astype(np.float32), _affine_lps(prepared),
                    series_instance_uid=ct.series_instance_uid, modality="OT")  # fmt: skip
    probs = (logits.detach().float().softmax(dim=-1))[1].item()
    return RelevanceMap(
        finding_id=finding_id,
        finding=encoder.prompts.findings[index].finding,
        volume=volume,
        patch_relevance=row.numpy(),
        logit_difference=float(target.detach().item()),
        score=float(probs),
        model=encoder.model_info,
        preprocessing_version=preprocess.PREPROCESSING_VERSION,
        flags=(*input_flags(sel), *flags),
    )
