"""The node with a configured HLIP study encoder: embedding row, SR group, similar-study search.

A running node (listener, sweeper, in-process worker on the embedded broker) is configured
with a tiny random-weight HLIP checkpoint in the published key layout and a toy local BERT
directory (``tests.pipelines.study_encoder.conftest.build_tiny_hlip``: nothing downloaded),
with per-site thresholds from settings.  The bundled phantom study is sent over a real
association (dcmtk ``storescu``).  The test checks what the node must guarantee whatever the
weights: one ``study_embeddings`` row for the study version (model id, dimension,
preprocessing version, unit-norm float32 vector) stored with the analysis; the analysis
result records the encoding's identity and its flags (orientation unvalidated, thorax crop)
without duplicating the vector; the SR it wrote is dciodvfy-clean and carries the
study-level findings group with the configured thresholds; and ``locus results similar``
ranks other studies' embeddings of the same model by exact cosine.  Runs on the embedded
SQLite default and on PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from node.cli import main as locus_cli
from node.db import repo
from node.db.models import Analysis, StudyEmbedding
from pipelines.models.study_encoder.preprocess import PREPROCESSING_VERSION
from pipelines.sr.reader import read_measurement_report
from tests.conftest import free_port
from tests.helpers.dicomcheck import assert_dciodvfy_clean
from tests.integration.test_node_end_to_end import (
    SENDER_AE,
    _settings,
    analysed_detail,
    running,
    storescu,
    study_files,
    wait_for,
)
from tests.node.test_similarity import add_version
from tests.pipelines.study_encoder.conftest import TINY_MODEL, build_tiny_hlip

pytestmark = [pytest.mark.network, pytest.mark.slow]

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
THRESHOLDS = {"pleural_effusion": 0.5, "emphysema": 0.25}


@pytest.fixture(scope="module")
def hlip_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_hlip(tmp_path_factory.mktemp("node_hlip"), seed=77)


def test_node_stores_embedding_and_finds_similar_studies(hlip_dirs: dict[str, Path], database: dict[str, str],
                                                         tmp_path: Path) -> None:  # fmt: skip
    port = free_port()
    settings = _settings(
        tmp_path / "locus", port,
        callers=[{"ae_title": SENDER_AE, "host": "127.0.0.1"}],
        export={"destinations": []},
        models={"dir": str(hlip_dirs["root"]), "study_encoder_checkpoint": hlip_dirs["checkpoint"].name,
                "study_encoder_text_dir": "text", "study_encoder_config_dir": "configs",
                "study_encoder_model": TINY_MODEL, "study_encoder_thresholds": THRESHOLDS, "device": "cpu"},
        **({"database": database} if database else {}),
    )  # fmt: skip
    files = study_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with running(settings) as node:
        storescu(port, files)
        detail = wait_for(lambda: analysed_detail(node, study_uid), 300, "the analysis and report")
        with node.ctx.db.session() as s:
            emb = s.scalars(select(StudyEmbedding)).one()
            row = (emb.study_version_id, emb.model_id, emb.dim, emb.preprocessing_version, bytes(emb.vector))
            result = s.scalars(select(Analysis).where(Analysis.study_version_id == emb.study_version_id)).one().result
            vector = np.asarray(repo.load_embedding(s, emb.study_version_id, emb.model_id))
            # two more studies with embeddings of the same model: the same direction and the opposite
            for uid, vec in (("1.2.826.0.1.99.1", vector), ("1.2.826.0.1.99.2", -vector)):
                vid = add_version(s, uid)
                repo.store_embedding(s, vid, model_id=emb.model_id, vector=vec.tolist(),
                                     preprocessing_version=PREPROCESSING_VERSION, now=T0)  # fmt: skip
            other = add_version(s, "1.2.826.0.1.99.3")  # another model's space is never compared
            repo.store_embedding(s, other, model_id="hlip-other", vector=vector.tolist(),
                                 preprocessing_version=PREPROCESSING_VERSION, now=T0)  # fmt: skip
        sr_path = settings.storage.reports_dir / detail["reports"][0]["path"]

    _, model_id, dim, prep, raw = row
    assert model_id.startswith("hlip-") and dim == 16 and prep == PREPROCESSING_VERSION
    assert len(raw) == 4 * dim and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    enc = result["study_encoding"]
    assert enc["embedding_dim"] == 16 and "embedding" not in enc
    assert enc["model"]["model_id"] == model_id and len(enc["model"]["sha256"]) == 64
    assert {f["code"] for f in enc["flags"]} == {"hlip_orientation_unvalidated", "hlip_thorax_cropped"}
    assert {f["finding"]: f["threshold"] for f in enc["findings"] if f["threshold"] is not None} == {
        "Pleural effusion": 0.5, "Emphysema": 0.25}

    assert_dciodvfy_clean(sr_path)
    group = read_measurement_report(pydicom.dcmread(sr_path)).study_findings
    assert group is not None and len(group.findings) == len(enc["findings"])
    assert "hlip_orientation_unvalidated" in {f.code for f in group.flags}

    env = {"LOCUS_STORAGE__DATA_DIR": str(settings.storage.data_dir), "LOCUS_DATABASE__URL": settings.database.url}
    out = CliRunner().invoke(locus_cli, ["results", "similar", study_uid, "--k", "10", "--json"], env=env)
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["model_id"] == model_id and shown["candidates"] == 2
    assert [(r["study_uid"], round(r["similarity"], 5)) for r in shown["results"]] == [
        ("1.2.826.0.1.99.1", 1.0), ("1.2.826.0.1.99.2", -1.0)]


def _failed(node: Any, study_uid: str) -> dict[str, Any] | None:
    with node.ctx.db.session() as s:
        detail = repo.study_detail(s, study_uid)
    analyses = [v.get("analysis") or {} for v in (detail or {}).get("versions", [])]
    return next((a for a in analyses if a.get("status") == "failed"), None)


def test_missing_checkpoint_fails_the_version_with_its_reason(tmp_path: Path) -> None:
    """A configured but absent checkpoint is recorded on the analysis, not left 'analysing'."""
    port = free_port()
    settings = _settings(
        tmp_path / "locus", port,
        callers=[{"ae_title": SENDER_AE, "host": "127.0.0.1"}],
        export={"destinations": []},
        models={"study_encoder_checkpoint": str(tmp_path / "absent.pt"), "study_encoder_text_dir": str(tmp_path),
                "device": "cpu"},
    )  # fmt: skip
    files = study_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with running(settings) as node:
        storescu(port, files)
        failed = wait_for(lambda: _failed(node, study_uid), 120, "the failed analysis")
    assert failed["reason_code"] == "checkpoint_missing" and "absent.pt" in failed["reason"]
