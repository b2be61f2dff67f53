"""Phantom PET/CT studies with itemized reports, preprocessed for a whole-body ItemizedCLIP variant.

Each study: the two-channel input (:func:`pipelines.models.itemizedclip.wholebody.preprocess_petct`),
its itemized report (:mod:`training.phantom.reports`, the study's ground truth in words), the
normal flag (§8: the report is the single normal item), and the lesion label map sampled
(nearest) onto the input grid, for localisation metrics (pointing game: is the map's peak
inside the item's lesions?).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.models.itemizedclip import wholebody
from pipelines.models.study_encoder.preprocess import PreparedInput
from training.data.phantom import phantom_records
from training.phantom.reports import ItemizedReport


@dataclass(frozen=True)
class ItemizedStudy:
    study_id: str
    prepared: PreparedInput  # tensor [1, 1, 2, D, H, W]
    report: ItemizedReport
    lesion_labels: np.ndarray  # int16 [D, H, W] on the input grid (nearest), 0 = no lesion

    @property
    def normal(self) -> bool:
        return self.report.normal

    @property
    def image(self) -> torch.Tensor:
        """``[1, 2, D, H, W]`` (one scan) for batching into ``[B, 1, 2, D, H, W]``."""
        return self.prepared.tensor[0]


def phantom_studies(seeds: Sequence[int], params: wholebody.PetCtParams, *, size: str = "tiny",
                    n_lesions: int | None = None, lesion_free_fraction: float = 0.2,
                    grouping: str = "auto") -> list[ItemizedStudy]:  # fmt: skip
    """Generate, itemize and preprocess phantom ``seeds`` (deterministic per seed)."""
    out = []
    for rec in phantom_records(seeds, size, n_lesions=n_lesions, lesion_free_fraction=lesion_free_fraction,
                               grouping=grouping):  # fmt: skip
        assert rec.ct is not None and rec.report is not None
        prepared = wholebody.preprocess_petct(rec.suv, rec.ct, params)
        lps = wholebody.grid_lps(params, prepared.crop_lps_min)
        labels = wholebody.sample_volume(rec.labels, lps, 0.0, order=0).reshape(params.size_zyx)
        out.append(ItemizedStudy(rec.study_id, prepared, rec.report, np.rint(labels).astype(np.int16)))
    return out
