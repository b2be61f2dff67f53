"""Acceptor association loops: a connection that closes before its A-ASSOCIATE-RQ frees its
thread at once, and (event driven) a loop that waits for work instead of sleeping 1 ms.

Waiting for the request. pynetdicom 3.0.4's acceptor waits for the A-ASSOCIATE-RQ with
one ``receive_pdu(timeout=acse_timeout)``: when the peer closes the connection first (a
port scanner, a load-balancer health check), the DUL returns to Sta1 (AA-5, PS3.8
§9.2) and ends, but the association thread keeps waiting out the whole ACSE timeout
(30 s by default), and pynetdicom counts that thread against ``maximum_associations``.
:class:`LocusAcceptor` waits in short slices and stops as soon as the DUL thread has
ended (socket closed: AA-5; ARTIM expired: AA-2, PS3.8 §9.1.5), and it only goes on
with an A-ASSOCIATE primitive (an A-P-ABORT for an invalid first PDU ends it too). The
association limit itself counts requested associations only (node.listener.ae).

pynetdicom 3.0.4's ``Association._run_reactor`` sleeps 1 ms, then checks for a decoded
DIMSE message, a release request, an abort, a dead DUL thread and the network idle
timeout. :class:`EventDrivenAcceptor` runs the same checks in the same order with the
same consequences (PS3.8 §7.2 release, §7.3/7.4 aborts; pynetdicom's events and log
lines), but waits on an event that is set the moment a DIMSE message is complete or
the DUL hands up an A-RELEASE/A-ABORT (both arrive through queues replaced by
:class:`node.listener.transport.WakingQueue`). Without a wake-up it still looks every
:data:`ACCEPTOR_IDLE_WAIT_S`, which bounds how late a dead DUL thread or an expired
network timeout is noticed.

Why: on the C-STORE path the sleep put, on average, half a millisecond between a
complete data set and its handler for every instance (node.listener.transport).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.utils import set_timer_resolution

from node.listener.transport import BulkReceiveSocket, WakingQueue

LOGGER = logging.getLogger("pynetdicom.association")  # where pynetdicom writes these lines

#: Longest the acceptor waits for a wake-up before it re-checks the DUL thread and the
#: network idle timer (seconds; ``network_timeout`` itself is configured in seconds).
ACCEPTOR_IDLE_WAIT_S = 0.05

#: How often an acceptor waiting for its A-ASSOCIATE-RQ looks whether the DUL (and so
#: the connection) has ended; this bounds how long a closed connection holds a thread.
REQUEST_WAIT_SLICE_S = 0.05


class LocusAcceptor(Association):
    """``Association`` whose acceptor ends as soon as its connection does (module docstring)."""

    def run_reactor(self) -> None:
        """Run pynetdicom's reactor, or in the acceptor process only accept and hand connections on."""
        if not self.is_acceptor:
            super().run_reactor()
            return
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()

        primitive = self._wait_for_request()
        if not isinstance(primitive, A_ASSOCIATE):  # closed, ARTIM expired, ACSE timeout, bad PDU
            self.kill()
            self._shutdown_connection()
            # The DUL has stopped: close the wake pipe now rather than at garbage collection.
            pipe = getattr(self.dul.socket, "wake_pipe", None)
            if pipe is not None and not self.dul.is_alive():
                pipe.close()
            return

        # From here on exactly pynetdicom's acceptor path (association.py run_reactor).
        self.requestor.primitive = primitive
        evt.trigger(self, evt.EVT_REQUESTED, {})
        if not self.is_aborted and not self.is_rejected:
            self.acse.negotiate_association()
        if self.is_established:
            with set_timer_resolution(self._timer_resolution):
                self._run_reactor()
        self._shutdown_connection()

    def _wait_for_request(self) -> object | None:
        """The first primitive from the DUL, or None when the connection ended first or
        the ACSE timeout passed (the ARTIM timer, set to the same value, then closes it)."""
        timeout = self.acse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = REQUEST_WAIT_SLICE_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None
            primitive = self.dul.receive_pdu(wait=True, timeout=wait)
            if primitive is not None:
                return primitive
            if not self.dul.is_alive():  # AA-2/AA-5 ended it; take what it queued last
                return self.dul.receive_pdu(wait=False)

    def _shutdown_connection(self) -> None:
        sock = self.dul.socket
        if self._server and sock is not None and sock.socket:
            self._server.shutdown_request(sock.socket)


class EventDrivenAcceptor(LocusAcceptor):
    """``Association`` whose acceptor loop is woken by its queues (module docstring)."""

    _locus_wake: threading.Event

    @classmethod
    def adopt(cls, assoc: Association) -> None:
        """Turn a just-created acceptor (its threads not started) into this class."""
        wake = threading.Event()
        assoc.__class__ = cls
        assoc = cast(EventDrivenAcceptor, assoc)
        assoc._locus_wake = wake
        assoc.dimse.msg_queue = WakingQueue.replacing(assoc.dimse.msg_queue, wake.set)
        assoc.dul.to_user_queue = WakingQueue.replacing(assoc.dul.to_user_queue, wake.set)

    def _run_reactor(self) -> None:
        try:
            self._serve_until_finished()
        finally:
            # Close the DUL's wake pipe once its thread can no longer select on it
            # (otherwise the pipe's finalizer closes it when the association is freed).
            sock = self.dul.socket
            pipe = sock.wake_pipe if isinstance(sock, BulkReceiveSocket) else None
            if pipe is not None and not self.dul.is_alive():
                pipe.close()

    def _serve_until_finished(self) -> None:
        wake = self._locus_wake
        messages = self.dimse.msg_queue
        self._is_paused = False
        while not self._kill:
            if messages.empty():
                wake.wait(ACCEPTOR_IDLE_WAIT_S)
            wake.clear()  # anything queued from here on sets it again

            # The pause point of pynetdicom's loop, used by its send_*() methods.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self._finished():
                return

    def _finished(self) -> bool:
        """pynetdicom's end-of-association checks, in its order; True when it ended."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)  # A-RELEASE-RP
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True

        if self.acse.is_aborted():
            LOGGER.info(
                "Association Aborted%s", " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else ""
            )
            self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for the abort
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True

        if not self.dul.is_alive():
            self.kill()
            return True

        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False
