"""Extra listener processes behind one port, for CPU-bound ingest.

pynetdicom decodes PDUs and DIMSE messages in Python, so one process receives at most
what one core can do under the GIL, however many associations are open. With
``processes > 1`` the serving process starts that many minus one child processes
(``spawn``: no inherited threads or locks) and hands accepted connections to them in
turn: the serving process accepts every TCP connection on the port and passes every
n-th socket to a child over a Unix socket (``SCM_RIGHTS``, ``multiprocessing.reduction``),
keeping its own share; one association always stays in one process. Round robin rather
than ``SO_REUSEPORT``: the kernel spreads ``SO_REUSEPORT`` connections by a hash of their
addresses, which put 3 of 4 parallel associations in one process half of the time
(measured with tests/benchmarks/bench_ingest.py). Children bind no public port.

Each child is a complete listener: its own database engine and group-commit writer
(node.listener.index_writer) and the same spool, so the durability contract of
``node.listener.handlers`` holds per C-STORE in every process. Several writers on one
SQLite file take turns on its write lock (``BEGIN IMMEDIATE``, retried); on PostgreSQL
they commit concurrently.

A child that dies is logged and started again (its open associations are lost, as
with any crash: their senders got no Success and resend); while it is down its turns
go to the serving process. Stopping the parent stops the children; a child also stops
when its parent disappears.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

from node.storage import Watermark

LOGGER = logging.getLogger(__name__)

_CHILD_READY_TIMEOUT_S = 60.0
_RESTART_DELAY_S = 1.0
# "auto" never starts more than this many: every connection is accepted by one thread
# and every process writes the same index, and more than 2 cores were never measured
# here (README, ingest benchmark).
AUTO_PROCESS_CAP = 8
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(cgroup_root: Path = _CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Whole cores allowed by cgroup v2 CPU quotas on this process's cgroup and its
    parents (``cpu.max``: ``docker --cpus``, systemd ``CPUQuota=``), rounded up; None =
    no quota (or no cgroup v2)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    unified = next((line[3:] for line in lines if line.startswith("0::")), None)
    if unified is None:
        return None
    limit: int | None = None
    directory = cgroup_root / unified.strip().lstrip("/")
    while True:
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            cores = math.ceil(int(quota) / int(period)) if quota != "max" and int(period) > 0 else None
        except (OSError, ValueError):
            cores = None
        if cores is not None and cores > 0:
            limit = cores if limit is None else min(limit, cores)
        if directory == cgroup_root or cgroup_root not in directory.parents:
            return limit
        directory = directory.parent


def usable_cpu_count() -> int:
    """Cores this process may run on: its CPU affinity, limited by any cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, quota) if quota is not None else cpus)


def resolve_listener_processes(value: int | str) -> int:
    """``dicom.listener_processes`` as a number: "auto" = one per usable core, capped."""
    if value == "auto":
        return min(AUTO_PROCESS_CAP, usable_cpu_count())
    return int(value)


@dataclass(frozen=True)
class ChildSpec:
    """Everything a child process needs, as plain picklable values."""

    listener: Any  # ListenerConfig with the port already bound by the parent
    database_url: str
    sqlite_busy_timeout_ms: int
    spool_root: str
    watermark: Watermark
    log_level: str = "INFO"


def _child_main(spec: ChildSpec, control: Any, handoff: Any) -> None:
    """Entry point of one child listener process (spawned).

    ``control`` is this child's end of a pipe to the parent: the child sends "ready" once
    it accepts, and stops on any message or on end-of-file (the parent is gone). A pipe,
    not a ``multiprocessing.Event``: an Event's lock held by a process killed with
    SIGKILL would block the parent forever. ``handoff`` brings the sockets of the
    connections the parent passes to this process.
    """
    from node.db.base import Database
    from node.listener.server import start_listener
    from node.logging import configure_logging
    from node.storage import LocalSpool

    configure_logging(spec.log_level)
    db = Database(spec.database_url, sqlite_busy_timeout_ms=spec.sqlite_busy_timeout_ms)
    spool = LocalSpool(spec.spool_root, watermark=spec.watermark, create=False)
    server = start_listener(spec.listener, db, spool)
    receiver = threading.Thread(
        target=_receive_connections, args=(handoff, server.server), name="listener-handoff", daemon=True
    )
    receiver.start()
    try:
        control.send("ready")
        control.poll(None)  # blocks until "stop" or EOF
    except (EOFError, OSError):
        LOGGER.warning("listener process: parent gone, stopping")
    finally:
        server.shutdown()
        db.dispose()


def _receive_connections(handoff: Any, server: Any) -> None:
    """Serve each connection socket the parent passes, as if this process accepted it."""
    while True:
        try:
            fd = recv_handle(handoff)
        except (EOFError, OSError):
            return  # the parent is gone or stopping
        conn = socket.socket(fileno=fd)
        try:
            peer = conn.getpeername()
        except OSError:  # the peer left before we got it
            conn.close()
            continue
        # socketserver's path for an accepted request: a thread runs pynetdicom's
        # request handler (association, AE checks, handlers), then closes the socket.
        server.process_request(conn, peer)


@dataclass
class _Child:
    process: Any
    control: Any  # parent's end of the control pipe
    handoff: Any  # parent's end of the connection hand-off pipe


@dataclass
class ListenerChildren:
    """The child listener processes of one listener, kept at ``count`` while running."""

    spec: ChildSpec
    count: int
    _ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"), repr=False)
    _procs: list[_Child] = field(default_factory=list, repr=False)
    _monitor: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _turn: int = field(default=0, repr=False)
    handed_off: int = 0  # connections passed to children (observability and tests)

    def start(self) -> None:
        """Spawn the listener processes and the thread that restarts one that dies."""
        self._procs = [self._spawn(n) for n in range(self.count)]
        self._monitor = threading.Thread(target=self._watch, name="listener-children", daemon=True)
        self._monitor.start()

    def _spawn(self, n: int) -> _Child:
        ours, theirs = self._ctx.Pipe()
        give, take = self._ctx.Pipe()  # duplex: a Unix socket pair, able to carry descriptors
        proc = self._ctx.Process(
            target=_child_main, args=(self.spec, theirs, take), name=f"locus-listener-{n + 1}", daemon=True
        )
        proc.start()
        theirs.close()
        take.close()
        deadline = time.monotonic() + _CHILD_READY_TIMEOUT_S
        try:
            while not ours.poll(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"listener process {n + 1} did not start (exit code {proc.exitcode})"
                    )
            ours.recv()
        except (RuntimeError, EOFError, OSError) as exc:
            proc.kill()
            proc.join(5)
            ours.close()
            give.close()
            raise RuntimeError(f"listener process {n + 1} did not start: {exc}") from exc
        LOGGER.info("listener process %d (pid %d) serving its share of associations", n + 1, proc.pid)
        return _Child(proc, ours, give)

    def hand_off(self, conn: socket.socket) -> bool:
        """Pass ``conn`` to the child whose turn it is; False = the caller serves it.

        Turns go round the serving process and every child; a child that is down (or
        whose pipe fails) gives its turn back to the caller. Called from the accepting
        thread only.
        """
        turn = self._turn
        self._turn = (turn + 1) % (len(self._procs) + 1)
        if turn == 0 or self._stopping.is_set():
            return False
        child = self._procs[turn - 1]
        if not child.process.is_alive():
            return False
        try:
            send_handle(child.handoff, conn.fileno(), child.process.pid)
        except OSError as exc:
            LOGGER.warning("could not hand a connection to listener process pid %s: %s", child.process.pid, exc)
            return False
        self.handed_off += 1
        return True

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for n, child in enumerate(self._procs):
                if child.process.is_alive() or self._stopping.is_set():
                    continue
                child.control.close()
                child.handoff.close()
                LOGGER.error("listener process %d (pid %s) exited with %s; starting it again",
                             n + 1, child.process.pid, child.process.exitcode)
                time.sleep(_RESTART_DELAY_S)
                try:
                    self._procs[n] = self._spawn(n)
                except Exception:
                    LOGGER.exception("listener process %d could not be restarted", n + 1)

    @property
    def pids(self) -> list[int]:
        """The process ids of the live children (status output and tests)."""
        return [int(c.process.pid) for c in self._procs if c.process.is_alive()]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the children and their monitor; waits up to ``timeout`` seconds each."""
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(10)
        for child in self._procs:
            with contextlib.suppress(OSError):  # that child is gone already
                child.control.send("stop")
            child.control.close()
            child.handoff.close()
        for child in self._procs:
            proc = child.process
            proc.join(timeout)
            if proc.is_alive():
                LOGGER.warning("listener process pid %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(5)


def start_children(
    listener: Any, count: int, *, database_url: str, sqlite_busy_timeout_ms: int,
    spool_root: str, watermark: Watermark, log_level: str,
) -> ListenerChildren:
    """Start ``count`` child listeners for connections handed over by :meth:`ListenerChildren.hand_off`.

    Each child runs the listener configuration on an ephemeral loopback port that
    nobody is told about (pynetdicom's server needs one to run); its associations all
    arrive through the hand-off pipe.
    """
    spec = ChildSpec(
        listener=replace(listener, processes=1),
        database_url=database_url,
        sqlite_busy_timeout_ms=sqlite_busy_timeout_ms,
        spool_root=spool_root,
        watermark=watermark,
        log_level=log_level,
    )
    children = ListenerChildren(spec, count)
    children.start()
    return children
