"""DICOM TLS (PS3.15 Annex B.9) over real loopback sockets: the listener's TLS port with
dcmtk (echoscu/storescu +tls) and pynetdicom clients, mutual authentication refusals
(untrusted CA, expired certificate, no TLS at all), slots during failed handshakes, and
export to a dcmtk storescp in TLS mode. Certificates come from tests/helpers/certs.py.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node.db import repo
from node.db.base import Database
from node.export.outbox import DestinationResolver
from node.export.scu import Peer, PeerTls, send_instance
from node.listener.ae import AllowedCaller
from node.listener.server import ListenerConfig, ListenerServer, start_listener
from node.listener.tls import client_context
from node.settings import LocusSettings
from node.storage import LocalSpool
from pipelines.errors import TransientError
from tests.conftest import dcmtk, dcmtk_env, free_port
from tests.helpers.certs import Pki, make_pki
from tests.helpers.polling import wait_until

pytestmark = pytest.mark.network

CT_FILE = "seg-ct-liver3slice-multivendor/ct/01.dcm"
SR_FILE = "seg-sr-highdicom-smallct/sr/sr_document.dcm"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'locus.db'}")
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def spool(tmp_path: Path) -> LocalSpool:
    return LocalSpool(tmp_path / "spool")


def _start(db: Database, spool: LocalSpool, pki: Pki, **overrides: Any) -> ListenerServer:
    values: dict[str, Any] = dict(
        ae_title="LOCUS", host="127.0.0.1", port=free_port(),
        allowed_callers=(AllowedCaller("TESTSCU"), AllowedCaller("DCMTK")),
        tls_port=free_port(), tls_certificate=str(pki.cert("server")),
        tls_private_key=str(pki.key("server")), tls_client_ca=str(pki.ca),
    )
    values.update(overrides)
    return start_listener(ListenerConfig(**values), db, spool)


@pytest.fixture
def listener(db: Database, spool: LocalSpool, pki: Pki) -> Iterator[ListenerServer]:
    server = _start(db, spool, pki)
    yield server
    server.shutdown()


def _rejections(db: Database) -> list[dict[str, Any]]:
    with db.session(readonly=True) as s:
        return [{**(e.detail or {}), "calling_ae": e.calling_ae}
                for e in reversed(repo.audit_events(s, kind="rejected"))]


def _tls_associate(port: int, pki: Pki, client: str | None = "client", calling: str = "TESTSCU") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ctx = client_context(pki.ca, pki.cert(client) if client else None, pki.key(client) if client else None)
    return ae.associate("127.0.0.1", port, ae_title="LOCUS", tls_args=(ctx, "127.0.0.1"))


def _dcmtk_tls(tool: str, pki: Pki, client: str, port: int, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk(tool), "+tls", str(pki.key(client)), str(pki.cert(client)), "+cf", str(pki.ca),
         "-aet", "DCMTK", "-aec", "LOCUS", "127.0.0.1", str(port), *map(str, files)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )


# ------------------------------------------------------------------ listener


def test_dcmtk_and_pynetdicom_with_good_certificates_store_over_tls(
    listener: ListenerServer, db: Database, spool: LocalSpool, pki: Pki, data_dir: Path
) -> None:
    assert listener.tls_port is not None and listener.tls_port != listener.port
    echo = _dcmtk_tls("echoscu", pki, "client", listener.tls_port)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    store = _dcmtk_tls("storescu", pki, "client", listener.tls_port, data_dir / CT_FILE)
    assert store.returncode == 0, store.stdout + store.stderr
    assoc = _tls_associate(listener.tls_port, pki)
    assert assoc.is_established
    assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(pydicom.dcmread(data_dir / CT_FILE)).Status == 0x0000  # a resend
    assoc.release()
    stored = list(spool.root.rglob("*.dcm"))
    assert len(stored) == 1
    assert pydicom.dcmread(stored[0]).SOPInstanceUID == pydicom.dcmread(data_dir / CT_FILE).SOPInstanceUID
    # The plain port beside it still serves plain associations.
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    plain = ae.associate("127.0.0.1", listener.port, ae_title="LOCUS")
    assert plain.is_established
    plain.release()
    assert _rejections(db) == []


@pytest.mark.parametrize(
    ("client", "reason"),
    [("intruder", "certificate verify failed"), ("expired", "expired"), (None, "certificate")],
)
def test_untrusted_expired_or_missing_client_certificate_refused_and_audited(
    listener: ListenerServer, db: Database, pki: Pki, client: str | None, reason: str
) -> None:
    assoc = _tls_associate(listener.tls_port, pki, client)  # type: ignore[arg-type]
    assert not assoc.is_established
    if client is not None:
        run = _dcmtk_tls("echoscu", pki, client, listener.tls_port)  # type: ignore[arg-type]
        assert run.returncode != 0
    wait_until(lambda: _rejections(db), "the audit row of the failed handshake")
    rows = _rejections(db)
    assert all(r["code"] == "tls_handshake_failed" and r["peer_host"] == "127.0.0.1" for r in rows)
    assert reason in rows[0]["reason"]


def test_plain_client_on_the_tls_port_refused(listener: ListenerServer, db: Database) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.tls_port, ae_title="LOCUS")  # type: ignore[arg-type]
    assert not assoc.is_established
    run = subprocess.run(
        [dcmtk("echoscu"), "-aet", "DCMTK", "-aec", "LOCUS", "127.0.0.1", str(listener.tls_port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0
    wait_until(lambda: len(_rejections(db)) == 2, "two audited handshake failures")
    assert {r["code"] for r in _rejections(db)} == {"tls_handshake_failed"}


def test_allow_list_applies_inside_tls(listener: ListenerServer, db: Database, pki: Pki) -> None:
    assoc = _tls_associate(listener.tls_port, pki, "client", calling="STRANGER")  # type: ignore[arg-type]
    assert assoc.is_rejected
    assert [r["code"] for r in _rejections(db)] == ["calling_ae_not_allowed"]


def test_failed_and_idle_handshakes_hold_no_slot(db: Database, spool: LocalSpool, pki: Pki) -> None:
    with _start(db, spool, pki, maximum_associations=1, acse_timeout=30) as listener:
        port = listener.tls_port
        assert port is not None
        for _ in range(10):
            assert not _tls_associate(port, pki, "intruder").is_established
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(10)]
        try:
            for _ in range(20):  # connect/close without a ClientHello
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            assoc = _tls_associate(port, pki)
            assert assoc.is_established  # not "local limit exceeded", not stuck behind the idle ones
            assoc.release()
        finally:
            for sock in idle:
                sock.close()
    codes = [r["code"] for r in _rejections(db)]
    assert codes == ["tls_handshake_failed"] * 10  # health checks are not audited


def test_tls_only_from_settings(db: Database, spool: LocalSpool, pki: Pki, tmp_path: Path) -> None:
    """dicom.plain_port_enabled = false and the dicom.tls_* settings take effect."""
    tls_port = free_port()
    settings = LocusSettings.load(
        storage={"data_dir": str(tmp_path), "min_free_bytes": 0},
        dicom={"ae_title": "LOCUS", "host": "127.0.0.1", "port": free_port(),
               "plain_port_enabled": False, "tls_port": tls_port,
               "tls_certificate": str(pki.cert("server")), "tls_private_key": str(pki.key("server")),
               "tls_client_ca": str(pki.ca), "allowed_callers": [{"ae_title": "TESTSCU"}]},
    )
    with start_listener(settings, db, spool) as listener:
        assert listener.port == listener.tls_port == tls_port
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", settings.dicom.port), timeout=2).close()
        assoc = _tls_associate(tls_port, pki)
        assert assoc.is_established
        assoc.release()
        assert not _tls_associate(tls_port, pki, None).is_established  # client certificate required


def test_tls_settings_validation(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_certificate"):
        LocusSettings.load(storage={"data_dir": str(tmp_path)}, dicom={"tls_port": 2762})
    with pytest.raises(ValueError, match="plain_port_enabled"):
        LocusSettings.load(storage={"data_dir": str(tmp_path)}, dicom={"plain_port_enabled": False})
    with pytest.raises(ValueError, match="tls = false"):
        LocusSettings.load(storage={"data_dir": str(tmp_path)}, export={"destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 2762, "tls_ca": str(pki.ca)}]})


# ------------------------------------------------------------------ export


def _tls_storescp(pki: Pki, port: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [dcmtk("storescp"), "+tls", str(pki.key("server")), str(pki.cert("server")), "+cf", str(pki.ca),
         "-aet", "PACS", "-od", str(out), str(port)],
        env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _send_when_listening(source: Path, peer: Peer) -> Any:
    deadline = time.monotonic() + 10
    while True:
        try:
            return send_instance(source, peer, timeout=5)
        except TransientError as exc:
            if time.monotonic() > deadline or ("TLS" in str(exc) and "cannot connect" not in str(exc)):
                raise
            time.sleep(0.2)


def test_export_to_a_tls_storescp(tmp_path: Path, pki: Pki, data_dir: Path) -> None:
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    settings = LocusSettings.load(
        storage={"data_dir": str(tmp_path)},
        export={"destinations": [{
            "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": True,
            "tls_ca": str(pki.ca), "tls_certificate": str(pki.cert("client")),
            "tls_private_key": str(pki.key("client")),
        }]},
    )
    peer = DestinationResolver.from_settings(settings).resolve("pacs")  # the export.destinations path
    assert peer.tls == PeerTls(str(pki.ca), str(pki.cert("client")), str(pki.key("client")))
    proc = _tls_storescp(pki, port, out)
    try:
        sr = data_dir / SR_FILE
        assert _send_when_listening(sr, peer).status == 0x0000
        # A peer whose certificate we do not trust is not sent to (and no plain fallback).
        rogue = Peer("PACS", "127.0.0.1", port, tls=PeerTls(ca=str(pki.cert("intruder"))))
        with pytest.raises(TransientError, match="TLS"):
            send_instance(sr, rogue, timeout=5)
        plain = Peer("PACS", "127.0.0.1", port)
        with pytest.raises(TransientError):
            send_instance(sr, plain, timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)
    files = list(out.iterdir())
    assert len(files) == 1
    assert pydicom.dcmread(files[0]).SOPInstanceUID == pydicom.dcmread(data_dir / SR_FILE).SOPInstanceUID
