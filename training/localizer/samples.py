"""Lesion inputs for training, built with the inference crop code so train and inference agree.

An unaugmented sample is produced by exactly the calls ``Localizer.stage_input`` makes in
corrected mode (``crop_around`` for CT and SUV, ``corrected_mask_channel`` for the lesion,
``normalize`` per channel, all from :mod:`pipelines.models.localizer`).  Augmented samples
resample the same channels onto a rotated/scaled grid (:mod:`.augment`); the mask channel
repeats the corrected-mode rule (nearest neighbour; if the lesion vanishes, re-crop at half
spacing and double size, dilate by one voxel with 6-connectivity, bring it back), so a tiny
lesion is never silently dropped from a training crop.

:class:`CropBank` precomputes ``K`` crops per lesion and stage (crop 0 unaugmented) as
float16, which makes CPU training affordable: SimpleITK resampling runs once, not per step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from tqdm import tqdm

from pipelines.models.checkpoints import Preprocessing
from pipelines.models.localizer.crop import CropGeometry, as_float32, crop_around, normalize, to_xyz
from pipelines.models.localizer.lesion_mask import corrected_mask_channel, exact_box
from training.data.records import LesionRecord, StudyRecord
from training.localizer.augment import Augmentation, AugmentationConfig, crop_grid, sample_augmentation

log = logging.getLogger(__name__)

_INTERP = {"linear": sitk.sitkLinear, "nn": sitk.sitkNearestNeighbor}
_CC6 = ndimage.generate_binary_structure(3, 1)


def _resample(image: sitk.Image, origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float],
              size: Sequence[int], interpolation: str) -> np.ndarray:
    f = sitk.ResampleImageFilter()
    f.SetSize([int(n) for n in size])
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputOrigin([float(o) for o in origin])
    f.SetOutputDirection([float(d) for d in direction])
    f.SetInterpolator(_INTERP[interpolation])
    f.SetDefaultPixelValue(0.0)  # B4: 0 outside the scan, as at inference
    return to_xyz(f.Execute(image))


def _augmented_mask(lesion: sitk.Image, centre: Sequence[float], geom: CropGeometry, aug: Augmentation,
                    interpolation: str) -> np.ndarray:
    origin, spacing, direction = crop_grid(centre, geom.spacing, geom.size, aug)
    values = _resample(lesion, origin, spacing, direction, geom.size, interpolation) > 0.5
    if values.any():
        return values.astype(np.float32)
    half_sp = tuple(s / 2 for s in spacing)
    double = tuple(2 * n for n in geom.size)
    fine = _resample(lesion, origin, half_sp, direction, double, interpolation) > 0.5
    if not fine.any():
        return np.zeros(tuple(geom.size), dtype=np.float32)
    grown = ndimage.binary_dilation(fine, structure=_CC6).astype(np.uint8)
    img = sitk.GetImageFromArray(grown.transpose(2, 1, 0).copy())
    img.SetOrigin(origin)
    img.SetSpacing(half_sp)
    img.SetDirection(direction)
    return (_resample(img, origin, spacing, direction, geom.size, "nn") > 0.5).astype(np.float32)


def lesion_input(pre: Preprocessing, ct: sitk.Image, suv: sitk.Image, lesion: sitk.Image,
                 centre: Sequence[float], aug: Augmentation | None = None) -> np.ndarray:
    """Normalised ``[3, X, Y, Z]`` float32 input of one lesion (``lesion``: its binary mask)."""
    geom = CropGeometry(pre.spacing, pre.crop_size)
    if aug is None or aug.is_identity:
        chans = [to_xyz(crop_around(ct, centre, geom, pre.interpolation[0], compat=False)),
                 to_xyz(crop_around(suv, centre, geom, pre.interpolation[1], compat=False)),
                 corrected_mask_channel(lesion, centre, geom, pre.interpolation[2]).values]
    else:
        origin, spacing, direction = crop_grid(centre, geom.spacing, geom.size, aug)
        chans = [_resample(ct, origin, spacing, direction, geom.size, pre.interpolation[0]),
                 _resample(suv, origin, spacing, direction, geom.size, pre.interpolation[1]),
                 _augmented_mask(lesion, centre, geom, aug, pre.interpolation[2])]
    return np.stack([normalize(c, n) for c, n in zip(chans, pre.normalizers)])


@dataclass(frozen=True)
class LesionItem:
    """One lesion of a bank: where it came from and its ground truth."""

    study_id: str
    record: LesionRecord
    centre: tuple[float, float, float]
    size: tuple[float, float, float]


def _record_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved ``LesionRecord.__dict__`` with its tuples back (``torch.save`` keeps lists as lists)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


@dataclass
class CropBank:
    """``inputs[stage]``: float16 ``[N, K, 3, X, Y, Z]``; crop 0 of each lesion is unaugmented."""

    items: list[LesionItem]
    inputs: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, stage: str, lesions: Sequence[int], crops: Sequence[int]) -> torch.Tensor:
        x = self.inputs[stage]
        return x[torch.as_tensor(list(lesions)), torch.as_tensor(list(crops))].float()

    def save(self, path: str) -> None:
        torch.save({"items": [(i.study_id, i.record.__dict__, i.centre, i.size) for i in self.items],
                    "inputs": self.inputs}, path)

    @classmethod
    def load(cls, path: str) -> CropBank:
        d = torch.load(path, map_location="cpu", weights_only=True)
        items = [LesionItem(s, LesionRecord(**_record_fields(r)), tuple(c), tuple(z)) for s, r, c, z in d["items"]]
        return cls(items, d["inputs"])


def study_images(record: StudyRecord) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    if record.ct is None:
        raise ValueError(f"study {record.study_id} has no CT; the localizer's first channel is CT")
    return as_float32(record.ct.to_sitk()), as_float32(record.suv.to_sitk()), record.labels.to_sitk()


def build_bank(records: Sequence[StudyRecord], stages: dict[str, Preprocessing], *, crops_per_lesion: int,
               seed: int, aug_cfg: AugmentationConfig = AugmentationConfig(),  # noqa: B008  # frozen dataclass
               progress: bool = True,
               require_truth: bool = True) -> CropBank:
    """Crop every lesion ``crops_per_lesion`` times per stage (seeded per study and lesion)."""
    items: list[LesionItem] = []
    per_stage: dict[str, list[np.ndarray]] = {s: [] for s in stages}
    for si, rec in enumerate(tqdm(records, desc="crops", unit="study", disable=not progress)):
        ct, suv, labels = study_images(rec)
        for li, les in enumerate(rec.lesions):
            if require_truth and not les.hclal_locations:
                continue
            lesion = sitk.Cast(labels == les.label, sitk.sitkUInt8)
            box = exact_box(lesion, 1)
            if box is None:
                log.warning("study %s lesion %s: label %d absent from the label map", rec.study_id, les.lesion_id,
                            les.label)
                continue
            rng = np.random.default_rng([seed, si, li])
            augs = [Augmentation()] + [sample_augmentation(rng, aug_cfg) for _ in range(crops_per_lesion - 1)]
            for stage, pre in stages.items():
                per_stage[stage].append(np.stack([lesion_input(pre, ct, suv, lesion, box.centre, a) for a in augs]))
            items.append(LesionItem(rec.study_id, les, box.centre, box.size))
    inputs = {s: torch.from_numpy(np.stack(v)).half() if v else torch.zeros(0) for s, v in per_stage.items()}
    return CropBank(items, inputs)
