"""One builder of the analysis options for the worker and ``locus analyse``; models loaded at worker start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from node.analysis_options import build_analysis_options, model_sources, offline_analysis_options
from node.cli import main as locus_cli
from node.cli_demo import SAMPLE_STUDY
from node.models import ModelCache, load_localizer, preload_models, shipped_localizer_dir, start_preload, text_cache_dir
from node.settings import LocusSettings
from pipelines.localization import LibraryLocalizer
from tests.pipelines.localizer import factory as F
from tests.pipelines.localizer.conftest import COARSE, FINE

needs_shipped = pytest.mark.skipif(shipped_localizer_dir() is None, reason="the shipped demo localizer is absent")


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return F.write_release_dir(tmp_path_factory.mktemp("opts_release"), coarse=COARSE, fine=FINE,
                               regions=("Chest", "Abdomen", "Axial skeleton"))


def _settings(tmp_path: Path, **kw: object) -> LocusSettings:
    return LocusSettings.load(None, storage={"data_dir": str(tmp_path / "data")}, **kw)  # type: ignore[arg-type]


def test_builder_takes_lesion_mode_and_models_from_settings(release_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, analysis={"lesion_mode": "components"},
                         models={"localizer_checkpoint": str(release_dir), "device": "cpu"})
    opts = build_analysis_options(ModelCache(settings), study_version=3)
    assert opts.lesion_mode == "components" and opts.study_version == 3
    assert isinstance(opts.localizer, LibraryLocalizer) and opts.study_encoder is None


def test_worker_uses_configured_models_only(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert build_analysis_options(ModelCache(settings)).localizer is None  # never phantom weights unasked
    _, sources = model_sources(settings, allow_shipped=False)
    assert [(s.role, s.source) for s in sources] == [("localizer", "none"), ("study encoder", "none")]


def test_configured_model_wins_over_shipped(release_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, models={"localizer_checkpoint": str(release_dir)})
    resolved, sources = model_sources(settings, allow_shipped=True)
    assert sources[0].source == "configured" and str(release_dir) in sources[0].describe()
    assert resolved.models.localizer_checkpoint == release_dir


@needs_shipped
def test_offline_options_fall_back_to_shipped_localizer_and_say_so(tmp_path: Path) -> None:
    settings = _settings(tmp_path, analysis={"lesion_mode": "components"})
    opts, sources = offline_analysis_options(settings)
    assert sources[0].source == "shipped" and "phantom" in sources[0].describe()
    assert isinstance(opts.localizer, LibraryLocalizer)
    assert opts.lesion_mode == "components"  # analysis.lesion_mode is honoured
    assert offline_analysis_options(settings, lesion_mode="segments")[0].lesion_mode == "segments"


@needs_shipped
def test_cli_analyse_names_the_sites_the_demo_names(tmp_path: Path) -> None:
    env = {"LOCUS_STORAGE__DATA_DIR": str(tmp_path / "data")}
    out = CliRunner().invoke(locus_cli, ["analyse", str(SAMPLE_STUDY), "--json"], env=env)
    assert out.exit_code == 0, out.output
    stderr_lines, _, body = out.output.partition("{")
    assert "localizer: demo weights shipped" in stderr_lines
    result = json.loads("{" + body)
    assert len(result["lesions"]) == 5
    assert all((les["localization"] or {}).get("site") for les in result["lesions"])
    codes = [f["code"] for f in result["flags"]]
    assert "location_not_assessed" not in codes
    assert "instance_ignored" not in codes, result["flags"]  # the study's README.md is documentation


def test_text_cache_dir_setting_takes_effect(release_dir: Path, tmp_path: Path) -> None:
    default = _settings(tmp_path, models={"localizer_checkpoint": str(release_dir), "device": "cpu"})
    assert text_cache_dir(default) == tmp_path / "data" / "cache" / "text-features"
    chosen = tmp_path / "features"
    settings = _settings(tmp_path, models={"localizer_checkpoint": str(release_dir), "device": "cpu",
                                           "text_cache_dir": str(chosen)})
    said: list[str] = []
    assert load_localizer(ModelCache(settings), progress=said.append) is not None
    assert len(list(chosen.glob("*.npz"))) == 2 and any("encoding" in s for s in said)
    assert not (tmp_path / "data" / "cache").exists()
    said.clear()
    assert load_localizer(ModelCache(settings), progress=said.append) is not None
    assert said == []  # warm start: nothing encoded


def test_models_are_loaded_at_worker_start(release_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tmp_path, models={"localizer_checkpoint": str(release_dir), "device": "cpu"})
    host = ModelCache(settings)
    start_preload(host).join(timeout=300)
    assert any(k.startswith("localizer:") for k in host._models)
    first = load_localizer(host)
    assert load_localizer(host) is first  # the task reuses the preloaded model


def test_a_model_that_fails_at_start_does_not_stop_the_worker(tmp_path: Path) -> None:
    settings = _settings(tmp_path, models={"localizer_checkpoint": str(tmp_path / "missing")})
    assert preload_models(ModelCache(settings)) == []


def test_prefork_child_preloads_on_worker_process_init(release_dir: Path, tmp_path: Path) -> None:
    import time

    from celery.signals import worker_process_init

    from node.tasks import context as tc

    settings = _settings(tmp_path, models={"localizer_checkpoint": str(release_dir), "device": "cpu"})
    ctx = tc.build_context(settings)
    previous = tc._context
    tc.install_context(ctx)
    try:
        worker_process_init.send(sender=None)  # what Celery sends in each new prefork child
        deadline = time.monotonic() + 300
        while not any(k.startswith("localizer:") for k in ctx._models) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(k.startswith("localizer:") for k in ctx._models)
    finally:
        tc._context = previous
