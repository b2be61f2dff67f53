"""``locus echo AE@host:port``: DICOM Verification (C-ECHO, PS3.4 Annex A) against a peer.

The first thing to run when "results never appear in the PACS" (docs/design.md F8): it shows
whether the peer is reachable and accepts our calling AE title.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator

import click

from node.export.scu import Peer, echo
from pipelines.errors import TransientError

_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


def parse_target(text: str) -> Peer:
    """Parse ``AE@host:port`` (IPv6 hosts in brackets: ``AE@[::1]:104``)."""
    m = _TARGET.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r} is not AE@host:port")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise click.BadParameter(f"port {port} out of range 1-65535")
    return Peer(ae_title=m["ae"].strip(), host=m["host"].strip("[]"), port=port)


def _calling_default(ctx: click.Context) -> str:
    settings = ctx.find_root().obj
    export = getattr(settings, "export", None)
    return str(getattr(export, "calling_ae_title", None) or "LOCUS")


@contextlib.contextmanager
def _pynetdicom_quiet() -> Iterator[None]:
    """Silence pynetdicom's own log lines for one command: it logs an unreachable peer at
    ERROR ("Association request failed", "TCP Initialisation Error") before Locus's one
    line says the same, and a person at a terminal should read it once."""
    logger = logging.getLogger("pynetdicom")  # its modules log to children ("pynetdicom.transport")
    before = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(before)


@click.command("echo")
@click.argument("target")
@click.option("--calling-ae", "calling_ae", default=None, help="Our AE title (default: export.calling_ae_title).")
@click.option("--timeout", default=10.0, show_default=True, type=float, help="Seconds per network step.")
@click.pass_context
def echo_command(ctx: click.Context, target: str, calling_ae: str | None, timeout: float) -> None:
    """Send a C-ECHO to TARGET, given as AE@host:port."""
    peer = parse_target(target)
    calling = calling_ae or _calling_default(ctx)
    started = time.perf_counter()
    try:
        with _pynetdicom_quiet():
            status = echo(peer, calling_ae_title=calling, timeout=timeout)
    except TransientError as exc:
        click.echo(f"C-ECHO {peer} failed: {exc.reason.removeprefix(f'{peer}: ')}", err=True)
        ctx.exit(2)
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    if status != 0x0000:
        click.echo(f"C-ECHO {peer}: status 0x{status:04X} ({elapsed_ms:.0f} ms)", err=True)
        ctx.exit(1)
        return
    click.echo(f"C-ECHO {peer} from {calling}: success ({elapsed_ms:.0f} ms)")
