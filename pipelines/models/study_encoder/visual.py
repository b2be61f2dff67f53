"""HLIP hierarchical-attention 3D ViT trunk (HLIP, arXiv 2505.21862).

The trunk is a plain ViT-B whose blocks attend inside *windows* that change from block to
block: a **slice** window is the ``h·w`` in-plane patches of one depth row of one scan, a
**scan** window is all ``d·h·w`` tokens of one volume, a **study** window is every token of
every scan.  Windows are made by reshaping tokens so each window is its own batch element
(no attention masks), and standard timm :class:`~timm.models.vision_transformer.Block`s run
on them.  One learned CLS token is copied into every window; going finer→coarser the copies
are **averaged**, going coarser→finer the CLS is **broadcast** (hlip-compat §5).  After the
last block the tokens are merged to study layout, ``norm`` is applied, and the CLS is pooled.

Why not subclass timm's ``VisionTransformer`` as upstream does: timm ≥ 1.0.2x validates
``img_size`` as 2-D and the reference builder fails at construction (hlip-compat §15).  This
module composes timm ``Block``s itself and keeps the exact parameter names of the published
checkpoints (``cls_token``, ``spatial_posemb``, ``sequential_posemb``, ``patch_embed.proj``,
``blocks.N.*``, ``norm``), so ``load_state_dict(strict=True)`` works on them.

The input is 6-D ``[B, N_scans, 1, D, H, W]``: the scan axis is explicit (§15).

Variants are registered with timm's model registry under their published names so that
open_clip's ``TimmModel`` (``vision_cfg.timm_model_name``) builds them; the open_clip model
configs live in ``configs/``.  MAE initialisation is never downloaded: ``pretrained=True``
is refused, and the frozen spatial position embedding of a freshly built model is the 3-D
sin-cos table (it is overwritten by the checkpoint's own table on load).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import ModelError

SLICE, SCAN, STUDY = "slice", "scan", "study"
_ORDER = {SLICE: 0, SCAN: 1, STUDY: 2}


@dataclass(frozen=True)
class HlipSpec:
    """Architecture of one HLIP visual trunk (everything that shapes its parameters)."""

    img_size: tuple[int, int, int]  # nominal (D, H, W) per scan; sets the position-embedding grid
    patch_size: tuple[int, int, int]  # (pd, ph, pw): Conv3d kernel = stride
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    slice_attn_indexes: tuple[int, ...] = ()
    scan_attn_indexes: tuple[int, ...] = ()
    study_attn_indexes: tuple[int, ...] = ()
    max_num_scans: int = 1  # > 1 adds the frozen sin-cos scan-order embedding ``sequential_posemb``
    in_chans: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        levels = self.block_levels()  # validates the schedule
        if len(levels) != self.depth:
            raise ModelError("HLIP block schedule does not cover every block", code="hlip_spec_invalid")
        if any(s % p for s, p in zip(self.img_size, self.patch_size, strict=True)):
            raise ModelError(f"img_size {self.img_size} is not a multiple of patch {self.patch_size}",
                             code="hlip_spec_invalid")
        if self.embed_dim % 6:
            raise ModelError("embed_dim must be divisible by 6 (3-D sin-cos position table)", code="hlip_spec_invalid")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Tokens along (d, h, w)."""
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size, strict=True))  # type: ignore[return-value]

    def block_levels(self) -> tuple[str, ...]:
        """The attention level of every block, from the three index tuples."""
        levels: list[str | None] = [None] * self.depth
        for name, idxs in ((SLICE, self.slice_attn_indexes), (SCAN, self.scan_attn_indexes),
                           (STUDY, self.study_attn_indexes)):
            for i in idxs:
                if not 0 <= i < self.depth or levels[i] is not None:
                    raise ModelError(f"block index {i} is out of range or assigned twice", code="hlip_spec_invalid")
                levels[i] = name
        if any(level is None for level in levels):
            missing = [i for i, level in enumerate(levels) if level is None]
            raise ModelError(f"blocks {missing} have no attention level", code="hlip_spec_invalid")
        return tuple(levels)  # type: ignore[arg-type]


# ----------------------------------------------------------------- position tables


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE-style 1-D sin-cos table ``[M, dim]`` (first half sin, second half cos)."""
    if dim % 2:
        raise ModelError("sin-cos dimension must be even", code="hlip_spec_invalid")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """3-D sin-cos table ``[1, d, h, w, dim]``; thirds ordered (w, h, d) as in HLIP v1."""
    d, h, w = grid
    gd, gh, gw = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    third = dim // 3
    emb = np.concatenate([sincos_1d(third, gw), sincos_1d(third, gh), sincos_1d(third, gd)], axis=1)
    return torch.from_numpy(emb.reshape(1, d, h, w, dim)).float()


# ----------------------------------------------------------------- modules


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3-D patches: ``Conv3d(in, C, kernel=stride=patch)`` (key ``proj``)."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C_in, D, H, W]`` → ``[B, N, d, h, w, C]``."""
        b, n = x.shape[:2]
        if any(s % p for s, p in zip(x.shape[-3:], self.patch_size, strict=True)):
            raise ModelError(f"input {tuple(x.shape[-3:])} is not a multiple of the patch {self.patch_size}",
                             code="hlip_input_shape")
        y = self.proj(x.flatten(0, 1))
        return y.permute(0, 2, 3, 4, 1).reshape(b, n, *y.shape[2:], y.shape[1])


class HlipVisionTransformer(nn.Module):
    """HLIP trunk: patch embedding, frozen position tables, hierarchical blocks, final norm.

    ``forward`` returns the pooled CLS ``[B, C]`` (timm ``global_pool='token'``);
    :meth:`forward_features` returns every token after ``norm`` in study layout
    ``[B, 1 + N·d·h·w, C]``.
    """

    def __init__(self, spec: HlipSpec, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.spec = spec
        self.levels = spec.block_levels()
        self.embed_dim = self.num_features = spec.embed_dim
        self.num_prefix_tokens = 1
        self.global_pool = "token"
        self.default_cfg: dict[str, Any] = {"architecture": "hlip", "input_size": (spec.in_chans, *spec.img_size)}
        self.pretrained_cfg = self.default_cfg
        self.patch_embed = PatchEmbed3D(spec.patch_size, spec.in_chans, spec.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        self.spatial_posemb = nn.Parameter(sincos_3d(spec.embed_dim, spec.grid_size), requires_grad=False)
        if spec.max_num_scans > 1:
            seq = sincos_1d(spec.embed_dim, np.arange(spec.max_num_scans))
            self.sequential_posemb: nn.Parameter | None = nn.Parameter(torch.from_numpy(seq)[None].float(),
                                                                        requires_grad=False)
        else:
            self.sequential_posemb = None
        dpr = [float(x) for x in torch.linspace(0, drop_path_rate, spec.depth)]
        norm = _layer_norm
        self.blocks = nn.ModuleList(
            Block(spec.embed_dim, spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                  norm_layer=norm)  # type: ignore[arg-type]  # timm calls norm_layer(dim); its annotation says type
            for i in range(spec.depth)
        )
        self.norm = norm(spec.embed_dim)
        nn.init.normal_(self.cls_token, std=1e-6)

    # timm / open_clip TimmModel interface -------------------------------------------
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """open_clip calls this; only the classifier-free trunk is supported."""
        if num_classes != 0 or global_pool not in (None, "token"):
            raise ModelError("the HLIP trunk only supports num_classes=0 with token pooling", code="hlip_spec_invalid")

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - training only
        """timm's training switch, kept for interface compatibility."""
        self.grad_checkpointing = enable

    # position embedding ------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int, int], n_scans: int) -> torch.Tensor:
        """Position embedding ``[1, N, d, h, w, C]`` for this input grid (trilinear if it differs)."""
        pos = self.spatial_posemb.float()
        if tuple(grid) != tuple(pos.shape[1:4]):
            pos = F.interpolate(pos.permute(0, 4, 1, 2, 3), size=grid, mode="trilinear").permute(0, 2, 3, 4, 1)
        pos = pos[:, None]
        if self.sequential_posemb is not None:
            seq = self.sequential_posemb.float()
            if n_scans > seq.shape[1]:  # inference-only extrapolation, as upstream
                seq = F.interpolate(seq.permute(0, 2, 1), size=n_scans, mode="linear").permute(0, 2, 1)
            else:  # deterministic scan order at inference (upstream samples positions in training)
                seq = seq[:, :n_scans]
            pos = pos + seq[:, :, None, None, None, :]
        return pos

    # windows ----------------------------------------------------------------------
    @staticmethod
    def _cls_to(cls: torch.Tensor, src: str, dst: str, n: int, d: int) -> torch.Tensor:
        """Move CLS copies between levels: average going coarser, broadcast going finer.

        CLS shapes: slice ``[B, N, d, C]``, scan ``[B, N, C]``, study ``[B, C]``.
        """
        if src == dst:
            return cls
        if _ORDER[dst] > _ORDER[src]:  # finer → coarser: average the copies
            if src == SLICE:
                cls = cls.mean(dim=2)
            if dst == STUDY:
                cls = cls.mean(dim=1)
            return cls
        b, c = cls.shape[0], cls.shape[-1]  # coarser → finer: broadcast
        if src == STUDY:
            cls = cls[:, None].expand(b, n, c)
        if dst == SLICE:
            cls = cls[:, :, None].expand(b, n, d, c)
        return cls

    @staticmethod
    def _window(tokens: torch.Tensor, cls: torch.Tensor, level: str) -> torch.Tensor:
        """Tokens ``[B, N, d, h, w, C]`` + CLS at ``level`` → window batch ``[W, 1 + L, C]``."""
        b, n, d, h, w, c = tokens.shape
        if level == SLICE:
            seq, head = tokens.reshape(b * n * d, h * w, c), cls.reshape(b * n * d, 1, c)
        elif level == SCAN:
            seq, head = tokens.reshape(b * n, d * h * w, c), cls.reshape(b * n, 1, c)
        else:
            seq, head = tokens.reshape(b, n * d * h * w, c), cls.reshape(b, 1, c)
        return torch.cat([head, seq], dim=1)

    @staticmethod
    def _unwindow(x: torch.Tensor, level: str, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d, h, w, c = shape
        tokens = x[:, 1:].reshape(b, n, d, h, w, c)
        head = x[:, 0]
        cls = {SLICE: lambda: head.reshape(b, n, d, c), SCAN: lambda: head.reshape(b, n, c),
               STUDY: lambda: head.reshape(b, c)}[level]()
        return tokens, cls

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token features of ``[B, N_scans, C, D, H, W]`` input."""
        if x.ndim != 6:
            raise ModelError(f"HLIP input must be [B, N_scans, C, D, H, W], got {tuple(x.shape)}",
                             code="hlip_input_shape")
        tokens = self.patch_embed(x)
        b, n, d, h, w, c = tokens.shape
        tokens = tokens + self._pos_embed((d, h, w), n).to(tokens.dtype)
        level = self.levels[0]
        cls = self._cls_to(self.cls_token.reshape(1, c).expand(b, c), STUDY, level, n, d)
        i = 0
        while i < len(self.blocks):
            level_i = self.levels[i]
            cls = self._cls_to(cls, level, level_i, n, d)
            level = level_i
            xw = self._window(tokens, cls, level)
            while i < len(self.blocks) and self.levels[i] == level:  # consecutive blocks share the partition
                xw = self.blocks[i](xw)
                i += 1
            tokens, cls = self._unwindow(xw, level, tokens.shape)
        cls = self._cls_to(cls, level, STUDY, n, d)
        out = torch.cat([cls[:, None], tokens.reshape(b, n * d * h * w, c)], dim=1)
        return self.norm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's features."""
        return self.forward_features(x)[:, 0]


def _layer_norm(dim: int, **kwargs: Any) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)  # timm ViT default


# ----------------------------------------------------------------- registry

#: Published HLIP v1 variants (hlip-compat §3), by their upstream timm names.
PUBLISHED_SPECS: dict[str, HlipSpec] = {
    "vit_base_singlescan_h2_token2744": HlipSpec(
        img_size=(112, 336, 336), patch_size=(8, 24, 24), max_num_scans=1,
        slice_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10), study_attn_indexes=(2, 5, 8, 11),
    ),
    "vit_base_multiscan_h2_token1176": HlipSpec(
        img_size=(48, 224, 224), patch_size=(8, 16, 16), max_num_scans=40,
        scan_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10), study_attn_indexes=(2, 5, 8, 11),
    ),
    "vit_base_multiscan_h2_token588": HlipSpec(
        img_size=(48, 224, 224), patch_size=(16, 16, 16), max_num_scans=40,
        scan_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10), study_attn_indexes=(2, 5, 8, 11),
    ),
    "vit_base_multiscan_h3_token1176": HlipSpec(
        img_size=(48, 224, 224), patch_size=(8, 16, 16), max_num_scans=40,
        slice_attn_indexes=(0, 3, 6, 9), scan_attn_indexes=(1, 4, 7, 10), study_attn_indexes=(2, 5, 8, 11),
    ),
}

_REGISTERED: dict[str, HlipSpec] = {}


def register_hlip_variant(name: str, spec: HlipSpec) -> None:
    """Register ``name`` in timm's model registry so ``timm.create_model(name)`` builds ``spec``.

    Idempotent for the same spec; registering a different spec under a taken name raises.
    """
    import timm.models

    if name in _REGISTERED:
        if _REGISTERED[name] != spec:
            raise ModelError(f"HLIP variant {name!r} already registered with another architecture",
                             code="hlip_spec_invalid")
        return
    if timm.models.is_model(name):
        raise ModelError(f"timm already has a model named {name!r}", code="hlip_spec_invalid")

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> HlipVisionTransformer:
        if pretrained:
            raise ModelError(
                "HLIP MAE initialisation is not downloaded at run time; load a full HLIP checkpoint instead",
                code="pretrained_download_refused",
            )
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        drop_path = float(kwargs.pop("drop_path_rate", 0.0) or 0.0)
        if kwargs.pop("patch_drop_rate", None):
            raise ModelError("patch dropout is not supported by the HLIP trunk", code="hlip_spec_invalid")
        if kwargs:
            raise ModelError(f"unsupported HLIP trunk arguments {sorted(kwargs)}", code="hlip_spec_invalid")
        return HlipVisionTransformer(spec, drop_path_rate=drop_path)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    timm.models.register_model(entrypoint)
    setattr(sys.modules[__name__], name, entrypoint)
    _REGISTERED[name] = spec


def registered_spec(name: str) -> HlipSpec:
    """The spec registered under ``name``; raises a model error for an unknown one."""
    try:
        return _REGISTERED[name]
    except KeyError:
        raise ModelError(f"no HLIP variant registered as {name!r}", code="model_unknown") from None


def register_published_variants() -> None:
    """Register the published HLIP variants with open_clip (idempotent)."""
    for name, spec in PUBLISHED_SPECS.items():
        register_hlip_variant(name, spec)


def flops_estimate(spec: HlipSpec, n_scans: int = 1) -> float:
    """Forward FLOPs of the trunk (hlip-compat §13 rule of thumb: 24·C² per token per block + attention)."""
    d, h, w = spec.grid_size
    tokens = n_scans * d * h * w
    window = {SLICE: h * w, SCAN: d * h * w, STUDY: n_scans * d * h * w}
    total = 0.0
    for level in spec.block_levels():
        total += 24 * spec.embed_dim**2 * tokens + 4 * tokens * window[level] * spec.embed_dim
    return total + 2 * math.prod(spec.patch_size) * spec.embed_dim * tokens
