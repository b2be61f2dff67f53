"""Does this CT cover the chest, and where should the HLIP chest field of view go?

The CT-RATE model was trained on diagnostic chest CTs centre-cropped to a 336 mm slab
(hlip-compat §9).  A PET/CT CT is usually whole-body: a blind centre crop would land on the
abdomen.  Locus therefore

* finds the lungs from geometry (air-density voxels inside the body, the largest internal
  air components, on a coarse grid) — robust to unreliable ``BodyPartExamined`` values,
  which on PET/CT are often ``WHOLEBODY``, empty or vendor text;
* keeps the **published centre crop** when the CT is chest-length (≤ ``max_chest_extent_mm``
  in z), so diagnostic chest CTs are processed exactly as upstream;
* otherwise centres the published input field of view (112 × 3 mm = 336 mm in z,
  336 × 336 mm in-plane) on the lungs' bounding box, and records that choice.

``BodyPartExamined`` (0018,0015; PS3.16 CID 4031 defined terms) is recorded and used only as
a tie-breaker: a CT without detectable lungs is not encoded whatever its tag says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipelines.dicom.volume import Volume
from pipelines.models.study_encoder.preprocess import CanonicalCt, canonicalize

CHEST_TAGS = frozenset({"CHEST", "THORAX", "LUNG", "HEART", "BREAST", "CHESTABDOMEN", "CHESTABDPELVIS",
                        "CHEST_ABDOMEN", "CHEST_ABDOMEN_PELVIS", "WHOLEBODY", "WHOLE_BODY", "WB", "TORSO",
                        "BODY", "TRUNK"})  # fmt: skip

AIR_HU = -400.0  # lung parenchyma ≈ −850 HU; soft tissue > −100 HU
MIN_LUNG_ML = 300.0
MIN_LUNG_EXTENT_MM = 60.0


@dataclass(frozen=True)
class ThoraxSelection:
    """How the chest crop was placed in a CT, and why."""
    covers_chest: bool
    mode: str  # "published_centre" | "lung_centred" | "not_chest"
    centre_lps: tuple[float | None, float | None, float | None]  # None: centre crop on that axis
    lung_z_range_mm: tuple[float, float] | None
    lung_volume_ml: float
    scan_z_extent_mm: float
    body_part_examined: str | None
    reason: str

    def describe(self) -> str:
        """The selection in words, for the report notes."""
        parts = [f"chest field of view: {self.mode}", self.reason]
        if self.body_part_examined:
            parts.append(f"BodyPartExamined={self.body_part_examined}")
        return "; ".join(parts)


def _internal_air(ct: CanonicalCt, step: tuple[int, int, int]) -> np.ndarray:
    """Air-density voxels not connected (in their axial slice) to the image border."""
    low = ct.array[:: step[0], :: step[1], :: step[2]] < AIR_HU
    out = np.zeros_like(low)
    for k in range(low.shape[0]):
        lab, n = ndimage.label(low[k])
        if n == 0:
            continue
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        keep = np.ones(n + 1, dtype=bool)
        keep[border] = False
        keep[0] = False
        out[k] = keep[lab]
    return out


def select_thorax(volume: Volume, body_part_examined: str | None = None, *,
                  max_chest_extent_mm: float = 400.0) -> ThoraxSelection:  # fmt: skip
    """Find the lungs and choose the chest crop (see module docstring)."""
    ct = canonicalize(volume)
    sz, sy, sx = ct.spacing_zyx
    step = (max(1, int(round(5.0 / sz))), max(1, int(round(4.0 / sy))), max(1, int(round(4.0 / sx))))
    cell = (sz * step[0], sy * step[1], sx * step[2])
    extent_z = ct.array.shape[0] * sz
    tag = (body_part_examined or "").strip().upper() or None
    air = _internal_air(ct, step)
    lab, n = ndimage.label(air)
    lung_ml = 0.0
    zr: tuple[float, float] | None = None
    centre: tuple[float | None, float | None, float | None] = (None, None, None)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        big = np.flatnonzero(sizes >= 0.3 * sizes.max()) + 1  # both lungs when they are separate
        lungs = np.isin(lab, big)
        lung_ml = float(lungs.sum() * np.prod(cell) / 1000.0)
        area = lungs.sum(axis=(1, 2))
        slices = np.flatnonzero(area >= 0.1 * area.max())
        z0, z1 = (float(ct.origin_lps[2] + s * cell[0]) for s in (slices[0], slices[-1]))
        zr = (z0, z1)
        ys, xs = np.nonzero(lungs[slices[0] : slices[-1] + 1].any(axis=0))
        cy = ct.origin_lps[1] + (ys.min() + ys.max()) / 2 * cell[1]
        cx = ct.origin_lps[0] + (xs.min() + xs.max()) / 2 * cell[2]
        centre = (float(cx), float(cy), (z0 + z1) / 2)
    found = zr is not None and lung_ml >= MIN_LUNG_ML and (zr[1] - zr[0]) >= MIN_LUNG_EXTENT_MM
    if not found:
        why = f"no lungs detected (internal air {lung_ml:.0f} mL)"
        if tag in CHEST_TAGS:
            why += f" although BodyPartExamined is {tag}"
        return ThoraxSelection(False, "not_chest", (None, None, None), zr, lung_ml, extent_z, tag, why)
    assert zr is not None
    lung_txt = f"lungs z {zr[0]:.0f}..{zr[1]:.0f} mm ({lung_ml:.0f} mL), scan length {extent_z:.0f} mm"
    if extent_z <= max_chest_extent_mm:
        return ThoraxSelection(True, "published_centre", (None, None, None), zr, lung_ml, extent_z, tag,
                               f"chest-length CT: published centre crop; {lung_txt}")  # fmt: skip
    return ThoraxSelection(True, "lung_centred", centre, zr, lung_ml, extent_z, tag,
                           f"CT longer than {max_chest_extent_mm:.0f} mm: 336 mm slab centred on the lungs; {lung_txt}")  # fmt: skip
