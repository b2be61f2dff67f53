"""Report export: C-STORE SCU to real receiving SCPs, bounded retries, failed state, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from node.cli_echo import echo_command, parse_target
from node.cli_exports import exports as exports_group
from node.db import repo
from node.db.base import Database
from node.db.models import Export, ExportAttempt
from node.export.outbox import (
    RETURN_TO_SENDER,
    DestinationResolver,
    RetryPolicy,
    process_due_exports,
)
from node.export.scu import ExportRefused, Peer, proposed_contexts, send_instance
from node.settings import LocusSettings
from pipelines.errors import TransientError
from tests.conftest import dcmtk, dcmtk_env, free_port

pytestmark = pytest.mark.network

SR_FILE = "seg-sr-highdicom-smallct/sr/sr_document.dcm"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


class Receiver:
    """A real pynetdicom Storage SCP standing in for the PACS; answers ``status``."""

    def __init__(self, port: int, *, ae_title: str = "PACS", status: int = 0x0000,
                 require_calling: list[str] | None = None) -> None:
        self.port, self.status = port, status
        self.received: list[pydicom.Dataset] = []
        self.proposed: list[list[tuple[str, list[str]]]] = []
        ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless])
        ae.add_supported_context(Verification)
        if require_calling:
            ae.require_calling_aet = require_calling
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_REQUESTED, self._requested)],
        )

    def _requested(self, event: evt.Event) -> None:
        self.proposed.append(
            [(str(c.abstract_syntax), [str(t) for t in c.transfer_syntax])
             for c in event.assoc.requestor.requested_contexts]
        )

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def sr_path(data_dir: Path) -> Path:
    return data_dir / SR_FILE


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    yield r
    r.stop()


# ------------------------------------------------------------------ SCU


def test_proposes_only_the_needed_contexts(receiver: Receiver, sr_path: Path) -> None:
    result = send_instance(sr_path, Peer("PACS", "127.0.0.1", receiver.port), calling_ae_title="LOCUS")
    assert result.status == 0x0000 and not result.warning
    sr = pydicom.dcmread(sr_path)
    assert [d.SOPInstanceUID for d in receiver.received] == [sr.SOPInstanceUID]
    assert receiver.received[0].ContentSequence == sr.ContentSequence
    assert receiver.proposed == [[(sr.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]]
    assert proposed_contexts(COMPREHENSIVE_3D_SR, JPEG2000Lossless) == [(COMPREHENSIVE_3D_SR, [JPEG2000Lossless])]


def test_send_to_dcmtk_storescp(tmp_path: Path, sr_path: Path) -> None:
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(out), str(port)],
        env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        peer = Peer("PACS", "127.0.0.1", port)
        deadline = time.monotonic() + 10
        while True:  # wait for storescp to listen
            try:
                send_instance(sr_path, peer, timeout=5)
                break
            except TransientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    files = list(out.iterdir())
    assert len(files) == 1
    assert pydicom.dcmread(files[0]).SOPInstanceUID == pydicom.dcmread(sr_path).SOPInstanceUID


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(0xB000, "warning"), (0xA700, "transient"), (0xA900, "refused"), (0xC000, "refused")],
)
def test_peer_statuses(sr_path: Path, status: int, outcome: str) -> None:
    r = Receiver(free_port(), status=status)
    peer = Peer("PACS", "127.0.0.1", r.port)
    try:
        if outcome == "warning":
            result = send_instance(sr_path, peer)
            assert result.warning and result.status == 0xB000
        elif outcome == "transient":
            with pytest.raises(TransientError, match="0xA700"):
                send_instance(sr_path, peer)
        else:
            with pytest.raises(ExportRefused) as info:
                send_instance(sr_path, peer)
            assert info.value.status == status
    finally:
        r.stop()


def test_unreachable_and_rejected_peers_are_transient(sr_path: Path) -> None:
    with pytest.raises(TransientError) as info:
        send_instance(sr_path, Peer("PACS", "127.0.0.1", free_port()), timeout=5)
    assert info.value.code == "peer_unreachable"
    r = Receiver(free_port(), require_calling=["SOMEONE"])
    try:
        with pytest.raises(TransientError) as info:
            send_instance(sr_path, Peer("PACS", "127.0.0.1", r.port), calling_ae_title="LOCUS")
        assert info.value.code == "association_rejected"
        assert "Calling AE title not recognised" in info.value.reason
        assert r.received == []
    finally:
        r.stop()


# ------------------------------------------------------------------ outbox


class Clock:
    """A controllable UTC clock, so backoff does not need sleeping."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'locus.db'}")
    database.upgrade()
    yield database
    database.dispose()


def _queue_report(db: Database, reports: Path, sr_path: Path, destination: str, *, calling_ae: str = "MODALITY") -> int:
    """A study with one indexed instance, analysed, with one SR queued for ``destination``."""
    now = datetime.now(UTC)
    study = generate_uid()
    rel = f"{study}/sr.dcm"
    (reports / study).mkdir(parents=True)
    shutil.copy(sr_path, reports / rel)
    sr = pydicom.dcmread(sr_path)
    with db.session() as s:
        repo.record_instance(
            s,
            repo.InstanceRecord(
                study_uid=study, series_uid=generate_uid(), sop_uid=generate_uid(),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.128", modality="PT",
                transfer_syntax=ExplicitVRLittleEndian, path=f"{study}/x.dcm", size_bytes=1,
                calling_ae=calling_ae,
            ),
            now,
        )
        (study_id,) = repo.pending_study_ids(s)
        version_id = repo.create_study_version(s, repo.lock_study(s, study_id), rule="test", reason="test", now=now)
        assert version_id is not None and repo.claim_analysis(s, version_id, now)
        stored = repo.store_analysis_result(
            s, version_id, {}, [],
            {"sr_sop_uid": sr.SOPInstanceUID, "series_uid": sr.SeriesInstanceUID, "path": rel, "predecessor": None},
            now,
        )
        assert stored.report_id is not None
        return repo.create_export(s, stored.report_id, destination, now=now)


def _export(db: Database, export_id: int) -> tuple[str, int, int | None, str | None, int]:
    with db.session(readonly=True) as s:
        e = s.get(Export, export_id)
        attempts = len(list(s.scalars(select(ExportAttempt).where(ExportAttempt.export_id == export_id))))
        return e.state, e.attempts, e.last_status, e.last_error, attempts


def test_pacs_down_then_back_delivered_once_within_bound(db: Database, tmp_path: Path, sr_path: Path) -> None:
    reports, port = tmp_path / "reports", free_port()
    export_id = _queue_report(db, reports, sr_path, "pacs")
    clock = Clock()  # starts after the export was queued, so it is due
    policy = RetryPolicy(max_attempts=4, backoff_base_s=10, backoff_cap_s=40)
    resolver = DestinationResolver({"pacs": Peer("PACS", "127.0.0.1", port, "pacs")})
    run = lambda: process_due_exports(  # noqa: E731
        db, resolver=resolver, policy=policy, reports_root=reports, timeout=5, clock=clock
    )

    (first,) = run()  # PACS down
    assert not first.ok and not first.failed and "peer_unreachable" in first.error
    assert (first.next_attempt_at - clock.now).total_seconds() == pytest.approx(10)
    clock.advance(5)
    assert run() == []  # not due yet: no retry storm
    clock.advance(5)
    (second,) = run()  # still down: backoff doubles
    assert (second.next_attempt_at - clock.now).total_seconds() == pytest.approx(20)
    assert _export(db, export_id)[:2] == ("pending", 2)

    pacs = Receiver(port)  # PACS back
    try:
        clock.advance(20)
        (third,) = run()
        assert third.ok and third.status == 0
        clock.advance(1000)
        assert run() == []
        assert [d.SOPInstanceUID for d in pacs.received] == [pydicom.dcmread(sr_path).SOPInstanceUID]
    finally:
        pacs.stop()
    state, attempts, status, error, history = _export(db, export_id)
    assert (state, attempts, status, error, history) == ("done", 3, 0, None, 3)


def test_attempts_exhausted_then_cli_retry(db: Database, tmp_path: Path, sr_path: Path) -> None:
    reports, port = tmp_path / "reports", free_port()
    export_id = _queue_report(db, reports, sr_path, "pacs")
    clock = Clock()  # starts after the export was queued, so it is due
    policy = RetryPolicy(max_attempts=2, backoff_base_s=1, backoff_cap_s=1)
    resolver = DestinationResolver({"pacs": Peer("PACS", "127.0.0.1", port, "pacs")})
    for _ in range(2):
        outcomes = process_due_exports(db, resolver=resolver, policy=policy, reports_root=reports, timeout=5, clock=clock)
        clock.advance(2)
    assert outcomes[0].failed
    state, attempts, status, error, _ = _export(db, export_id)
    assert (state, attempts, status) == ("failed", 2, None) and "cannot connect" in error
    assert process_due_exports(db, resolver=resolver, policy=policy, reports_root=reports, clock=clock) == []

    settings = LocusSettings.load(
        storage={"data_dir": str(tmp_path), "reports_dir": str(reports)},
        database={"url": str(db.url)},
        export={"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
                "backoff_base_s": 1, "backoff_cap_s": 1, "timeout_s": 5},
    )
    runner = CliRunner()
    listed = runner.invoke(exports_group, ["list", "--json", "--state", "failed"], obj=settings)
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert row["destination"] == "pacs" and "cannot connect" in row["last_error"]
    pacs = Receiver(port)
    try:
        result = runner.invoke(exports_group, ["retry"], obj=settings)
    finally:
        pacs.stop()
    assert result.exit_code == 0, result.output
    assert "1 failed export(s) queued again" in result.output and "1 of 1" in result.output
    assert len(pacs.received) == 1
    assert _export(db, export_id)[0] == "done"


def test_permanent_refusal_fails_at_once(db: Database, tmp_path: Path, sr_path: Path) -> None:
    reports = tmp_path / "reports"
    export_id = _queue_report(db, reports, sr_path, "pacs")
    pacs = Receiver(free_port(), status=0xA900)
    try:
        (outcome,) = process_due_exports(
            db, resolver=DestinationResolver({"pacs": Peer("PACS", "127.0.0.1", pacs.port)}),
            policy=RetryPolicy(5, 1, 1), reports_root=reports,
        )
    finally:
        pacs.stop()
    assert outcome.failed and outcome.status == 0xA900
    state, attempts, status, error, _ = _export(db, export_id)
    assert (state, attempts, status) == ("failed", 1, 0xA900) and "0xA900" in error


def test_return_to_sender_and_unknown_destination(db: Database, tmp_path: Path, sr_path: Path) -> None:
    reports = tmp_path / "reports"
    back = _queue_report(db, reports, sr_path, RETURN_TO_SENDER, calling_ae="MODALITY")
    modality = Receiver(free_port(), ae_title="MODALITY")
    resolver = DestinationResolver({}, {"MODALITY": Peer("MODALITY", "127.0.0.1", modality.port)})
    try:
        (outcome,) = process_due_exports(db, resolver=resolver, policy=RetryPolicy(), reports_root=reports)
    finally:
        modality.stop()
    assert outcome.ok and len(modality.received) == 1 and _export(db, back)[0] == "done"

    lost = _queue_report(db, tmp_path / "reports2", sr_path, "nowhere")
    (outcome,) = process_due_exports(db, resolver=resolver, policy=RetryPolicy(), reports_root=tmp_path / "reports2")
    assert outcome.failed and "destination_unknown" in outcome.error
    assert _export(db, lost)[0] == "failed"


def test_resolver_from_settings(tmp_path: Path) -> None:
    settings = LocusSettings.load(
        storage={"data_dir": str(tmp_path)},
        dicom={"allowed_callers": [{"ae_title": "SCANNER", "host": "10.0.0.5", "port": 104}, {"ae_title": "ANY"}]},
        export={"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.9", "port": 11112}]},
    )
    resolver = DestinationResolver.from_settings(settings)
    assert resolver.resolve("pacs") == Peer("PACS", "10.0.0.9", 11112, "pacs")
    assert resolver.resolve(RETURN_TO_SENDER, ["ANY", "SCANNER"]).host == "10.0.0.5"
    assert resolver.resolve(RETURN_TO_SENDER, ["PACS"]).port == 11112  # a destination with that AE title
    with pytest.raises(ExportRefused):
        resolver.resolve(RETURN_TO_SENDER, ["ANY"])
    assert RetryPolicy(10, 30, 900).delay_s(1) == 30 and RetryPolicy(10, 30, 900).delay_s(7) == 900


# ------------------------------------------------------------------ echo CLI


def test_echo_cli(receiver: Receiver) -> None:
    runner = CliRunner()
    ok = runner.invoke(echo_command, [f"PACS@127.0.0.1:{receiver.port}"], obj=None)
    assert ok.exit_code == 0 and "success" in ok.output
    down = runner.invoke(echo_command, [f"PACS@127.0.0.1:{free_port()}", "--timeout", "3"])
    assert down.exit_code == 2 and "cannot connect" in down.output
    assert parse_target("AE@[::1]:104") == Peer("AE", "::1", 104)
    bad = runner.invoke(echo_command, ["not-a-target"])
    assert bad.exit_code == 2 and "AE@host:port" in bad.output

