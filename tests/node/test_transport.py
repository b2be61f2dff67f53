"""The listener's association plumbing (node.listener.transport / .acceptor).

Unit checks of the whole-PDU reads, the wake-ups and the cheap context copies, and real
loopback associations (pynetdicom SCU) through both the event-driven loops and
pynetdicom's stock loops: release, peer abort and the network idle timeout must end an
association exactly as pynetdicom's own loop does.
"""

from __future__ import annotations

import copy
import logging
import queue
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pynetdicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node.db.base import Database
from node.listener.acceptor import EventDrivenAcceptor
from node.listener.server import ListenerConfig, ListenerServer, start_listener
from node.listener.store_response import FastStoreResponses, _plain_store_success, encode_store_success
from node.listener.transport import (
    BulkReceiveSocket,
    SharedSyntaxContext,
    WakePipe,
    WakingQueue,
    drop_unlogged_standard_handlers,
)
from node.storage import LocalSpool
from tests.conftest import free_port
from tests.helpers.polling import wait_until

pytestmark = pytest.mark.network


def test_pynetdicom_is_the_version_the_overrides_follow() -> None:
    # transport.py and acceptor.py mirror pynetdicom 3.0.4's loops and socket contract;
    # a different version must be reviewed against them before the pin moves.
    assert pynetdicom.__version__ == "3.0.4"


# ------------------------------------------------------------------ socket level


def _bulk_socket(sock: socket.socket) -> BulkReceiveSocket:
    dul = SimpleNamespace(event_queue=queue.Queue())
    return BulkReceiveSocket(SimpleNamespace(dul=dul), client_socket=sock)  # type: ignore[arg-type]


def test_recv_returns_exactly_the_requested_bytes_sent_in_pieces() -> None:
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 1200  # 307,200 bytes, larger than any socket buffer read
    sock = _bulk_socket(a)

    def send_in_pieces() -> None:
        for i in range(0, len(payload), 7000):
            b.sendall(payload[i : i + 7000])

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    got = sock.recv(len(payload) - 100)
    rest = sock.recv(100)
    sender.join()
    assert bytes(got) == payload[:-100]
    assert bytes(rest) == payload[-100:]
    a.close()
    b.close()


def test_recv_returns_what_arrived_when_the_peer_closes() -> None:
    a, b = socket.socketpair()
    sock = _bulk_socket(a)
    b.sendall(b"0123456789")
    b.close()
    assert bytes(sock.recv(4096)) == b"0123456789"
    assert bytes(sock.recv(6)) == b""  # then nothing: the DUL raises Evt17
    a.close()


def test_ready_reports_data_and_is_woken_by_the_pipe() -> None:
    a, b = socket.socketpair()
    sock = _bulk_socket(a)
    pipe = WakePipe()
    sock.wake_pipe = pipe
    pipe.signal()
    pipe.signal()
    assert sock.ready is False  # woken by the pipe, no data
    assert sock.ready is False  # the pipe was drained: this call waited its idle time
    b.sendall(b"\x04")
    assert sock.ready is True
    pipe.close()
    assert sock.ready is False  # a closed pipe: no select on a recycled descriptor
    a.close()
    b.close()


def test_waking_queue_keeps_items_and_order_and_wakes_on_every_put() -> None:
    old: queue.Queue[str] = queue.Queue()
    old.put("Evt5")
    wakes: list[int] = []
    new = WakingQueue.replacing(old, lambda: wakes.append(1))
    new.put("Evt10")
    assert new.queue[0] == "Evt5"  # pynetdicom peeks with queue[0]
    assert [new.get_nowait(), new.get_nowait()] == ["Evt5", "Evt10"]
    assert len(wakes) == 2


def test_shared_syntax_context_copies_are_independent_and_equal() -> None:
    original = SharedSyntaxContext.of(build_context(CTImageStorage, [ExplicitVRLittleEndian]))
    clone = copy.deepcopy([original])[0]
    assert isinstance(clone, SharedSyntaxContext)
    assert clone is not original
    assert clone.abstract_syntax == original.abstract_syntax
    assert clone.transfer_syntax == original.transfer_syntax
    clone.add_transfer_syntax("1.2.840.10008.1.2")
    clone.result = 0
    assert original.transfer_syntax == [ExplicitVRLittleEndian]
    assert original.result is None


def test_standard_log_handlers_dropped_only_when_their_lines_are_discarded() -> None:
    ae = AE()
    logger = logging.getLogger("pynetdicom")
    old = logger.level
    try:
        logger.setLevel(logging.WARNING)
        quiet = Association(ae, MODE_ACCEPTOR)
        assert quiet.get_handlers(evt.EVT_DIMSE_RECV)  # pynetdicom binds its logger handler
        drop_unlogged_standard_handlers(quiet)
        assert quiet.get_handlers(evt.EVT_DIMSE_RECV) == []
        assert quiet.get_handlers(evt.EVT_PDU_SENT) == []

        logger.setLevel(logging.INFO)
        chatty = Association(ae, MODE_ACCEPTOR)
        drop_unlogged_standard_handlers(chatty)
        assert chatty.get_handlers(evt.EVT_DIMSE_RECV)
    finally:
        logger.setLevel(old)


# ------------------------------------------------------------------ C-STORE response


def _store_rsp(status: int = 0x0000, sop: str = "1.2.826.0.1.3680043.8.498.123", message_id: int = 7) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop
    rsp.Status = status
    return rsp


@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.123"])  # even and odd lengths
@pytest.mark.parametrize("message_id", [1, 0xFFFF])
def test_fast_store_success_is_the_command_pynetdicom_would_send(sop: str, message_id: int) -> None:
    message = C_STORE_RSP()
    message.primitive_to_message(_store_rsp(sop=sop, message_id=message_id))
    (pdata,) = list(message.encode_msg(5, 16382))
    expected = pdata.presentation_data_value_list
    assert expected == [(5, b"\x03" + encode_store_success(CTImageStorage, sop, message_id))]


def test_only_plain_successes_take_the_fast_path() -> None:
    assert _plain_store_success(_store_rsp()) is not None
    assert _plain_store_success(_store_rsp(status=0xA700)) is None  # failures: pynetdicom encodes
    commented = _store_rsp()
    commented.ErrorComment = "stored"
    assert _plain_store_success(commented) is None
    request = _store_rsp()
    request.MessageIDBeingRespondedTo = None
    assert _plain_store_success(request) is None


# ------------------------------------------------------------------ real associations


def _listener(db: Database, tmp_path: Path, **overrides: object) -> ListenerServer:
    cfg = ListenerConfig(ae_title="LOCUS", host="127.0.0.1", port=free_port(), **overrides)  # type: ignore[arg-type]
    return start_listener(cfg, db, LocalSpool(tmp_path / "spool"))


def _ct() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.InstanceNumber = "CT", 1
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = b"\x00\x01" * 16
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _associate(server: ListenerServer, network_timeout: float = 20) -> pynetdicom.association.Association:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = 20
    ae.network_timeout = network_timeout
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="LOCUS", max_pdu=0)
    assert assoc.is_established
    return assoc


def _server_side(server: ListenerServer) -> list[Association]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        active = server.server.active_associations
        if active:
            return active
        time.sleep(0.01)
    raise AssertionError("no acceptor association appeared")


@pytest.mark.parametrize("event_driven", [True, False])
def test_store_echo_and_release_through_either_loop(sqlite_db: Database, tmp_path: Path, event_driven: bool) -> None:
    server = _listener(sqlite_db, tmp_path, event_driven=event_driven)
    try:
        assoc = _associate(server)
        (acceptor,) = _server_side(server)
        assert isinstance(acceptor, EventDrivenAcceptor) is event_driven
        assert isinstance(acceptor.dimse, FastStoreResponses) is event_driven
        assert isinstance(acceptor.dul.socket, BulkReceiveSocket)  # whole-PDU reads either way
        ds = _ct()
        for _ in range(3):
            assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert assoc.is_released
        wait_until(lambda: not acceptor.is_alive(), "the acceptor thread ends after A-RELEASE")
        assert acceptor.is_released and not acceptor.is_aborted
        if event_driven:
            assert acceptor.dul.socket.wake_pipe.closed  # no descriptor left behind
        assert (tmp_path / "spool").rglob("*.dcm")
    finally:
        server.shutdown()


def test_peer_abort_ends_the_event_driven_acceptor(sqlite_db: Database, tmp_path: Path) -> None:
    server = _listener(sqlite_db, tmp_path)
    aborted: list[str] = []
    try:
        assoc = _associate(server)
        (acceptor,) = _server_side(server)
        acceptor.bind(evt.EVT_ABORTED, lambda event: aborted.append(event.assoc.name))
        assert assoc.send_c_store(_ct()).Status == 0x0000
        assoc.abort()
        wait_until(lambda: not acceptor.is_alive(), "the acceptor thread ends after A-ABORT")
        assert acceptor.is_aborted and not acceptor.is_released
        assert aborted == [acceptor.name]
    finally:
        server.shutdown()


def test_network_idle_timeout_still_ends_an_idle_association(sqlite_db: Database, tmp_path: Path) -> None:
    server = _listener(sqlite_db, tmp_path, network_timeout=0.3)
    try:
        assoc = _associate(server)
        (acceptor,) = _server_side(server)
        assert assoc.send_c_echo().Status == 0x0000
        # Nothing more is sent: the acceptor's idle timer expires and it ends the
        # association (pynetdicom's default response is an A-ABORT).
        wait_until(lambda: not assoc.is_established, "the idle association is ended by the listener")
        wait_until(lambda: not acceptor.is_alive(), "the acceptor thread ends")
    finally:
        server.shutdown()


def test_untested_pynetdicom_refuses_the_event_driven_path_but_not_the_stock_loop(
    sqlite_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "99.0.0")
    with pytest.raises(RuntimeError, match="event_driven_associations = false"):
        _listener(sqlite_db, tmp_path, event_driven=True)
    server = _listener(sqlite_db, tmp_path, event_driven=False)  # the fallback still serves
    try:
        assoc = _associate(server)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
