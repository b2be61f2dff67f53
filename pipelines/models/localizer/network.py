"""The HCL-AL ``ClipNet`` container: dispatch on ``state['net']`` and strict loading.

The published state dict (after removing ``module.``) has exactly three groups
(HCL-AL, Gao et al. 2025): ``image_encoder.*`` (100 keys for ResidualNet), ``text_encoder.*``
(149 keys, OpenAI CLIP text tower) and the scalar ``logit_scale``; ``ClipText_Fc_BasicNet``
adds ``text_fc.*``.  :class:`HclalClipNet` has those attribute names, so the whole dict
loads with ``strict=True``: a renamed, missing or extra tensor is a :class:`ModelError`,
never a silently random layer.

``logit_scale`` is kept for calibration reports only; scoring uses the reference's fixed
scale of 100 (bug B12).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from pipelines.errors import ModelError
from pipelines.models.checkpoints import HclalCheckpoint
from pipelines.models.localizer.encoder3d import BasicNet3D, ResidualNet3D
from pipelines.models.text import TextTowerConfig, build_text_tower

#: net name → (image encoder class, has trainable text_fc)
SUPPORTED_NETS: dict[str, tuple[type[nn.Module], bool]] = {
    "ClipText_ResidualNet": (ResidualNet3D, False),
    "ClipText_BasicNet": (BasicNet3D, False),
    "ClipText_BasicNet_HardNegSample": (BasicNet3D, False),
    "ClipText_BasicNet_SemiHardNegSample": (BasicNet3D, False),
    "ClipText_Fc_BasicNet": (BasicNet3D, True),
}
#: nets HCL-AL defines that Locus does not implement (DenseNet is cubic-only, BERT nets need HF weights)
UNSUPPORTED_NETS = ("ClipText_DenseNet", "ClipText_ViT", "PubMedBERT_BasicNet", "BioMedBERT_BasicNet")


class HclalClipNet(nn.Module):
    """Image encoder + CLIP text tower (+ optional ``text_fc``) under the published names."""

    def __init__(
        self,
        net: str,
        in_channels: int,
        crop_size: tuple[int, int, int],
        text_cfg: TextTowerConfig,
        num_features: int | None = None,
    ) -> None:
        super().__init__()
        if net not in SUPPORTED_NETS:
            hint = " (defined by HCL-AL but not implemented in Locus)" if net in UNSUPPORTED_NETS else ""
            raise ModelError(f"unsupported HCL-AL network {net!r}{hint}", code="checkpoint_net_unsupported")
        encoder_cls, has_text_fc = SUPPORTED_NETS[net]
        self.net_name = net
        features = num_features or text_cfg.output_dim
        self.text_encoder = build_text_tower(text_cfg)
        self.context_length: int = text_cfg.context_length  # the text tower's, typed (not a state-dict entry)
        self.image_encoder = encoder_cls(in_channels, crop_size, features)
        self.text_fc = nn.Linear(text_cfg.output_dim, features) if has_text_fc else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image features of a crop batch."""
        return self.image_encoder(x)


def _text_subdict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("text_encoder.") :]: v for k, v in sd.items() if k.startswith("text_encoder.")}


def build_network(ckpt: HclalCheckpoint, *, heads: int | None = None, share_weights: bool = False) -> HclalClipNet:
    """Construct the network described by ``ckpt`` and load every tensor strictly (CPU, eval).

    Why no random initialisation: the strict load overwrites every parameter and persistent
    buffer, so the modules are built on the ``meta`` device (shapes only) and the checkpoint's
    tensors are assigned (``load_state_dict(strict=True, assign=True)``).  For full-size
    weights this saves ~1.5 s of ``normal_``/``uniform_`` calls per start; the loaded values
    are the same.  ``share_weights=True`` makes the network use the checkpoint's tensors
    without copying them (callers that never train the network, like the localizer);
    otherwise they are cloned, so training the network leaves ``ckpt`` unchanged.
    """
    sd = ckpt.state_dict
    text_cfg = TextTowerConfig.from_state_dict(_text_subdict(sd), heads)
    fc = sd.get("image_encoder.fc.weight")
    if fc is None:
        raise ModelError("checkpoint has no image_encoder.fc.weight", code="checkpoint_layout")
    pre = ckpt.preprocessing
    try:
        with torch.device("meta"):
            model = HclalClipNet(ckpt.net, pre.input_channel, pre.crop_size, text_cfg, num_features=int(fc.shape[0]))
    except ValueError as exc:
        raise ModelError(str(exc), code="checkpoint_layout") from exc
    # Cast to the module's dtypes (as copy_ into the parameters would) and keep the usual layout.
    want = model.state_dict()
    tensors = {}
    for k, v in sd.items():
        t = v.to(want[k].dtype) if k in want and v.dtype != want[k].dtype else v
        t = t.contiguous()
        tensors[k] = t if share_weights or t is not v else t.clone()
    load_strict(model, tensors, assign=True)
    _materialise_derived_buffers(model)
    return model.eval()


def _materialise_derived_buffers(model: HclalClipNet) -> None:
    """Rebuild, on CPU, the non-persistent buffers (not in any state dict) left on ``meta``.

    The only one is the text tower's causal ``attn_mask`` (open_clip's ``build_causal_mask``,
    a function of the context length).  Anything else left on ``meta`` is a layout Locus
    does not know and is refused rather than run.
    """
    tower = model.text_encoder
    mask = getattr(tower, "attn_mask", None)
    if isinstance(mask, torch.Tensor) and mask.is_meta:
        tower.attn_mask = tower.build_causal_mask()  # type: ignore[operator]
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"network tensors not set by the checkpoint: {left[:5]}", code="checkpoint_layout")


def load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with a readable :class:`ModelError` on any mismatch."""
    try:
        model.load_state_dict(dict(sd), strict=True, assign=assign)
    except RuntimeError as exc:
        raise ModelError(
            f"checkpoint tensors do not match the network layout: {str(exc)[:600]}", code="checkpoint_layout"
        ) from exc
