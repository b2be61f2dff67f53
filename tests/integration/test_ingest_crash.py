"""Crash durability of ingest: ``locus serve`` killed with SIGKILL while studies stream in.

The guarantee under test (PS3.7 §9.1.1 leaves durability to the SCP; Locus promises it):
a C-STORE answered Success means the instance is fsync-ed in the spool *and* indexed, so
after ``kill -9`` of the whole node (its process group: the serving process and any
listener processes) and a restart on the same data directory:

* every acknowledged instance is in the spool, byte-for-byte the Part 10 file the node
  writes for what was sent (File Meta + the data set as encoded on the wire), and indexed;
* the sender resends what was not acknowledged (as a real sender retries), and each study
  is then analysed exactly once: one study version, one succeeded analysis, one report.

Each trial sends one distinct study per association (the bundled PET/CT + SEG study with
fresh UIDs, so the SEG still references its own images) over pynetdicom associations,
kills the node at a random point of the stream, restarts it, checks, resends and checks.

CI runs one trial of two configurations per database (1 association / 1 listener process
and 4 associations / 2 listener processes). The long run, whose figures are in the README:

    LOCUS_CRASH_TRIALS=10 LOCUS_CRASH_ALL=1 .venv/bin/python -m pytest -q -s \\
        tests/integration/test_ingest_crash.py

prints one ``crash-trials`` line per configuration (trials, acknowledged, missing, mismatched).
"""

from __future__ import annotations

import copy
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode
from sqlalchemy import func, select

from node.cli_demo import SAMPLE_STUDY
from node.db import Database
from node.db.models import Analysis, AnalysisStatus, Instance, Report, Study, StudyVersion
from node.listener.handlers import file_meta_bytes
from tests.conftest import free_port
from tests.integration.test_node_end_to_end import wait_for

pytestmark = [pytest.mark.network, pytest.mark.slow]

TRIALS = int(os.environ.get("LOCUS_CRASH_TRIALS", "1"))
ALL_CONFIGS = os.environ.get("LOCUS_CRASH_ALL", "") == "1"
SEED = int(os.environ.get("LOCUS_CRASH_SEED", "20261207"))
EXPLICIT_LE = "1.2.840.10008.1.2.1"

# (associations, listener processes)
_CONFIGS = [(1, 1), (4, 2)] + ([(4, 1), (1, 2)] if ALL_CONFIGS else [])


def _source_datasets() -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(SAMPLE_STUDY.rglob("*.dcm"))]


def _instance_uids(datasets: list[Dataset]) -> set[str]:
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    return {str(getattr(ds, k)) for ds in datasets for k in keys if k in ds}


def _remap(ds: Dataset, mapping: dict[str, str]) -> None:
    """Replace every UI value found in ``mapping``, nested sequences included."""
    for elem in ds.iterall():
        if elem.VR != "UI" or elem.value is None:
            continue
        if elem.VM > 1:
            elem.value = [mapping.get(str(v), str(v)) for v in elem.value]
        elif str(elem.value) in mapping:
            elem.value = mapping[str(elem.value)]


def fresh_study(sources: list[Dataset]) -> list[Dataset]:
    """The bundled study with new study/series/instance/frame-of-reference UIDs."""
    mapping = {old: pydicom.uid.generate_uid() for old in _instance_uids(sources)}
    out = []
    for src in sources:
        ds = copy.deepcopy(src)  # Dataset.copy() is shallow: elements would be shared
        _remap(ds, mapping)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = EXPLICIT_LE  # what we propose, so the wire bytes are known
        out.append(ds)
    return out


def expected_file(ds: Dataset) -> bytes:
    """The Part 10 file the node writes for ``ds`` received in Explicit VR Little Endian."""
    body = encode(ds, False, True)
    assert body is not None
    return file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT_LE) + body


@dataclass
class Sender:
    """One association streaming one study; records what the node acknowledged."""

    port: int
    study: list[Dataset]
    acked: list[Dataset] = field(default_factory=list)
    error: str | None = None

    def run(self) -> None:
        ae = AE(ae_title="CRASHSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        contexts = {str(ds.SOPClassUID) for ds in self.study}
        ae.requested_contexts = [build_context(uid, [EXPLICIT_LE]) for uid in sorted(contexts)]
        try:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="LOCUS")
            if not assoc.is_established:
                self.error = "association refused"
                return
            for ds in self.study:
                if not assoc.is_established:
                    break
                status = assoc.send_c_store(ds)
                if status and getattr(status, "Status", None) == 0x0000:
                    self.acked.append(ds)
                elif not status:
                    break  # the peer went away: no response, no acknowledgement
            if assoc.is_established:
                assoc.release()
        except (OSError, RuntimeError) as exc:  # the node died under us
            self.error = f"{type(exc).__name__}: {exc}"


def _env(data_dir: Path, port: int, db_url: str | None, processes: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUS_")}
    env.update({
        "LOCUS_STORAGE__DATA_DIR": str(data_dir),
        "LOCUS_DICOM__HOST": "127.0.0.1",
        "LOCUS_DICOM__PORT": str(port),
        "LOCUS_DICOM__LISTENER_PROCESSES": str(processes),
        # The data-driven rules never fire while instances stream in (series_quiet_s); the
        # quiet timer is long so only a finished send makes a study version.
        "LOCUS_COMPLETION__SERIES_QUIET_S": "1.0",
        "LOCUS_COMPLETION__STUDY_QUIET_S": "60",
        "LOCUS_COMPLETION__SWEEP_INTERVAL_S": "0.3",
        "LOCUS_LOG_LEVEL": "INFO",
    })
    if db_url is not None:
        env["LOCUS_DATABASE__URL"] = db_url
    return env


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def node_process(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``locus serve`` in its own process group (so SIGKILL reaches its listener processes)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "locus"), "serve"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(lambda: proc.poll() is not None or _port_open(port), 120, "the node's port", [log])
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        yield proc
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _kill9(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Listener processes are in the same group; make sure none survives to serve the port.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@dataclass
class TrialResult:
    acknowledged: int
    missing: list[str]
    mismatched: list[str]
    unindexed: list[str]


def _check_durable(db: Database, spool: Path, acked: list[Dataset]) -> TrialResult:
    with db.session(readonly=True) as s:
        indexed = {str(sop): str(rel) for sop, rel in s.execute(select(Instance.sop_uid, Instance.path))}
    missing, mismatched, unindexed = [], [], []
    for ds in acked:
        sop = str(ds.SOPInstanceUID)
        rel = indexed.get(sop)
        if rel is None:
            unindexed.append(sop)
            continue
        path = spool / rel
        if not path.exists():
            missing.append(sop)
        elif path.read_bytes() != expected_file(ds):
            mismatched.append(sop)
    return TrialResult(len(acked), missing, mismatched, unindexed)


def _study_outcomes(db: Database, study_uids: list[str]) -> dict[str, tuple[int, int, int]]:
    """Per study: (versions, succeeded analyses, reports)."""
    out = {}
    with db.session(readonly=True) as s:
        for uid in study_uids:
            versions = s.scalar(
                select(func.count()).select_from(StudyVersion).join(Study).where(Study.study_uid == uid)
            )
            analyses = s.scalar(
                select(func.count()).select_from(Analysis).join(StudyVersion).join(Study)
                .where(Study.study_uid == uid, Analysis.status == AnalysisStatus.SUCCEEDED)
            )
            reports = s.scalar(
                select(func.count()).select_from(Report).join(Analysis).join(StudyVersion).join(Study)
                .where(Study.study_uid == uid)
            )
            out[uid] = (int(versions or 0), int(analyses or 0), int(reports or 0))
    return out


def _trial(tmp: Path, db_url: str | None, associations: int, processes: int, rng: random.Random,
           sources: list[Dataset]) -> TrialResult:
    data_dir = tmp / "data"
    port = free_port()
    env = _env(data_dir, port, db_url, processes)
    log = tmp / "node.log"
    studies = [fresh_study(sources) for _ in range(associations)]
    study_uids = [str(st[0].StudyInstanceUID) for st in studies]
    senders = [Sender(port, st) for st in studies]

    with node_process(env, port, log) as proc:
        threads = [threading.Thread(target=s.run, daemon=True) for s in senders]
        for t in threads:
            t.start()
        # Kill somewhere inside the stream: after a random number of acknowledgements.
        total = sum(len(st) for st in studies)
        kill_after = rng.randint(1, max(1, total - associations * 5))
        wait_for(lambda: sum(len(s.acked) for s in senders) >= kill_after
                 or not any(t.is_alive() for t in threads), 120, "acknowledgements", [log])
        _kill9(proc)
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a sender hung after the node was killed"

    acked = [ds for s in senders for ds in s.acked]
    db = Database(db_url or f"sqlite:///{data_dir}/locus.db")
    try:
        with node_process(env, port, log):
            result = _check_durable(db, data_dir / "spool", acked)
            # The sender retries what was not acknowledged; each study then completes once.
            for sender in senders:
                done = {str(ds.SOPInstanceUID) for ds in sender.acked}
                retry = Sender(port, [ds for ds in sender.study if str(ds.SOPInstanceUID) not in done])
                retry.run()
                assert retry.error is None and len(retry.acked) == len(retry.study), retry.error

            def analysed() -> bool:
                return all(a >= 1 for _, a, _ in _study_outcomes(db, study_uids).values())

            wait_for(analysed, 240, "every study analysed after the restart", [log])
            time.sleep(2.0)  # a few sweeps more: nothing may start a second analysis
            outcomes = _study_outcomes(db, study_uids)
        assert all(o == (1, 1, 1) for o in outcomes.values()), outcomes
        with db.session(readonly=True) as s:
            indexed = s.scalar(select(func.count()).select_from(Instance))
        assert indexed == sum(len(st) for st in studies)
    finally:
        db.dispose()
    return result


@pytest.mark.parametrize(("associations", "processes"), _CONFIGS, ids=[f"{a}assoc-{p}proc" for a, p in _CONFIGS])
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_kill9_during_ingest_loses_no_acknowledged_instance(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str, associations: int, processes: int
) -> None:
    sources = _source_datasets()
    rng = random.Random(f"{SEED}-{backend}-{associations}-{processes}")
    totals = TrialResult(0, [], [], [])
    for trial in range(TRIALS):
        tmp = tmp_path / f"trial{trial}"
        tmp.mkdir()
        db_url = None
        if backend == "postgres":
            db_url = request.getfixturevalue("pg_schema_url") if trial == 0 else _fresh_pg_schema(request)
            Database(db_url).upgrade()
        r = _trial(tmp, db_url, associations, processes, rng, sources)
        totals.acknowledged += r.acknowledged
        totals.missing += r.missing
        totals.mismatched += r.mismatched
        totals.unindexed += r.unindexed
    print(f"\ncrash-trials backend={backend} associations={associations} processes={processes} "
          f"trials={TRIALS} acknowledged={totals.acknowledged} missing={len(totals.missing)} "
          f"mismatched={len(totals.mismatched)} unindexed={len(totals.unindexed)}")
    assert totals.acknowledged > 0
    assert not totals.missing and not totals.mismatched and not totals.unindexed, totals


def _fresh_pg_schema(request: pytest.FixtureRequest) -> str:
    """Another empty PostgreSQL schema for a later trial (dropped at the end of the test)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tests.node.conftest import PG_URL

    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    request.addfinalizer(drop)
    return make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )
