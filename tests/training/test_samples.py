"""Training crops are the inference crops: the bank's plain crop equals ``Localizer.stage_input``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pipelines.models.localizer.crop import CropGeometry
from pipelines.models.localizer.model import Localizer
from training.data.phantom import phantom_record
from training.localizer.calibrate import lesion_queries
from training.localizer.samples import CropBank, build_bank
from training.localizer.train import StageConfig


def test_bank_plain_crop_equals_inference_input(tmp_path: Path) -> None:
    record = phantom_record(7, "tiny")
    cfg = StageConfig("coarse", (16, 16, 16), (12.0, 12.0, 12.0))
    pre = cfg.preprocessing()
    bank = build_bank([record], {"coarse": pre}, crops_per_lesion=3, seed=0, progress=False)
    assert len(bank) == len(record.lesions) and tuple(bank.inputs["coarse"].shape) == (len(bank), 3, 3, 16, 16, 16)
    ct, suv, queries, _kept = lesion_queries(record)
    fake_loc = SimpleNamespace(compat=False)
    stage = SimpleNamespace(name="coarse", pre=pre, geometry=CropGeometry(pre.spacing, pre.crop_size))
    for row, q in enumerate(queries):
        want, _ = Localizer.stage_input(fake_loc, stage, ct, suv, q)  # type: ignore[arg-type]
        got = bank.inputs["coarse"][row, 0].float().numpy()
        assert np.allclose(got, want, atol=2e-3)  # float16 storage
        assert got[2].sum() > 0  # the lesion is in its own mask channel
        assert not np.allclose(bank.inputs["coarse"][row, 1].float().numpy(), want)  # crop 1 is augmented
    bank.save(str(tmp_path / "bank.pt"))
    again = CropBank.load(str(tmp_path / "bank.pt"))
    assert again.items == bank.items and torch.equal(again.inputs["coarse"], bank.inputs["coarse"])
