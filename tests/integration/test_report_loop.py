"""No endless report loop: a PACS that forwards every stable study back to Locus.

A common routing rule ("forward every stable study to the AI node") sends Locus its own
SR back together with the images. Before the fix, every returned SR made a new study
version, a new analysis and a new SR, forever (8 SRs in 7 minutes). Here Orthanc is the
PACS with a Lua ``OnStableStudy`` rule that forwards the whole study to Locus each time
it becomes stable: after Locus's SR has come back, the node stays quiet, with exactly
one study version, one SR and one export.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from node.db import repo
from node.db.models import Instance
from node.service import RunningNode
from tests.conftest import free_port
from tests.helpers.dicomcheck import assert_dciodvfy_clean
from tests.integration.test_node_end_to_end import (
    _get,
    _post,
    _settings,
    orthanc,
    running,
    study_files,
    wait_for,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

UID_ROOT = "1.2.826.0.1.3680043.10.4243"
STABLE_AGE_S = 2
FORWARD_RULE = """
function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/modalities/locus/store', studyId)
end
"""


def _detail(node: RunningNode, study_uid: str) -> dict[str, Any] | None:
    with node.ctx.db.session() as s:
        return repo.study_detail(s, study_uid)


def _stable_forwards(base: str) -> int:
    """How many times Orthanc saw the study become stable (each one forwarded it)."""
    changes = _get(base, "/changes?limit=10000") or {}
    return sum(1 for c in changes.get("Changes", []) if c.get("ChangeType") == "StableStudy")


def _srs_in_orthanc(base: str, orthanc_study: str) -> list[str]:
    out = []
    for inst in _get(base, f"/studies/{orthanc_study}/instances") or []:
        tags = _get(base, f"/instances/{inst['ID']}/simplified-tags") or {}
        if tags.get("Modality") == "SR":
            out.append(inst["ID"])
    return out


def test_pacs_forwarding_every_stable_study_back_makes_one_report(tmp_path: Path, database: dict[str, str]) -> None:
    port, o_dicom, o_http = free_port(), free_port(), free_port()
    settings = _settings(
        tmp_path / "locus", port,
        callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": o_dicom}],
        export={"return_to_sender": True, "backoff_base_s": 0.5, "backoff_cap_s": 2.0},
        analysis={"uid_root": UID_ROOT},
        database=database,
    )
    rule = tmp_path / "forward.lua"
    rule.write_text(FORWARD_RULE)
    files = study_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with orthanc(tmp_path / "orthanc", o_dicom, o_http, port, StableAge=STABLE_AGE_S,
                 LuaScripts=[str(rule)]) as base, running(settings) as node:
        for p in files:  # the modality sends the study to the PACS; the rule forwards it
            _post(base, "/instances", p.read_bytes())
        orthanc_study = _post(base, "/tools/lookup", study_uid.encode(), "text/plain")[0]["ID"]

        # Locus analyses, exports its SR to Orthanc, and Orthanc forwards the study
        # (images again + our SR) back once it is stable again.
        def sr_came_back() -> bool:
            detail = _detail(node, study_uid)
            if not detail or not detail["reports"]:
                return False
            with node.ctx.db.session() as s:
                return s.scalar(select(Instance.id).where(Instance.sop_uid == detail["reports"][0]["sr_sop_uid"])) \
                    is not None

        wait_for(sr_came_back, 400, "Locus's SR to come back from Orthanc")
        # A quiet node: several stable periods and sweeps later, nothing new happened.
        time.sleep(4 * STABLE_AGE_S + 3 * settings.completion.series_quiet_s + 2)
        detail = _detail(node, study_uid)
        assert detail is not None
        assert [v["version"] for v in detail["versions"]] == [1], detail["versions"]
        (report,) = detail["reports"]
        assert [e["state"] for e in report["exports"]] == ["done"]
        assert detail["own_instances"] == 1 and detail["duplicates"] == 0
        assert detail["instances"] == len(files)
        assert report["sr_sop_uid"].startswith(UID_ROOT + ".")  # analysis.uid_root reached the SR
        srs = _srs_in_orthanc(base, orthanc_study)
        assert len(srs) == 1
        assert _stable_forwards(base) == 2  # the study, then the study with our SR: no more
        with node.ctx.db.session() as s:
            pending = repo.pending_study_ids(s)
        assert pending == []
        sr_bytes = _get(base, f"/instances/{srs[0]}/file")
    sr_file = tmp_path / "sr.dcm"
    sr_file.write_bytes(sr_bytes)
    assert_dciodvfy_clean(sr_file)
    assert json.dumps(detail)  # JSON-ready for `locus results show`
