"""The node with a configured localizer: lesion sites reach the results database and the SR.

A running node (listener, sweeper, in-process worker on the embedded broker) is pointed at
a directory in HCL-AL's release layout (small random-weight checkpoints in the published
dict layout, a vocabulary of real HCL-AL final strings).  The bundled phantom study is sent
over a real association (dcmtk ``storescu``).  With random weights the predicted site is
arbitrary, so the test checks what the node must guarantee whatever the weights: every
lesion row carries the predicted site (id, code, scheme, name from the anatomy library),
the coarse and fine rankings with their scores, the large-lesion/mask flags, and the
model identity with the sha256 of the weights; the same sites are the Finding Sites of the
SR that the node wrote; and ``locus results lesions --json`` shows them.  Runs on the
embedded SQLite default and on PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from library import load_library
from node.cli import main as locus_cli
from node.db.models import Lesion
from pipelines.sr.reader import read_measurement_report
from tests.conftest import free_port
from tests.helpers.dicomcheck import assert_dciodvfy_clean
from tests.integration.test_node_end_to_end import (
    EXPECTED_LESIONS,
    SENDER_AE,
    _settings,
    analysed_detail,
    running,
    storescu,
    study_files,
    wait_for,
)
from tests.pipelines.localizer import factory as F
from tests.pipelines.localizer.conftest import COARSE, FINE

pytestmark = [pytest.mark.network, pytest.mark.slow]

REGIONS = ("Neck", "Chest", "Abdomen", "Pelvis", "Axial skeleton")


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return F.write_release_dir(tmp_path_factory.mktemp("node_release"), coarse=COARSE, fine=FINE,
                               regions=REGIONS, seeds=(31, 32))


def test_node_records_localizer_sites(release_dir: Path, database: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    settings = _settings(
        tmp_path / "locus", port,
        callers=[{"ae_title": SENDER_AE, "host": "127.0.0.1"}],
        export={"destinations": []},
        models={"localizer_checkpoint": str(release_dir), "device": "cpu"},
        **({"database": database} if database else {}),
    )
    if database:
        assert settings.database.url.startswith("postgresql")
    files = study_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with running(settings) as node:
        # The worker loads the configured localizer when it starts, before any study arrives,
        # and keeps its text features in the default cache under the data directory.
        wait_for(lambda: any(k.startswith("localizer:") for k in node.ctx._models), 120,
                 "the localizer loaded at worker start")
        assert sorted(p.suffix for p in (settings.storage.data_dir / "cache" / "text-features").iterdir()) == [
            ".json", ".json", ".npz", ".npz"]
        storescu(port, files)
        detail = wait_for(lambda: analysed_detail(node, study_uid), 300, "the analysis and report")
        with node.ctx.db.session() as s:
            rows = s.scalars(select(Lesion).order_by(Lesion.lesion_id)).all()
            lesions = [(r.lesion_id, r.site_id, r.site_code, r.site_scheme, r.site_name, r.model_id,
                        dict(r.localization or {}), r.tracking_uid) for r in rows]
        sr_path = settings.storage.reports_dir / detail["reports"][0]["path"]

    lib = load_library()
    assert len(lesions) == EXPECTED_LESIONS
    weights_sha = {m["sha256"] for *_, loc, _ in lesions for m in [loc["model"]]}
    assert len(weights_sha) == 1 and len(next(iter(weights_sha))) == 64
    for lesion_id, site_id, code, scheme, name, model_id, loc, _ in lesions:
        assert site_id is not None, f"lesion {lesion_id} has no site"
        site = lib.site(site_id)  # a site, or a coarse node under the large-lesion rule
        assert (code, scheme, name) == (site.code.value, site.code.scheme, site.name)
        assert model_id == loc["model"]["model_id"] and model_id
        # rankings and scores, as the reference tool reports them (softmax(100 cos))
        coarse = loc["coarse_ranking"]
        assert coarse and all(0.0 <= r["score"] <= 1.0 for r in coarse)
        assert [r["score"] for r in coarse] == sorted((r["score"] for r in coarse), reverse=True)
        assert loc["final_label"] and loc["fine_ranking"] and 1 <= len(loc["alternatives"]) <= 3
        # no temperature was fitted for these weights: no calibrated probability is claimed
        assert loc["calibrated_probability"] is None

    # The SR the node wrote carries the same coded sites as Finding Sites.
    assert_dciodvfy_clean(sr_path)
    report = read_measurement_report(pydicom.dcmread(sr_path))
    by_uid = {les.tracking_uid: les for les in report.lesions}
    for _lesion_id, _site_id, code, *_rest, tracking_uid in lesions:
        assert code in {s.location.value for s in by_uid[tracking_uid].finding_sites}

    # People and scripts see the sites through the CLI.
    env = {"LOCUS_STORAGE__DATA_DIR": str(settings.storage.data_dir),
           "LOCUS_DATABASE__URL": settings.database.url}
    out = CliRunner().invoke(locus_cli, ["results", "lesions", study_uid, "--json"], env=env)
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert sorted(r["site_id"] for r in shown) == sorted(row[1] for row in lesions)
    assert {r["model_id"] for r in shown} == {lesions[0][5]}
