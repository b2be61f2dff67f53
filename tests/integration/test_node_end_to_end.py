"""The node end to end, with real peers on loopback.

* dcmtk ``storescu`` sends the bundled synthetic PET/CT + SEG study to a running node
  (listener, completion sweeper, embedded SQLite broker, in-process worker); a real dcmtk
  ``storescp`` collects the SR; the SR passes dciodvfy and reads back with the values in
  the results database.
* Orthanc as the PACS: Orthanc C-STOREs the study to Locus, Locus sends the SR back to
  Orthanc, and the test reads the SR from Orthanc's REST API.
* Late instances after analysis create a new study version whose SR references the
  previous one (Predecessor Documents Sequence); a duplicate resend does not.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.cli_demo import SAMPLE_STUDY
from node.db import repo
from node.service import RunningNode, start_node
from node.settings import LocusSettings
from pipelines.sr.reader import read_measurement_report
from tests.conftest import dcmtk, dcmtk_env, free_port
from tests.helpers.dicomcheck import assert_dciodvfy_clean

pytestmark = [pytest.mark.network, pytest.mark.slow]

SENDER_AE = "SENDER"
EXPECTED_LESIONS = 5  # the bundled study's SEG holds one segment per phantom lesion


def _settings(data_dir: Path, port: int, **extra: Any) -> LocusSettings:
    base: dict[str, Any] = {
        "storage": {"data_dir": str(data_dir)},
        "dicom": {"host": "127.0.0.1", "port": port, "allowed_callers": extra.pop("callers")},
        "completion": {"series_quiet_s": 1.0, "study_quiet_s": 30.0, "sweep_interval_s": 0.3},
        "export": extra.pop("export"),
    }
    base.update(extra)
    return LocusSettings.load(None, **base)


@contextmanager
def running(settings: LocusSettings) -> Iterator[RunningNode]:
    node = start_node(settings)
    try:
        yield node
    finally:
        node.stop()


@contextmanager
def storescp(out_dir: Path, port: int, ae: str = "PACS") -> Iterator[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", ae, "-od", str(out_dir), "+B", str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    try:
        yield out_dir
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def storescu(port: int, paths: list[Path], *, calling: str = SENDER_AE) -> None:
    # -R: propose only the SOP classes of the files (SEG is outside dcmtk's default list)
    proc = subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", "LOCUS", "-R", "127.0.0.1", str(port), *map(str, paths)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def study_files(root: Path = SAMPLE_STUDY) -> list[Path]:
    """The bundled study in directory order: CT, PET, then the SEG right after the last
    PET slice (node.completion must not cut the SEG off: one send, one study version)."""
    return sorted(root.rglob("*.dcm"))


def wait_for(predicate: Any, timeout: float, what: str, logs: Sequence[Path] = ()) -> Any:
    """Poll ``predicate`` until it returns something truthy; on timeout, fail with the
    tails of ``logs`` (other processes' output) in the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tails = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tails}")


def exported_reports(node: RunningNode, study_uid: str, n: int = 1) -> list[dict[str, Any]] | None:
    with node.ctx.db.session() as s:
        detail = repo.study_detail(s, study_uid)
    if detail is None:
        return None
    failed = [v for v in detail["versions"] if (v.get("analysis") or {}).get("status") == "failed"]
    assert not failed, f"analysis failed: {failed}"
    reports = [r for r in detail["reports"] if r["exports"] and all(e["state"] == "done" for e in r["exports"])]
    return reports if len(reports) >= n else None


def analysed_detail(node: RunningNode, study_uid: str) -> dict[str, Any] | None:
    """The study's detail once a report exists (fails fast if any analysis failed)."""
    with node.ctx.db.session() as s:
        detail = repo.study_detail(s, study_uid)
    if not detail:
        return None
    failed = [v.get("analysis") for v in detail["versions"] if (v.get("analysis") or {}).get("status") == "failed"]
    assert not failed, f"analysis failed: {failed}"
    return detail if detail["reports"] else None


def test_storescu_to_locus_to_storescp(tmp_path: Path) -> None:
    pacs_port, port = free_port(), free_port()
    settings = _settings(
        tmp_path / "locus", port,
        callers=[{"ae_title": SENDER_AE, "host": "127.0.0.1"}],
        export={"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
                "backoff_base_s": 0.5, "backoff_cap_s": 2.0},
    )
    files = study_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with storescp(tmp_path / "pacs", pacs_port) as inbox, running(settings) as node:
        storescu(port, files)
        reports = wait_for(lambda: exported_reports(node, study_uid), 300, "the exported report")
        received = wait_for(lambda: sorted(inbox.glob("SR*")) or sorted(inbox.glob("*.dcm*")), 30, "the SR")

        # Duplicate resend: idempotent, no new study version.
        storescu(port, files[:3])
        time.sleep(2.0)
        with node.ctx.db.session() as s:
            detail = repo.study_detail(s, study_uid)
        assert detail is not None and len(detail["versions"]) == 1
        assert detail["instances"] == len(files)

    assert len(reports) == 1 and len(received) == 1
    sr_path = received[0]
    assert_dciodvfy_clean(sr_path)
    sr = pydicom.dcmread(sr_path)
    assert sr.StudyInstanceUID == study_uid
    assert sr.SOPInstanceUID == reports[0]["sr_sop_uid"]
    parsed = read_measurement_report(sr)
    assert len(parsed.lesions) == EXPECTED_LESIONS

    with node.ctx.db.session() as s:
        rows = repo.list_lesions(s, study_uid)
    assert len(rows) == EXPECTED_LESIONS
    # The SR and the database hold the same measurements.
    sr_max = sorted(les.suv_max for les in parsed.lesions)
    db_max = sorted(row.suv_max for row in rows)
    assert sr_max == pytest.approx(db_max, rel=1e-6)
    for row in rows:
        assert row.suv_max >= row.suv_mean > 0  # equal for a one-voxel lesion
        assert row.volume_ml > 0 and row.suv_unit == "g/ml{SUVbw}"


def test_late_instance_makes_new_version_with_predecessor(tmp_path: Path) -> None:
    pacs_port, port = free_port(), free_port()
    settings = _settings(
        tmp_path / "locus", port,
        callers=[{"ae_title": SENDER_AE, "host": "127.0.0.1"}],
        export={"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
                "backoff_base_s": 0.5, "backoff_cap_s": 2.0},
    )
    files = study_files()
    ct = [p for p in files if p.parent.name == "CT"]
    held_back = ct[-1]
    first = [p for p in files if p != held_back]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with storescp(tmp_path / "pacs", pacs_port) as inbox, running(settings) as node:
        storescu(port, first)
        wait_for(lambda: exported_reports(node, study_uid, 1), 300, "the first report")
        storescu(port, [held_back])
        reports = wait_for(lambda: exported_reports(node, study_uid, 2), 300, "the second report")
    assert {r["version"] for r in reports} == {1, 2}
    v1 = next(r for r in reports if r["version"] == 1)
    v2 = next(r for r in reports if r["version"] == 2)
    assert v2["predecessor_sop_uid"] == v1["sr_sop_uid"]
    sr2 = pydicom.dcmread(next(p for p in inbox.iterdir() if pydicom.dcmread(p).SOPInstanceUID == v2["sr_sop_uid"]))
    pred = sr2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == v1["sr_sop_uid"]
    assert_dciodvfy_clean(Path(sr2.filename))


# -- Orthanc as the PACS -------------------------------------------------------------------
ORTHANC = Path("/usr/sbin/Orthanc")


@contextmanager
def orthanc(tmp: Path, dicom_port: int, http_port: int, locus_port: int, **extra: Any) -> Iterator[str]:
    """A throw-away Orthanc; ``extra`` adds or overrides configuration keys (e.g. LuaScripts)."""
    if not ORTHANC.exists():
        pytest.fail("Orthanc missing: install the Debian package orthanc (see .ci/run)")
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "locus-test-pacs", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
        "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomModalities": {"locus": ["LOCUS", "127.0.0.1", locus_port]},
        "DicomCheckCalledAet": False, "Plugins": [], "StableAge": 1,
        **extra,
    }
    cfg = tmp / "orthanc.json"
    cfg.write_text(json.dumps(config))
    proc = subprocess.Popen([str(ORTHANC), str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dcmtk_env())
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: _get(base, "/system"), 30, "Orthanc to start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _get(base: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            body = r.read()
    except OSError:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body


def _post(base: str, path: str, data: bytes, content_type: str = "application/dicom") -> Any:
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_orthanc_as_pacs(tmp_path: Path) -> None:
    port, o_dicom, o_http = free_port(), free_port(), free_port()
    settings = _settings(
        tmp_path / "locus", port,
        callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": o_dicom}],
        export={"return_to_sender": True, "backoff_base_s": 0.5, "backoff_cap_s": 2.0},
    )
    files = study_files()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with orthanc(tmp_path / "orthanc", o_dicom, o_http, port) as base, running(settings) as node:
        for p in files:
            _post(base, "/instances", p.read_bytes())
        orthanc_study = _post(base, "/tools/lookup", study_uid.encode(), "text/plain")[0]["ID"]
        _post(base, "/modalities/locus/store", json.dumps({"Resources": [orthanc_study]}).encode(),
              "application/json")
        wait_for(lambda: exported_reports(node, study_uid), 300, "the report to reach Orthanc")

        def sr_in_orthanc() -> Any:
            for inst in _get(base, f"/studies/{orthanc_study}/instances") or []:
                tags = _get(base, f"/instances/{inst['ID']}/simplified-tags") or {}
                if tags.get("Modality") == "SR":
                    return inst["ID"]
            return None

        sr_id = wait_for(sr_in_orthanc, 30, "the SR in Orthanc")
        sr_bytes = _get(base, f"/instances/{sr_id}/file")
    sr_file = tmp_path / "from_orthanc_sr.dcm"
    sr_file.write_bytes(sr_bytes)
    assert_dciodvfy_clean(sr_file)
    parsed = read_measurement_report(pydicom.dcmread(sr_file))
    assert len(parsed.lesions) == EXPECTED_LESIONS
    assert all(les.suv_max > 0 for les in parsed.lesions)
