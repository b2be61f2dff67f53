"""The 2-D slice encoder of Locus's CLEAR, its registry entry and its safe loader.

Backbone: torchvision **ResNet-18** (He et al. 2016), built offline (``weights=None``, never a
download), ``zero_init_residual=True`` as MoCo v3 / CLEAR do for ResNets (Chen et al. 2021, arXiv 2104.02057),
classifier replaced by identity → a **512-d** pooled feature per slice.  Why not CLEAR's default
ViT-B with conv stem (768-d, ~17.5 GFLOPs per 224² image): the node encodes ~600 slices per
whole-body study on a CPU; ResNet-18 is ~1.8 GFLOPs per slice, trains with MoCo v3 at small
batch sizes (BatchNorm projector, MoCo v3) and its 512-d output halves the stored bytes.  ResNet-34
(512-d) and ResNet-50 (2048-d) are registered too for sites with GPUs.

A registry entry (:class:`ClearEncoderSpec`) pins the weights file by SHA-256 **and** carries the
slice preprocessing (:class:`~.slices.SlicePreprocessing`) the weights were trained with; the
checkpoint repeats the preprocessing and loading refuses a file whose preprocessing or
architecture disagrees with its entry (style: preprocessing is baked into weights, a wrong
value gives garbage, not an error).  Checkpoints are read with ``torch.load(weights_only=True)``
(:func:`pipelines.models.checkpoints.load_torch_payload`): a file cannot run code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.errors import ModelError
from pipelines.findings import ModelInfo
from pipelines.models.checkpoints import load_torch_payload, strip_module_prefix
from pipelines.models.clear.slices import (
    DEFAULT_PREPROCESSING,
    SlicePreprocessing,
    SliceStack,
    normalize,
)
from pipelines.models.clear.store import SliceFeatures
from pipelines.models.registry import PinnedFile

log = logging.getLogger(__name__)

#: Version of this encoder implementation (bump when outputs can change for the same weights).
ENCODER_IMPLEMENTATION = "locus-clear-encoder-1.0"
CHECKPOINT_FORMAT = "locus-clear-encoder-1"
ENCODER_NAME = "CLEAR-style 2-D slice encoder (LeCL/MoCo v3)"


def _resnet(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, zero_init_residual=True)

    return build


#: arch → (builder, feature width).  Builders never download (``weights=None``).
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (_resnet("resnet18"), 512),
    "resnet34": (_resnet("resnet34"), 512),
    "resnet50": (_resnet("resnet50"), 2048),
}


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialised backbone whose forward returns ``[B, feature_dim]``."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown CLEAR slice-encoder architecture {arch!r}; known {sorted(ARCHITECTURES)}",
                         code="model_unknown")  # fmt: skip
    builder, dim = ARCHITECTURES[arch]
    net = builder()
    net.fc = nn.Identity()
    return net, dim


@dataclass(frozen=True)
class ClearEncoderSpec:
    """Registry entry of one slice encoder: pinned weights + architecture + preprocessing."""

    model_id: str
    arch: str
    weights: PinnedFile
    preprocessing: SlicePreprocessing = DEFAULT_PREPROCESSING
    implementation: str = ENCODER_IMPLEMENTATION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        """Width of one slice feature for this architecture (what the feature store and heads expect)."""
        return build_feature_dim(self.arch)

    def model_info(self) -> ModelInfo:
        """The encoder's identity for reports; the version includes a digest of the slice preprocessing it needs."""
        pre = hashlib.sha256(repr(sorted(self.preprocessing.to_json().items())).encode()).hexdigest()[:12]
        return ModelInfo(model_id=self.model_id, name=ENCODER_NAME,
                         version=f"{self.implementation} ({self.arch}, preprocessing {pre})",
                         sha256=self.weights.sha256)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The registry entry as plain JSON, the form the model manifest holds."""
        return {
            "model_id": self.model_id,
            "arch": self.arch,
            "weights": {"path": self.weights.path, "sha256": self.weights.sha256},
            "preprocessing": self.preprocessing.to_json(),
            "implementation": self.implementation,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> ClearEncoderSpec:
        """Read a manifest registry entry; relative weight paths resolve against ``base_dir``."""
        try:
            path = Path(data["weights"]["path"])
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            return cls(
                model_id=str(data["model_id"]),
                arch=str(data["arch"]),
                weights=PinnedFile(str(path), str(data["weights"].get("sha256", ""))),
                preprocessing=SlicePreprocessing.from_json(dict(data["preprocessing"])),
                implementation=str(data.get("implementation", ENCODER_IMPLEMENTATION)),
            )
        except (KeyError, TypeError) as exc:
            raise ModelError(f"malformed CLEAR encoder registry entry: missing {exc}", code="registry_invalid") from exc


def build_feature_dim(arch: str) -> int:
    """Feature width of a registered architecture; an unknown name is a clear model error."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown CLEAR slice-encoder architecture {arch!r}", code="model_unknown")
    return ARCHITECTURES[arch][1]


def save_encoder_checkpoint(path: str | Path, backbone: nn.Module, arch: str,
                            preprocessing: SlicePreprocessing, **meta: Any) -> str:  # fmt: skip
    """Write the Locus checkpoint layout; returns its SHA-256.  ``meta`` must be plain types."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "preprocessing": preprocessing.to_json(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()},
        "meta": dict(meta),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, p)
    return hashlib.sha256(p.read_bytes()).hexdigest()


class SliceEncoder:
    """A loaded encoder: slices in, float16 per-slice embeddings out (eval mode, no grad)."""

    def __init__(self, spec: ClearEncoderSpec, backbone: nn.Module, *, device: str = "cpu") -> None:
        self.spec = spec
        self.backbone = backbone.to(device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """``[S, 3, H, W]`` rendered slices in [0, 1] → ``[S, D]`` float16."""
        x = normalize(images, self.spec.preprocessing)
        out = []
        for a in range(0, x.shape[0], batch_size):
            t = torch.from_numpy(np.ascontiguousarray(x[a : a + batch_size])).to(self.device)
            out.append(self.backbone(t).float().cpu().numpy())
        feats = np.concatenate(out, axis=0) if out else np.zeros((0, self.spec.feature_dim), np.float32)
        if not np.isfinite(feats).all():
            raise ModelError("slice encoder produced non-finite features", code="model_output_invalid")
        if np.abs(feats).max(initial=0.0) > np.finfo(np.float16).max:
            raise ModelError("slice features overflow float16", code="model_output_invalid")
        return feats.astype(np.float16)

    def encode(self, stack: SliceStack, *, batch_size: int = 32) -> SliceFeatures:
        """Encode a rendered study into stored slice features, refusing slices rendered with other preprocessing."""
        if stack.preprocessing != self.spec.preprocessing:
            raise ModelError("slices were rendered with other preprocessing than this encoder's registry entry",
                             code="preprocessing_mismatch")  # fmt: skip
        return SliceFeatures(
            model_id=self.spec.model_id,
            features=self.embed(stack.images, batch_size=batch_size),
            z_mm=stack.z_mm.astype(np.float32),
            ct_index=stack.ct_source_index.astype(np.int32),
        )


#: Key of the CLEAR encoders in the deployment's model manifest (beside the localizers' ``"models"``).
MANIFEST_KEY = "clear_encoders"


def encoders_from_manifest(path: str | Path) -> dict[str, ClearEncoderSpec]:
    """The CLEAR encoder entries of a JSON model manifest (relative weight paths resolve beside it)."""
    import json

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read model registry {p.name}: {exc}", code="registry_invalid") from exc
    out: dict[str, ClearEncoderSpec] = {}
    for entry in data.get(MANIFEST_KEY, []):
        spec = ClearEncoderSpec.from_json(entry, p.parent)
        if spec.model_id in out and out[spec.model_id] != spec:
            raise ModelError(f"CLEAR encoder {spec.model_id!r} registered twice with different files",
                             code="registry_invalid")  # fmt: skip
        out[spec.model_id] = spec
    return out


def load_encoder(spec: ClearEncoderSpec, *, device: str = "cpu") -> SliceEncoder:
    """Verify the pinned file, read it weights-only, check it against ``spec``, load strictly."""
    pinned = spec.weights.verify()
    data = Path(pinned.path).read_bytes()
    state = load_torch_payload(data)
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{Path(pinned.path).name} is not a {CHECKPOINT_FORMAT} checkpoint", code="checkpoint_layout")
    if state.get("arch") != spec.arch:
        raise ModelError(f"checkpoint arch {state.get('arch')!r} differs from the registry entry's {spec.arch!r}",
                         code="checkpoint_layout")  # fmt: skip
    try:
        ckpt_pre = SlicePreprocessing.from_json(dict(state["preprocessing"]))
    except Exception as exc:
        raise ModelError(f"checkpoint preprocessing unreadable: {exc}", code="checkpoint_metadata") from exc
    if ckpt_pre != spec.preprocessing:
        raise ModelError("checkpoint preprocessing differs from the registry entry's", code="preprocessing_mismatch")
    sd = state.get("state_dict")
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError("checkpoint 'state_dict' is not a mapping of tensors", code="checkpoint_layout")
    backbone, _ = build_backbone(spec.arch)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in strip_module_prefix(sd).items()}
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        raise ModelError(f"encoder weights do not match {spec.arch}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shapes {shapes[:5]}", code="checkpoint_layout")  # fmt: skip
    backbone.load_state_dict(dict(sd), strict=True)
    spec = ClearEncoderSpec(spec.model_id, spec.arch, pinned, spec.preprocessing, spec.implementation)
    log.info("CLEAR slice encoder %s loaded: arch=%s sha256=%s", spec.model_id, spec.arch, pinned.sha256[:12])
    return SliceEncoder(spec, backbone, device=device)
