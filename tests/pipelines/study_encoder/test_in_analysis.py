"""The HLIP study encoder inside the study analysis: embedding, zero-shot group in the SR, flags.

A tiny random-weight checkpoint in the published key layout and a toy BERT text directory
(``conftest.build_tiny_hlip``) run on the bundled whole-body phantom study (``node/demo_study``:
lungs of air density inside the body, 630 mm long, so the thorax crop is lung-centred).  With
random weights the scores are arbitrary; the test checks the wiring: the stage runs and is
timed, the SR carries a dciodvfy-clean study-level group with every finding of the prompt
set, its score and the configured thresholds' presence decisions, the model identity
(weights sha256) and the orientation/crop flags; a CT without lungs is a recorded flag, not
an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.cli_demo import SAMPLE_STUDY
from pipelines.analysis import AnalysisOptions, analyse_study
from pipelines.models.study_encoder import model as hm
from pipelines.sr.reader import read_measurement_report
from tests.helpers.dicomcheck import assert_dciodvfy_clean
from tests.pipelines.study_encoder.conftest import TINY_MODEL

THRESHOLDS = {"pleural_effusion": 0.5, "emphysema": 0.0, "cardiomegaly": 1.0}


@pytest.fixture(scope="module")
def encoder(tiny_dirs: dict[str, Path]) -> hm.StudyEncoder:
    return hm.StudyEncoder(hm.StudyEncoderConfig(
        checkpoint=tiny_dirs["checkpoint"], text_dir=tiny_dirs["text"], model_name=TINY_MODEL,
        config_dir=tiny_dirs["configs"], thresholds=THRESHOLDS,
    ))  # fmt: skip


def test_analysis_encodes_the_study_and_reports_findings(encoder: hm.StudyEncoder, tmp_path: Path) -> None:
    result = analyse_study([SAMPLE_STUDY], AnalysisOptions(study_encoder=encoder))

    enc = result.study_encoding
    assert enc is not None and result.lesions
    assert len(enc.embedding) == 16 and np.linalg.norm(enc.embedding) == pytest.approx(1.0, abs=1e-5)
    assert enc.model.sha256 == encoder.model_info.sha256 and enc.model in result.models
    assert {f.code for f in enc.flags} == {"hlip_orientation_unvalidated", "hlip_thorax_cropped"}
    assert "lung_centred" in enc.crop_description
    assert {"study_encoding", "study_encoding.preprocess", "study_encoding.forward"} <= set(result.timings_s)
    assert not any(f.code.startswith("study_encoding_") for f in result.flags)

    out = tmp_path / "sr.dcm"
    result.sr_dataset.save_as(out, enforce_file_format=True)
    assert_dciodvfy_clean(out)
    group = read_measurement_report(out).study_findings
    assert group is not None
    by_name = {f.finding.lower(): f for f in group.findings}
    assert len(group.findings) == len(encoder.prompts.findings) == len(enc.findings)
    for written in enc.findings:
        read = by_name[written.finding.lower()]
        assert read.score == pytest.approx(written.score, rel=1e-6)
        assert (read.threshold, read.present) == (written.threshold, written.present)
    scores = {f.finding: f.score for f in enc.findings}
    decided = {f.finding: f.present for f in enc.findings if f.present is not None}
    assert decided == {"Pleural effusion": scores["Pleural effusion"] > 0.5, "Emphysema": scores["Emphysema"] > 0.0,
                       "Cardiomegaly": False}  # fmt: skip
    assert group.algorithm is not None
    params = "\n".join(group.algorithm.parameters)
    assert encoder.model_info.sha256 in params and "preprocessing_version=" in params
    assert "prompt_set_version=" in params
    assert {f.code for f in group.flags} >= {"hlip_orientation_unvalidated", "hlip_thorax_cropped"}


def test_ct_without_lungs_is_a_flag_not_an_error(encoder: hm.StudyEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CT that does not cover the chest: lesions are still reported, the encoding is flagged."""
    from pipelines.models.study_encoder import thorax

    monkeypatch.setattr(thorax, "MIN_LUNG_ML", 1e9)  # no air volume qualifies as lungs
    result = analyse_study([SAMPLE_STUDY], AnalysisOptions(study_encoder=encoder))
    assert result.study_encoding is None and result.lesions and result.sr_dataset is not None
    flags = [f for f in result.flags if f.code == "study_encoding_not_chest"]
    assert len(flags) == 1 and "ct_not_chest" in flags[0].message


def test_study_without_seg_is_still_encoded(encoder: hm.StudyEncoder) -> None:
    """No SEG: nothing to measure and no SR, but the embedding makes the study searchable."""
    items = [p for p in SAMPLE_STUDY.rglob("*") if p.is_file() and "SEG" not in p.parts]
    result = analyse_study(items, AnalysisOptions(study_encoder=encoder))
    assert any(f.code == "no_seg" for f in result.flags) and result.sr_dataset is None
    assert result.study_encoding is not None and len(result.study_encoding.embedding) == 16


def test_study_without_seg_and_unusable_ct_stays_no_seg(encoder: hm.StudyEncoder,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Only the encoder needs the CT of a study without SEG: a CT that cannot be built is a flag."""
    import pipelines.analysis as analysis
    from pipelines.errors import GeometryError

    def refuse(*_a: object, **_k: object) -> None:
        raise GeometryError("slices overlap", code="overlapping_slices")

    monkeypatch.setattr(analysis, "build_volume_report", refuse)
    items = [p for p in SAMPLE_STUDY.rglob("*") if p.is_file() and "SEG" not in p.parts]
    result = analyse_study(items, AnalysisOptions(study_encoder=encoder))
    assert result.study_encoding is None and any(f.code == "no_seg" for f in result.flags)
    assert [f.message for f in result.flags if f.code == "study_encoding_skipped"] == [
        "no study embedding: the CT cannot be built: slices overlap [overlapping_slices]"]


def _node_settings(tiny_dirs: dict[str, Path], tmp_path: Path, **models: object):  # type: ignore[no-untyped-def]
    from node.settings import LocusSettings

    base = {"dir": str(tiny_dirs["root"]), "study_encoder_checkpoint": tiny_dirs["checkpoint"].name,
            "study_encoder_text_dir": "text", "study_encoder_config_dir": "configs",
            "study_encoder_model": TINY_MODEL, "device": "cpu"}  # fmt: skip
    return LocusSettings.load(None, storage={"data_dir": str(tmp_path)}, models={**base, **models})


def test_node_loads_the_configured_encoder_once(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from node.models import load_study_encoder
    from node.tasks.context import build_context

    ctx = build_context(_node_settings(tiny_dirs, tmp_path, study_encoder_thresholds={"emphysema": 0.4}))
    first = load_study_encoder(ctx)
    assert isinstance(first, hm.StudyEncoder) and first.config.thresholds == {"emphysema": 0.4}
    assert load_study_encoder(ctx) is first  # cached per process
    assert load_study_encoder(build_context(_node_settings(tiny_dirs, tmp_path / "n", study_encoder_checkpoint=None))) \
        is None  # fmt: skip


def test_node_encoder_misconfiguration_is_a_model_error(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from node.models import load_study_encoder
    from node.tasks.context import build_context
    from pipelines.errors import ModelError

    for models, code in (({"study_encoder_checkpoint": "missing.pt"}, "checkpoint_missing"),
                         ({"study_encoder_sha256": "0" * 64}, "model_hash_mismatch"),
                         ({"study_encoder_thresholds": {"not_a_finding": 0.5}}, "threshold_config")):  # fmt: skip
        ctx = build_context(_node_settings(tiny_dirs, tmp_path / code, **models))
        with pytest.raises(ModelError) as err:
            load_study_encoder(ctx)
        assert err.value.code == code
