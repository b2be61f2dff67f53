"""The localizer inside the study analysis: HCL-AL strings → coded Finding Sites in the SR.

Small random-weight checkpoints in HCL-AL's published dict layout, and a vocabulary made of
three real HCL-AL regions (their final strings come from the library's crosswalk; the
description sentences are written here, not copied). With random weights the predicted
site is arbitrary, so the test checks the wiring: every lesion gets a localization, its
coded site is the library's coding of the predicted string, the SR carries it as a valid
Finding Site, and the model identity is recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from library import load_library
from node.cli_demo import SAMPLE_STUDY
from node.models import load_localizer
from node.settings import LocusSettings
from node.tasks.context import build_context
from pipelines.analysis import AnalysisOptions, analyse_study
from pipelines.localization import LibraryLocalizer
from pipelines.models.localizer import Localizer
from pipelines.sr.reader import read_measurement_report
from tests.helpers.dicomcheck import assert_dciodvfy_clean

from . import factory as F
from .conftest import COARSE, FINE

REGIONS = ("Chest", "Abdomen", "Axial skeleton")


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory in HCL-AL's release layout, with real final strings."""
    return F.write_release_dir(tmp_path_factory.mktemp("hclal_release"), coarse=COARSE, fine=FINE, regions=REGIONS)


def test_analysis_writes_coded_finding_sites(release_dir: Path, tmp_path: Path) -> None:
    files = [release_dir / "coarse" / "params.pth", release_dir / "fine" / "params.pth",
             release_dir / "anatomy_vocabulary_library.json", release_dir / "augmented_location_descriptions.json"]
    localizer = LibraryLocalizer(Localizer.load(*files))
    result = analyse_study([SAMPLE_STUDY], AnalysisOptions(localizer=localizer))

    lib = load_library()
    assert result.lesions and not any(f.code == "location_not_assessed" for f in result.flags)
    assert [m.model_id for m in result.models] == [localizer.localizer.model_info.model_id]
    for les in result.lesions:
        loc = les.localization
        assert loc is not None and loc.site is not None
        expected = (lib.hclal_coarse_node(loc.final_label) if any(f.code == "large_lesion" for f in loc.flags)
                    else lib.hclal_site(loc.final_label))
        assert loc.site.site_id == expected.id
        assert loc.site.code.value == expected.code.value
        assert loc.coarse_ranking and len(loc.alternatives) >= 1

    out = tmp_path / "sr.dcm"
    result.sr_dataset.save_as(out, enforce_file_format=True)
    assert_dciodvfy_clean(out)
    report = read_measurement_report(out)
    by_uid = {les.tracking_uid: les for les in report.lesions}
    for les in result.lesions:
        read = by_uid[les.tracking_uid]
        assert read.location_assessed
        assert les.localization.site.code.value in {s.location.value for s in read.finding_sites}
    weights = localizer.localizer.model_info.sha256
    assert any(weights in p for les in report.lesions for p in les.algorithm.parameters)


def test_node_loads_the_configured_localizer_once(release_dir: Path, tmp_path: Path) -> None:
    settings = LocusSettings.load(None, storage={"data_dir": str(tmp_path)},
                                  models={"localizer_checkpoint": str(release_dir), "device": "cpu"})
    ctx = build_context(settings)
    first = load_localizer(ctx)
    assert isinstance(first, LibraryLocalizer)
    assert load_localizer(ctx) is first  # cached per process


def test_node_without_localizer(tmp_path: Path) -> None:
    ctx = build_context(LocusSettings.load(None, storage={"data_dir": str(tmp_path)}))
    assert load_localizer(ctx) is None


def test_study_without_ct_says_why_no_site_and_lists_no_idle_model(release_dir: Path, tmp_path: Path) -> None:
    """Honest provenance: no CT is the reason given, and a localizer that produced nothing is
    neither in the SR's Software Versions nor in the Device Observer UID."""
    files = [release_dir / "coarse" / "params.pth", release_dir / "fine" / "params.pth",
             release_dir / "anatomy_vocabulary_library.json", release_dir / "augmented_location_descriptions.json"]
    localizer = LibraryLocalizer(Localizer.load(*files))
    no_ct = [p for p in sorted(SAMPLE_STUDY.rglob("*.dcm")) if p.parent.name != "CT"]
    with_model = analyse_study(no_ct, AnalysisOptions(localizer=localizer))
    without = analyse_study(no_ct, AnalysisOptions())

    assert with_model.lesions and all(les.localization is None for les in with_model.lesions)
    assert all(any(f.code == "location_no_ct" for f in les.flags) for les in with_model.lesions)
    study_flag = next(f for f in with_model.flags if f.code == "location_not_assessed")
    assert "no CT" in study_flag.message
    assert with_model.models == []
    model_id = localizer.localizer.model_info.model_id
    sr = with_model.sr_dataset
    assert not any(model_id in v for v in sr.SoftwareVersions)
    observer_uid = lambda ds: next(  # noqa: E731
        item.UID for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121012")
    assert observer_uid(sr) == observer_uid(without.sr_dataset)

    out = tmp_path / "sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    assert_dciodvfy_clean(out)
    report = read_measurement_report(out)
    assert all("no CT" in les.comments[0] for les in report.lesions)
