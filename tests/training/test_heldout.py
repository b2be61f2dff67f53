"""Held-out evaluation: the fixed spec, the study bootstrap (known answers) and lesions outside the vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.dicom.volume import Volume
from pipelines.models.localizer.vocabulary import Vocabulary
from training.data.phantom import phantom_study_id
from training.data.records import LesionRecord, StudyRecord
from training.localizer.evaluate import (
    NO_HCLAL_REGION,
    GroundTruth,
    Outcome,
    Prediction,
    outcome_from_json,
    outcome_to_json,
    reliability,
    summarize,
    truths_of,
)
from training.localizer.heldout import SPEC_PATH, bootstrap_intervals, load_eval_spec, with_intervals
from training.localizer.pipeline import DEMO_STUDY_SEED, PRESETS
from training.phantom.generate import PRESETS as PHANTOM_PRESETS

REPO = Path(__file__).resolve().parents[2]


def outcome(study: str, i: int, right: bool, conf: float = 0.9, *, region: str = "Chest",
            in_vocabulary: bool = True, coarse_right: bool | None = None) -> Outcome:
    box = np.array([0.0, 0, 0, 10, 10, 10])
    truth = GroundTruth(study, f"{study}:{i}", box, ("Mediastinum 4R",), ("Mediastinum",), region, "site",
                        in_vocabulary)
    coarse_right = right if coarse_right is None else coarse_right
    pred = Prediction(study, box, "Mediastinum 4R" if right else "Esophagus", ("Esophagus", "Mediastinum 4R"),
                      ("Mediastinum" if coarse_right else "Left lung", "Mediastinum"), conf)
    return Outcome(truth, pred, 1.0)


# -- the spec ------------------------------------------------------------------------------------------
def test_spec_test_seeds_chose_nothing_and_hold_enough_lesions() -> None:
    """The test seeds overlap no seed any preset trains, calibrates or validates on, nor the demo study."""
    spec = load_eval_spec()
    test, val = spec.sets["test"], spec.sets["validation"]
    assert test.role == "test" and val.role == "validation"
    used = {DEMO_STUDY_SEED}
    for make in PRESETS.values():
        s = make(0)
        for split in (s.train, s.val, s.test):
            used |= set(range(*split.seeds))
    assert not used & set(test.all_seeds())
    # the old README "test" seeds chose the demo recipe: they are the validation set now
    assert set(range(*PRESETS["demo"](0).test.seeds)) == set(range(*val.seeds))
    assert test.min_lesions >= 1000
    assert len(test.all_seeds()) * PHANTOM_PRESETS[test.size].n_lesions >= test.min_lesions
    assert spec.bootstrap.resamples >= 2000 and spec.bootstrap.level == 0.95


def test_malformed_spec_is_refused(tmp_path: Path) -> None:
    d = json.loads(SPEC_PATH.read_text())
    d["sets"]["test"]["seeds"] = [5, 5]
    (tmp_path / "s.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="empty seed range"):
        load_eval_spec(tmp_path / "s.json")
    d = json.loads(SPEC_PATH.read_text())
    d["bootstrap"]["unit"] = "lesion"
    (tmp_path / "s.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="resamples studies"):
        load_eval_spec(tmp_path / "s.json")


# -- bootstrap -----------------------------------------------------------------------------------------
def test_bootstrap_of_a_perfect_set_is_a_point() -> None:
    outs = [outcome(f"s{k}", i, True, conf=1.0) for k in range(5) for i in range(3)]
    ci = bootstrap_intervals(outs, resamples=500, seed=1)
    for key in ("final_top1", "final_top3", "coarse_top1", "coarse_top3"):
        assert ci[key] == [1.0, 1.0]
    assert ci["ece"] == [0.0, 0.0]


def test_bootstrap_resamples_studies_not_lesions() -> None:
    """Two studies of 10 lesions, one all right, one all wrong: resampled means are 0, 0.5 or 1 (p = 1/4, 1/2,
    1/4), so the 95 % interval is [0, 1]; resampling the 20 lesions would give about [0.3, 0.7]."""
    outs = [outcome("A", i, True) for i in range(10)] + [outcome("B", i, False) for i in range(10)]
    ci = bootstrap_intervals(outs, resamples=2000, seed=7)
    assert ci["final_top1"] == [0.0, 1.0]
    assert ci["final_top3"] == [1.0, 1.0]  # the right answer is in the top 3 of every lesion


def test_bootstrap_is_deterministic_and_matches_a_naive_loop() -> None:
    """Same seed, same interval; and the vectorised sums give what summarize/reliability give per resample."""
    rng = np.random.default_rng(3)
    outs = [outcome(f"s{k}", i, bool(rng.random() < 0.7), conf=float(rng.uniform(0.2, 1.0)),
                    coarse_right=bool(rng.random() < 0.8))
            for k in range(7) for i in range(int(rng.integers(1, 6)))]
    a = bootstrap_intervals(outs, resamples=300, seed=11)
    assert a == bootstrap_intervals(outs, resamples=300, seed=11)
    # naive: the same study draws, each resample summarised by the evaluation's own functions
    studies = list(dict.fromkeys(o.truth.study_id for o in outs))
    picks = np.random.default_rng(11).integers(0, len(studies), size=(300, len(studies)))
    by = {s: [o for o in outs if o.truth.study_id == s] for s in studies}
    vals: dict[str, list[float]] = {k: [] for k in ("final_top1", "coarse_top1", "ece")}
    for row in picks:
        sample = [o for j in row for o in by[studies[j]]]
        m = summarize(sample)
        vals["final_top1"].append(m["final_top1"])
        vals["coarse_top1"].append(m["coarse_top1"])
        vals["ece"].append(reliability(sample)["ece"])
    for key, v in vals.items():
        assert np.allclose(a[key], np.quantile(v, [0.025, 0.975]), atol=1e-12), key


def test_intervals_per_region_and_for_nameable_lesions() -> None:
    outs = ([outcome(f"s{k}", 0, True, region="Chest") for k in range(4)]
            + [outcome(f"s{k}", 1, False, region="Neck", in_vocabulary=False) for k in range(4)])
    m = with_intervals(outs, load_eval_spec().bootstrap, confidence="calibrated probability")
    assert m["n"] == 8 and m["studies"] == 4 and m["outside_vocabulary"] == 4
    assert m["per_region"]["Neck"]["outside_vocabulary"] == 4
    assert m["per_region"]["Neck"]["intervals"]["final_top1"] == [0.0, 0.0]
    assert m["nameable"]["n"] == 4 and m["nameable"]["final_top1"] == 1.0
    assert m["intervals"]["final_top1"] == [0.5, 0.5]  # every study has one right and one wrong lesion


# -- lesions outside the vocabulary ---------------------------------------------------------------------
def _record(lesions: list[LesionRecord]) -> StudyRecord:
    labels = np.zeros((12, 12, 12), dtype=np.int16)
    labels[2:4, 2:4, 2:4] = 1
    labels[6:8, 6:8, 6:8] = 2
    labels[9:11, 2:4, 6:8] = 3
    vol = Volume(labels, np.diag([4.0, 4.0, 4.0, 1.0]))
    suv = Volume(np.zeros((12, 12, 12), dtype=np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    return StudyRecord("st", suv, None, vol, lesions)


def test_lesions_outside_the_vocabulary_are_counted_in_their_own_region(vocab: Vocabulary) -> None:
    rec = _record([
        LesionRecord("in", 1, ("liver_s7",), ("Liver S7",), ("Liver",)),
        LesionRecord("neck", 2, ("neck_level_ii_left",), ("Left neck",), ("Left neck",)),  # real HCL-AL name
        LesionRecord("nohclal", 3, ("some_site",), (), ()),  # no HCL-AL name at all
        LesionRecord("novoxel", 4, ("liver_s1",), ("Liver S1",), ("Liver",)),  # label 4 is not in the map
    ])
    truths, no_voxels = truths_of([rec], vocab)
    by = {t.lesion_id: t for t in truths}
    assert no_voxels == ["novoxel"]
    assert by["in"].in_vocabulary and by["in"].region == "Abdomen"
    assert not by["neck"].in_vocabulary and by["neck"].region == "Neck"  # crosswalk region, not dropped
    assert not by["nohclal"].in_vocabulary and by["nohclal"].region == NO_HCLAL_REGION
    preds = [Prediction("st", t.box, "Liver S7", ("Liver S7",), ("Liver",), 0.8) for t in truths]
    outs = [Outcome(t, p, 1.0) for t, p in zip(truths, preds)]
    m = summarize(outs)
    assert m["n"] == 3 and m["outside_vocabulary"] == 2 and m["final_top1"] == pytest.approx(1 / 3)
    assert m["nameable"]["n"] == 1 and m["nameable"]["final_top1"] == 1.0
    assert {c["truth"]: c["count"] for c in m["outside_vocabulary_sites"]} == {
        "Left neck": 1, "(no HCL-AL name: some_site)": 1}
    assert outcome_from_json(json.loads(json.dumps(outcome_to_json(outs[1])))).truth.in_vocabulary is False


# -- the CLI on a real release --------------------------------------------------------------------------
def test_cli_evaluate_spec_scores_the_shipped_release(tmp_path: Path) -> None:
    """`locus train evaluate --spec` on the shipped demo localizer, with a one-study spec; resumes by study."""
    from training.localizer.cli import train

    release = tmp_path / "release"
    shutil.copytree(REPO / "node" / "demo_localizer", release)
    d = json.loads(SPEC_PATH.read_text())
    d["sets"] = {"one": {**d["sets"]["validation"], "seeds": [DEMO_STUDY_SEED, DEMO_STUDY_SEED + 1],
                         "extra_seeds": [], "min_lesions": 5},
                 "big": {**d["sets"]["test"], "seeds": [DEMO_STUDY_SEED, DEMO_STUDY_SEED + 1], "min_lesions": 1000}}
    d["bootstrap"]["resamples"] = 200
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(d))
    work = tmp_path / "work"
    args = ["evaluate", "--out", str(release), "--work", str(work), "--spec-file", str(spec), "--no-progress"]
    res = CliRunner().invoke(train, [*args, "--spec", "one"])
    assert res.exit_code == 0, res.output
    m = json.loads((release / "evaluation_one.json").read_text())
    assert m["n"] == 5 and m["studies"] == 1 and m["final_top1"] == 1.0  # the demo study (as in test_demo_weights)
    assert m["intervals"]["final_top1"] == [1.0, 1.0] and m["set"]["role"] == "validation"
    assert "perfect segmentation, not detection" in m["naming"] and "VALIDATION" in m["label"]
    assert "outside the model vocabulary: 0 lesions" in res.output
    lines = (work / "outcomes_one.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["study_id"] == phantom_study_id(DEMO_STUDY_SEED, "small", "natural")
    assert (work / "report_one" / "index.html").is_file()
    again = CliRunner().invoke(train, [*args, "--spec", "one"])  # resumes: nothing scored twice
    assert again.exit_code == 0 and (work / "outcomes_one.jsonl").read_text().splitlines() == lines
    # a set smaller than its spec's minimum is refused with the counts, and an unknown set is named
    small = CliRunner().invoke(train, [*args, "--spec", "big"])
    assert small.exit_code == 1 and "holds 5 lesions" in small.output and "at least 1000" in small.output
    unknown = CliRunner().invoke(train, [*args, "--spec", "nope"])
    assert unknown.exit_code == 2 and "big, one" in unknown.output


# -- what the README and the model card print --------------------------------------------------------------
def test_model_card_reports_test_figures_with_intervals_and_labels_validation(tmp_path: Path) -> None:
    from training.localizer.heldout import spec_role
    from training.localizer.pipeline import accuracy_markdown

    spec = load_eval_spec()
    outs = ([outcome(f"s{k}", 0, k % 4 != 0, region="Chest") for k in range(8)]
            + [outcome(f"s{k}", 1, False, region="Neck", in_vocabulary=False) for k in range(2)])
    test = {**with_intervals(outs, spec.bootstrap, confidence="calibrated probability"), "no_voxels": 0,
            "set": {**spec.sets["test"].__dict__, "seeds": list(spec.sets["test"].seeds)}, "spec_version": spec.version}
    run_metrics = {**summarize(outs), "label": "PHANTOM accuracy", "test": {"seeds": [30000, 30040]}}
    fallback = accuracy_markdown(tmp_path, run_metrics)
    assert "No test-set figures yet" in fallback and "perfect segmentation, not detection" in fallback
    (tmp_path / "evaluation_test.json").write_text(json.dumps(test))
    card = accuracy_markdown(tmp_path, run_metrics)
    assert "Test set (chose nothing)" in card and "seeds 50000-50239" in card
    assert f"**{100 * test['final_top1']:.1f} % [" in card  # the headline carries its interval
    assert "| Neck | 2 | 2 |" in card and "2 lesions lie in sites the\nmodel's vocabulary cannot name" in card
    assert "perfect segmentation, not detection" in card and "2,000 bootstrap" in card
    assert "Validation set" not in card
    (tmp_path / "evaluation_validation.json").write_text(json.dumps(
        {**test, "set": {**test["set"], "seeds": [30000, 30040], "extra_seeds": [7]}}))
    assert "**Validation set** (chose the recipe" in accuracy_markdown(tmp_path, run_metrics)
    assert spec_role((30000, 30040)) == "validation" and spec_role((50000, 50240)) == "test"
    assert spec_role((10000, 10200)) is None


def test_shipped_figures_are_the_test_set_evaluation() -> None:
    """README and model card quote node/demo_localizer/evaluation_test.json, scored on the spec's test set."""
    from training.localizer.heldout import headline_markdown
    from training.localizer.pipeline import accuracy_markdown

    spec = load_eval_spec()
    release = REPO / "node" / "demo_localizer"
    test = json.loads((release / "evaluation_test.json").read_text())
    val = json.loads((release / "evaluation_validation.json").read_text())
    assert test["set"]["seeds"] == list(spec.sets["test"].seeds) and test["spec_version"] == spec.version
    assert test["n"] >= spec.sets["test"].min_lesions and test["no_voxels"] == 0
    assert val["set"]["seeds"] == list(spec.sets["validation"].seeds)
    assert sum(r["n"] for r in test["per_region"].values()) == test["n"]
    assert sum(c["count"] for c in test["outside_vocabulary_sites"]) == test["outside_vocabulary"]
    card = (release / "README.md").read_text()
    assert accuracy_markdown(release, {}) in card
    readme = (REPO / "README.md").read_text()
    lo, hi = test["intervals"]["final_top1"]
    assert f"**{100 * test['final_top1']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]**" in readme
    assert f"{test['outside_vocabulary']} of the {test['n']:,} test lesions" in readme
    lo, hi = test["intervals"]["ece"]
    assert f"{test['reliability']['ece']:.3f} [{lo:.3f}, {hi:.3f}] on the test lesions" in readme
    assert headline_markdown(test) in card
