"""The listener's association plumbing: whole-PDU reads and event-driven wake-ups.

Why this exists. pynetdicom 3.0.4 runs each association as two polling loops: the DUL
thread sleeps 1 ms whenever it finds nothing to do, then checks the socket and its
queues; the acceptor thread sleeps 1 ms before every check for a decoded DIMSE message
(its source notes that they should become event based). And the socket wrapper reads a
PDU in 4096-byte ``recv`` calls. For one C-STORE of a 512×512 CT slice (four 128 KiB
P-DATA-TF PDUs from dcmtk) that is ~130 Python-level ``recv`` calls and, on average,
three half-millisecond polling waits on the critical path (data arrives → DUL wakes;
message complete → acceptor wakes; response queued → DUL wakes): measured with strace
at ~1.5 ms of a ~4 ms instance. The sender waits for every response (PS3.7 §9.1.1,
no asynchronous operations negotiated), so that latency is the ingest rate.

What changes (behaviour, PDUs and the state machine are pynetdicom's, PS3.8 §9.2):

* :class:`BulkReceiveSocket` reads a PDU with ``recv_into`` into one buffer, and its
  ``ready`` *waits* (``select`` on the socket and a wake-up pipe) instead of answering
  "not yet" at once, so the DUL loop runs with no fixed sleep: it wakes when data
  arrives or when its own queues receive something (:class:`WakingQueue`), and at the
  latest every :data:`DUL_IDLE_WAIT_S` to look at its timers and kill flag, as
  pynetdicom's loop does after its sleep.
* the acceptor loop (:class:`node.listener.acceptor.EventDrivenAcceptor`) waits on an
  event set when a DIMSE message is complete or an A-RELEASE/A-ABORT arrives;
* a successful C-STORE response is encoded without pydicom
  (:mod:`node.listener.store_response`).

Always (both loop kinds): the acceptor ends as soon as a connection closes before its
A-ASSOCIATE-RQ (:class:`node.listener.acceptor.LocusAcceptor`), a C-STORE-RQ whose command
UIDs pynetdicom cannot read is answered 0xC213 instead of aborting
(:class:`node.listener.store_response.ListenerDimse`), and on a TLS port the
handshake runs on the connection's thread (:mod:`node.listener.tls`).

Installed through pynetdicom's server extension point: ``AE.make_server(...,
request_handler=LocusRequestHandler)``. The handler lets pynetdicom create and configure
the association, then swaps in these classes (they add behaviour, not state, so the
objects pynetdicom built stay valid) and the waking queues, before any thread of the
association runs. ``ListenerConfig.event_driven=False`` keeps pynetdicom's stock loops and message
encoding (only the whole-PDU reads remain). pynetdicom is pinned (pyproject); the overrides are
tested against that version (tests/node/test_transport.py) and must be reviewed with it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

if TYPE_CHECKING:
    import socket

#: The pynetdicom release the event-driven overrides below were written and tested against.
TESTED_PYNETDICOM = "3.0.4"


def check_pynetdicom_version(event_driven: bool) -> None:
    """Refuse the event-driven receive path on a pynetdicom it was not tested with.

    The overrides reach into pynetdicom's private API; after an upgrade the listener must
    not run them unreviewed. ``dicom.event_driven_associations = false`` runs pynetdicom's
    own association loop instead (the listener test suite runs both ways).
    """
    if event_driven and pynetdicom.__version__ != TESTED_PYNETDICOM:
        raise RuntimeError(
            f"the event-driven listener was tested with pynetdicom {TESTED_PYNETDICOM}, not "
            f"{pynetdicom.__version__}: set dicom.event_driven_associations = false "
            "(LOCUS_DICOM__EVENT_DRIVEN_ASSOCIATIONS=false) until it is reviewed"
        )


#: Longest a DUL loop waits for data or a queued primitive before it looks at its
#: timers (ARTIM, PS3.8 §9.1.5) and kill flag again. pynetdicom's loop looks every 1 ms;
#: timer granularity of a few milliseconds changes nothing the standard specifies.
DUL_IDLE_WAIT_S = 0.005


class WakingQueue(queue.Queue):
    """A ``queue.Queue`` that calls ``wake()`` after every ``put``.

    pynetdicom's loops poll their queues; this lets a waiting loop be woken instead.
    Readers still use the ordinary Queue API (``get``, ``queue[0]`` peeks).
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put, then wake the DUL thread that waits on the wake pipe."""
        super().put(item, block, timeout)
        self._wake()

    @classmethod
    def replacing(cls, old: queue.Queue, wake: Callable[[], None]) -> WakingQueue:
        """A waking queue holding what ``old`` holds now (e.g. the Evt5 of the accept)."""
        new = cls(wake)
        while True:
            try:
                new.put_nowait(old.get_nowait())
            except queue.Empty:
                return new


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class WakePipe:
    """A self-pipe: ``signal()`` makes ``fileno()`` readable until ``drain()``.

    Closed by the acceptor once its DUL thread has ended (never while that thread may
    still ``select`` on it: a recycled descriptor number would be watched instead), or
    at garbage collection.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.closed = False
        self._pending = False
        self._finalizer = weakref.finalize(self, _close_fds, self._r, self._w)

    def fileno(self) -> int:
        """The read end, for ``select``."""
        return self._r

    def signal(self) -> None:
        """Make the read end readable (once until drained), so a waiting reader wakes."""
        if self._pending:  # already readable: the reader will look at every queue
            return
        self._pending = True
        # A full pipe already wakes the reader; a closed one has nobody left to wake.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"\0")

    def drain(self) -> None:
        """Empty the pipe after waking, so the next ``select`` waits again."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._r, 4096):
                pass
        # Cleared only after reading: a signal skipped in between had queued its item
        # before signalling, and the reader looks at its queues after every drain.
        self._pending = False

    def close(self) -> None:
        """Close both ends (idempotent)."""
        self.closed = True
        self._finalizer()


class BulkReceiveSocket(AssociationSocket):
    """``AssociationSocket`` that reads whole PDUs and lets the DUL loop block on I/O.

    ``recv`` keeps pynetdicom's contract exactly: block until ``nr_bytes`` are read, or
    return the shorter data read so far when the peer closes the connection (the DUL
    then raises Evt17, PS3.8 §9.2); ``OSError``/``TimeoutError`` propagate.
    """

    #: Set by :class:`LocusRequestHandler` when the DUL loop is event driven.
    wake_pipe: WakePipe | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` into one buffer with as few system calls as the kernel allows."""
        sock = cast("socket.socket", self.socket)
        buffer = bytearray(nr_bytes)
        nr_read = 0
        with memoryview(buffer) as view:
            while nr_read < nr_bytes:
                got = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not got:  # connection closed: what was read so far, as pynetdicom does
                    break
                nr_read += got
        if nr_read < nr_bytes:
            del buffer[nr_read:]
        return buffer

    @property
    def ready(self) -> bool:
        """True if data can be read; otherwise waits up to ``DUL_IDLE_WAIT_S`` first.

        The wait ends early when the DUL's queues receive something (the wake pipe), so
        a response queued by the acceptor thread is sent at once.
        """
        pipe = self.wake_pipe
        if pipe is None:
            return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]
        sock = self.socket
        if sock is None or self._is_connected is False or pipe.closed:
            time.sleep(DUL_IDLE_WAIT_S)  # nothing to wait on: do not spin the DUL loop
            return False
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes select misses
        if pending is not None and pending():
            return True
        try:
            waitables: list[socket.socket | WakePipe] = [sock, pipe]
            readable, _, _ = select.select(waitables, [], [], DUL_IDLE_WAIT_S)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed, as pynetdicom does
            return False
        if pipe in readable:
            pipe.drain()
        return sock in readable


def make_event_driven(assoc: Association) -> None:
    """Give a just-created acceptor (threads not started) waking queues and loops."""
    from node.listener.acceptor import EventDrivenAcceptor
    from node.listener.store_response import FastStoreResponses

    sock = cast(BulkReceiveSocket, assoc.dul.socket)
    pipe = WakePipe()
    sock.wake_pipe = pipe
    dul = assoc.dul

    def wake_dul() -> None:
        # The DUL thread queues events for itself (Evt10 for every P-DATA PDU it reads);
        # only other threads' puts need to interrupt its wait.
        if threading.current_thread() is not dul:
            pipe.signal()

    dul.event_queue = WakingQueue.replacing(dul.event_queue, wake_dul)
    dul.to_provider_queue = WakingQueue.replacing(dul.to_provider_queue, wake_dul)
    dul._run_loop_delay = 0  # the loop's waiting happens in BulkReceiveSocket.ready
    EventDrivenAcceptor.adopt(assoc)
    assoc.dimse.__class__ = FastStoreResponses  # node.listener.store_response


class SharedSyntaxContext(PresentationContext):
    """A supported presentation context that pynetdicom can copy cheaply.

    pynetdicom deep-copies the server's supported contexts for every association
    (``RequestHandler._create_association``); for Locus's ~170 storage contexts with
    ~13 transfer syntaxes each that was ~30 ms of CPU per association, measured with
    py-spy. The values inside are UIDs (immutable ``str``), so a copy with its own
    lists is as independent as a deep one.
    """

    @classmethod
    def of(cls, context: PresentationContext) -> SharedSyntaxContext:
        """A copy of ``context`` whose transfer-syntax list is not re-validated on each access."""
        new = cls()
        new.__dict__.update(context.__dict__)
        new._transfer_syntax = list(context._transfer_syntax)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedSyntaxContext:
        new = copy.copy(self)
        new._transfer_syntax = list(self._transfer_syntax)
        return new


#: pynetdicom's default logging handlers, bound to every association. They only write
#: INFO/DEBUG lines (and copy each received data set to say whether there is one).
_STANDARD_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def drop_unlogged_standard_handlers(assoc: Association) -> None:
    """Unbind pynetdicom's logging handlers when their lines would be discarded.

    Locus keeps pynetdicom's logger at WARNING (node.logging); with INFO enabled for it
    (debugging a sender) the handlers stay.
    """
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    for event, handler in _STANDARD_HANDLERS:
        assoc.unbind(event, handler)


class LocusRequestHandler(RequestHandler):
    """pynetdicom's acceptor request handler with this module's receive path.

    ``server.locus_event_driven`` (set by ``node.listener.server``) selects the
    event-driven loops; whole-PDU reads are always used. ``server.locus_tls`` (a
    :class:`node.listener.tls.TlsAcceptor`) makes this a TLS listener: the handshake runs
    here, on the connection's thread, before any association exists.
    """

    def handle(self) -> None:
        """Serve one connection: TLS handshake when configured, then the association."""
        tls = getattr(self.server, "locus_tls", None)
        if tls is not None:
            peer = str(self.client_address[0]) if isinstance(self.client_address, tuple) else "?"
            wrapped = tls.handshake(self.request, peer)
            if wrapped is None:
                return  # refused and closed; no association, no slot
            self.request = wrapped
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        drop_unlogged_standard_handlers(assoc)
        if type(assoc) is Association:  # node.listener.acceptor: a closed connection ends at once
            from node.listener.acceptor import LocusAcceptor

            assoc.__class__ = LocusAcceptor
            # Thread.__init__ bound the target to the old class's run_reactor: rebind it.
            assoc._target = make_target(assoc.run_reactor)  # type: ignore[attr-defined]
        if type(assoc.dimse) is DIMSEServiceProvider:  # 0xC213 for an unreadable command UID
            from node.listener.store_response import ListenerDimse

            assoc.dimse.__class__ = ListenerDimse
        sock = assoc.dul.socket
        if type(sock) is not AssociationSocket:  # someone else's subclass: leave it be
            return assoc
        sock.__class__ = BulkReceiveSocket  # same object and state; new methods only
        if getattr(self.server, "locus_event_driven", False):
            make_event_driven(assoc)
        return assoc
