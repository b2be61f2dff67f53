"""The shipped demo localizer: small, loads strictly, calibrated, and names the demo study's lesions."""

from __future__ import annotations

import pytest
import torch

from node.cli_demo import DEMO_LOCALIZER, demo_localizer_dir
from pipelines.models.localizer.model import Localizer
from training.data.phantom import phantom_record
from training.localizer.calibrate import lesion_queries

MAX_BYTES = 30 * 1024 * 1024


def test_demo_weights_are_shipped_and_small() -> None:
    assert demo_localizer_dir() == DEMO_LOCALIZER, f"{DEMO_LOCALIZER} incomplete: run `locus train demo-weights`"
    total = sum(p.stat().st_size for p in DEMO_LOCALIZER.rglob("*") if p.is_file())
    assert total < MAX_BYTES


def test_demo_weights_localize_the_demo_study() -> None:
    """node/demo_study is phantom seed 7, preset small: every lesion must get its phantom site."""
    torch.set_num_threads(1)
    if demo_localizer_dir() is None:
        pytest.fail(f"{DEMO_LOCALIZER} incomplete: run `locus train demo-weights`")
    loc = Localizer.load(DEMO_LOCALIZER / "coarse", DEMO_LOCALIZER / "fine",
                         DEMO_LOCALIZER / "anatomy_vocabulary_library.json",
                         DEMO_LOCALIZER / "augmented_location_descriptions.json")
    assert loc.temperatures is not None  # fitted by `locus train calibrate`, read from the checkpoints
    for stage in (loc.coarse, loc.fine):
        assert stage.net_name == "ClipText_BasicNet"
    record = phantom_record(7, "small")
    ct, suv, queries, kept = lesion_queries(record)
    outputs = loc.localize_images(ct, suv, queries)
    got = {record.lesions[i].lesion_id: o.final_label for i, o in zip(kept, outputs)}
    want = {les.lesion_id: les.hclal_locations for les in record.lesions}
    wrong = {k: (got[k], want[k]) for k in want if got.get(k) not in want[k]}
    assert not wrong, f"demo study lesions named wrongly (predicted, acceptable): {wrong}"
    assert all(o.calibrated_probability is not None and 0 < o.calibrated_probability <= 1 for o in outputs)
