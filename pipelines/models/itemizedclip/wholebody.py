"""Locus's whole-body PET/CT ItemizedCLIP variants: the published architecture, PET and CT as two channels.

The published ItemizedCLIP weights are chest CT only (ItemizedCLIP, arXiv 2512.11141).  Locus trains
its own whole-body PET/CT model with **the same architecture** — HLIP trunk, open_clip head on
every token, the attention-pooling block with its null slot, BERT text tower, scalar logit
scale and bias (§1-§3) — changing only what the input requires:

* ``in_chans = 2``: channel 0 is PET (SUVbw), channel 1 is CT (HU), on one common grid;
* a whole-body field of view (see ``docs/models/itemizedclip-wholebody.md``).

Two variants, registered (trunk with timm, config with open_clip) by
:func:`register_variants`, which :func:`pipelines.models.itemizedclip.model.register_configs`
calls, so both build and load through exactly the published model's code path
(:func:`~pipelines.models.itemizedclip.model.load_model`, strict):

``LOCUS_WholeBody_PETCT_BiomedBERT_itemizedclip`` (full size)
    ViT-B trunk (768, 12 blocks, 12 heads, slice/study schedule of the chest model), 4 mm
    isotropic input 256 × 144 × 144 (z, y, x) = 1024 × 576 × 576 mm (skull base to
    mid-thigh of an adult, arms included), patch 8 × 12 × 12 → 32 × 12 × 12 = 4,608 tokens of
    32 × 48 × 48 mm; BiomedBERT-base text tower from a local directory, context 77.

``LOCUS_WholeBody_PETCT_demo_itemizedclip`` (CPU demo)
    the same trunk design at width 96 (4 blocks: slice, slice, study, slice; 4 heads),
    8 mm isotropic input 48 × 72 × 72 = 384 × 576 × 576 mm, patch 8 × 12 × 12 → 6 × 6 × 6 =
    216 tokens of 64 × 96 × 96 mm; CLIP embedding 64; a 2-layer BERT whose vocabulary is the
    phantom report templates' (shipped beside the weights).  Trains in minutes on a CPU;
    phantom accuracy only.

Preprocessing (:func:`preprocess_petct`): both series are resampled (trilinear) onto an
axis-aligned LPS grid of the variant's spacing and size, centred in-plane on the CT's
centre and in z on the centre of the PET/CT overlap; outside a series' field of view CT reads
−1000 HU and PET 0.  Normalisation: PET ``min(SUV, 20) / 10``, CT
``(clip(HU, −1000, 1000) + 1000) / 2000``.  The result is a
:class:`~pipelines.models.study_encoder.preprocess.PreparedInput`, so the token-grid geometry
(:class:`~pipelines.models.itemizedclip.geometry.TokenGrid`) maps maps back to patient LPS as
for the chest model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipelines.dicom.volume import Volume
from pipelines.errors import InputError
from pipelines.models.study_encoder import visual
from pipelines.models.study_encoder.preprocess import PreparedInput

WHOLEBODY_MODEL = "LOCUS_WholeBody_PETCT_BiomedBERT_itemizedclip"
DEMO_MODEL = "LOCUS_WholeBody_PETCT_demo_itemizedclip"
WHOLEBODY_TRUNK = "vit_base_wholebody_petct_h2_token4608"
DEMO_TRUNK = "vit_demo_wholebody_petct_h2_token216"
PREPROCESSING_VERSION = "locus-wholebody-petct-1"
CHANNELS = ("PT", "CT")  # input channel order

TRUNK_SPECS: dict[str, visual.HlipSpec] = {
    WHOLEBODY_TRUNK: visual.HlipSpec(
        img_size=(256, 144, 144), patch_size=(8, 12, 12), in_chans=2, max_num_scans=1,
        slice_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10), study_attn_indexes=(2, 5, 8, 11),
    ),
    DEMO_TRUNK: visual.HlipSpec(
        img_size=(48, 72, 72), patch_size=(8, 12, 12), in_chans=2, max_num_scans=1, embed_dim=96, depth=4,
        num_heads=4, slice_attn_indexes=(0, 1, 3), study_attn_indexes=(2,),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class PetCtParams:
    """The whole-body input grid and normalisation of one variant."""

    spacing_zyx_mm: tuple[float, float, float]
    size_zyx: tuple[int, int, int]
    suv_clip: float = 20.0
    suv_scale: float = 10.0
    hu_window: tuple[float, float] = (-1000.0, 1000.0)

    def to_json(self) -> dict[str, Any]:
        """Plain data for the checkpoint and manifest, so a release names its exact preprocessing."""
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {**plain, "version": PREPROCESSING_VERSION, "channels": list(CHANNELS)}


PARAMS: dict[str, PetCtParams] = {
    WHOLEBODY_MODEL: PetCtParams((4.0, 4.0, 4.0), TRUNK_SPECS[WHOLEBODY_TRUNK].img_size),
    DEMO_MODEL: PetCtParams((8.0, 8.0, 8.0), TRUNK_SPECS[DEMO_TRUNK].img_size),
}


def register_variants() -> None:
    """Register the whole-body trunks with timm (idempotent)."""
    for name, spec in TRUNK_SPECS.items():
        visual.register_hlip_variant(name, spec)


def sample_volume(volume: Volume, lps: np.ndarray, cval: float, order: int = 1) -> np.ndarray:
    """Samples of ``volume`` at LPS points ``[N, 3]``: trilinear (``order=1``) or nearest (0); ``cval`` outside."""
    from scipy import ndimage

    inv = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64))
    ijk = lps @ inv[:3, :3].T + inv[:3, 3]
    coords = ijk[:, ::-1].T  # array is [k, j, i]
    return ndimage.map_coordinates(np.asarray(volume.array, dtype=np.float32), coords, order=order, mode="constant",
                                   cval=cval, prefilter=False)  # fmt: skip


def grid_lps(params: PetCtParams, first_voxel_lps: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """LPS ``[D·H·W, 3]`` of every input voxel centre, row-major over ``(z, y, x)`` (the tensor's order)."""
    d, h, w = params.size_zyx
    sz, sy, sx = params.spacing_zyx_mm
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1) * np.array([sx, sy, sz]) + np.asarray(first_voxel_lps)


def _extent(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    shape = np.array(volume.array.shape[::-1], dtype=np.float64)  # (ni, nj, nk)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    lps = corners @ np.asarray(volume.affine)[:3, :3].T + np.asarray(volume.affine)[:3, 3]
    return lps.min(0), lps.max(0)


def preprocess_petct(pet_suv: Volume, ct: Volume, params: PetCtParams) -> PreparedInput:
    """PET (SUVbw) and CT (HU) → the variant's ``[1, 1, 2, D, H, W]`` input on an axis-aligned LPS grid."""
    if pet_suv.frame_of_reference_uid and ct.frame_of_reference_uid and \
            pet_suv.frame_of_reference_uid != ct.frame_of_reference_uid:
        raise InputError("PET and CT are in different frames of reference; register them first",
                         code="petct_frame_mismatch")  # fmt: skip
    ct_lo, ct_hi = _extent(ct)
    pet_lo, pet_hi = _extent(pet_suv)
    z_lo, z_hi = max(ct_lo[2], pet_lo[2]), min(ct_hi[2], pet_hi[2])
    if z_hi <= z_lo:
        raise InputError("PET and CT do not overlap along the body axis", code="petct_no_overlap")
    centre = np.array([(ct_lo[0] + ct_hi[0]) / 2, (ct_lo[1] + ct_hi[1]) / 2, (z_lo + z_hi) / 2])
    d, h, w = params.size_zyx
    sz, sy, sx = params.spacing_zyx_mm
    n = np.array([w, h, d], dtype=np.float64)
    spacing = np.array([sx, sy, sz])
    lo = centre - (n - 1) / 2 * spacing  # first voxel centre (x, y, z)
    lps = grid_lps(params, lo)
    lo_hu, hi_hu = params.hu_window
    hu = sample_volume(ct, lps, lo_hu).reshape(d, h, w)
    suv = sample_volume(pet_suv, lps, 0.0).reshape(d, h, w)
    pet_ch = np.clip(suv, 0.0, params.suv_clip) / params.suv_scale
    ct_ch = (np.clip(hu, lo_hu, hi_hu) - lo_hu) / (hi_hu - lo_hu)
    x = torch.from_numpy(np.stack([pet_ch, ct_ch]).astype(np.float32))[None, None]
    hi = lo + (n - 1) * spacing
    return PreparedInput(tensor=x, crop_lps_min=(float(lo[0]), float(lo[1]), float(lo[2])),
                         crop_lps_max=(float(hi[0]), float(hi[1]), float(hi[2])),
                         description={"preprocessing": params.to_json(),
                                      "centre_lps": [float(v) for v in centre]})  # fmt: skip
