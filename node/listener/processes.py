"""Extra listener processes on the same port (``SO_REUSEPORT``), for CPU-bound ingest.

pynetdicom decodes PDUs and DIMSE messages in Python, so one process receives at most
what one core can do under the GIL, however many associations are open. With
``processes > 1`` the listener binds its port with ``SO_REUSEPORT`` and starts that many
minus one child processes (``spawn``: no inherited threads or locks) that bind the same
port the same way; the Linux kernel spreads incoming connections over the sockets
(per connection, so one association always stays in one process).

Each child is a complete listener: its own database engine and group-commit writer
(node.listener.index_writer) and the same spool, so the durability contract of
``node.listener.handlers`` holds per C-STORE in every process. Several writers on one
SQLite file take turns on its write lock (``BEGIN IMMEDIATE`` + busy timeout); on
PostgreSQL they commit concurrently.

A child that dies is logged and started again (its open associations are lost, as
with any crash: their senders got no Success and resend). Stopping the parent stops
the children; a child also stops when its parent disappears.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from node.storage import Watermark

LOGGER = logging.getLogger(__name__)

_CHILD_READY_TIMEOUT_S = 60.0
_RESTART_DELAY_S = 1.0


@dataclass(frozen=True)
class ChildSpec:
    """Everything a child process needs, as plain picklable values."""

    listener: Any  # ListenerConfig with the port already bound by the parent
    database_url: str
    sqlite_busy_timeout_ms: int
    spool_root: str
    watermark: Watermark
    log_level: str = "INFO"


def _child_main(spec: ChildSpec, control: Any) -> None:
    """Entry point of one child listener process (spawned).

    ``control`` is this child's end of a pipe to the parent: the child sends "ready" once
    it accepts, and stops on any message or on end-of-file (the parent is gone). A pipe,
    not a ``multiprocessing.Event``: an Event's lock held by a process killed with
    SIGKILL would block the parent forever.
    """
    from node.db.base import Database
    from node.listener.server import start_listener
    from node.logging import configure_logging
    from node.storage import LocalSpool

    configure_logging(spec.log_level)
    db = Database(spec.database_url, sqlite_busy_timeout_ms=spec.sqlite_busy_timeout_ms)
    spool = LocalSpool(spec.spool_root, watermark=spec.watermark, create=False)
    server = start_listener(spec.listener, db, spool)
    try:
        control.send("ready")
        control.poll(None)  # blocks until "stop" or EOF
    except (EOFError, OSError):
        LOGGER.warning("listener process: parent gone, stopping")
    finally:
        server.shutdown()
        db.dispose()


@dataclass
class ListenerChildren:
    """The child listener processes of one listener, kept at ``count`` while running."""

    spec: ChildSpec
    count: int
    _ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"), repr=False)
    _procs: list[tuple[Any, Any]] = field(default_factory=list, repr=False)  # (process, control pipe)
    _monitor: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self) -> None:
        self._procs = [self._spawn(n) for n in range(self.count)]
        self._monitor = threading.Thread(target=self._watch, name="listener-children", daemon=True)
        self._monitor.start()

    def _spawn(self, n: int) -> tuple[Any, Any]:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main, args=(self.spec, theirs), name=f"locus-listener-{n + 1}", daemon=True
        )
        proc.start()
        theirs.close()
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
            raise RuntimeError(f"listener process {n + 1} did not start: {exc}") from exc
        LOGGER.info("listener process %d (pid %d) accepting on port %d", n + 1, proc.pid, self.spec.listener.port)
        return proc, ours

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for n, (proc, control) in enumerate(self._procs):
                if proc.is_alive() or self._stopping.is_set():
                    continue
                control.close()
                LOGGER.error("listener process %d (pid %s) exited with %s; starting it again",
                             n + 1, proc.pid, proc.exitcode)
                time.sleep(_RESTART_DELAY_S)
                try:
                    self._procs[n] = self._spawn(n)
                except Exception:  # noqa: BLE001 - keep watching; the parent listener still serves
                    LOGGER.exception("listener process %d could not be restarted", n + 1)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p, _ in self._procs if p.is_alive()]

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(10)
        for _, control in self._procs:
            try:
                control.send("stop")
            except OSError:  # that child is gone already
                pass
            control.close()
        for proc, _ in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                LOGGER.warning("listener process pid %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(5)


def start_children(
    listener: Any, count: int, *, database_url: str, sqlite_busy_timeout_ms: int,
    spool_root: str, watermark: Watermark, log_level: str,
) -> ListenerChildren:
    """Start ``count`` child listeners on ``listener.port`` (which must already be bound)."""
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
