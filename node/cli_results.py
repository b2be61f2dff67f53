"""``locus results``: what the node measured, for people (tables) and scripts (``--json``).

Reads go through ``node.db.repo`` in read-only sessions (on SQLite they do not take the
write lock, so querying never delays the listener).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from node.db import Database, Session, open_database, repo
from node.presentation import no_report_reason, wide_console
from node.settings import LocusSettings


@contextmanager
def readonly_session(ctx: click.Context) -> Iterator[Session]:
    """A read-only session on the configured results database (for query commands)."""
    settings = ctx.find_object(LocusSettings)
    if settings is None:
        raise click.UsageError("no settings on the click context (run through the `locus` command)")
    database: Database = open_database(settings.database)
    try:
        with database.session(readonly=True) as session:
            yield session
    finally:
        database.dispose()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default, sort_keys=False))


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def format_when(value: datetime | str | None) -> str:
    """A timestamp for people (seconds, no zone suffix); "—" when unknown."""
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _console() -> Console:
    return wide_console()


@click.group("results")
def results() -> None:
    """Studies, lesions and reports in the results database."""


@results.command("studies")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--status", default=None, help="Only studies in this status (receiving, queued, analysed, ...).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def studies(ctx: click.Context, limit: int, status: str | None, as_json: bool) -> None:
    """Most recently active studies."""
    with readonly_session(ctx) as session:
        rows = repo.list_studies(session, limit=limit, status=status)
    if as_json:
        _emit_json([asdict(r) for r in rows])
        return
    table = Table(title=f"{len(rows)} studies")
    for name in ("Study Instance UID", "Status", "Version", "Series", "Instances", "Lesions", "Last received"):
        table.add_column(name, no_wrap=name == "Study Instance UID")
    for r in rows:
        status_text = r.status + (" (late instances)" if r.has_late_instances else "")
        table.add_row(
            r.study_uid,
            status_text,
            str(r.latest_version or "—"),
            str(r.series),
            str(r.instances),
            "—" if r.lesions is None else str(r.lesions),
            format_when(r.last_received_at),
        )
    _console().print(table)


def _lesion_table(rows: list[repo.LesionRow], *, with_study: bool) -> Table:
    table = Table(title=f"{len(rows)} lesions")
    if with_study:
        table.add_column("Study Instance UID", no_wrap=True)
    for name in ("Lesion", "Label", "Site", "SUVmax", "SUVmean", "SUVpeak", "Volume mL", "TLG", "CT HU"):
        table.add_column(name, justify="right" if name not in ("Lesion", "Label", "Site") else "left")
    for r in rows:
        cells = [
            r.lesion_id,
            escape(r.label),  # labels come from the sender's SEG: never read as rich markup
            escape(r.site_name or r.site_id or "—"),
            _num(r.suv_max),
            _num(r.suv_mean),
            _num(r.suv_peak),
            _num(r.volume_ml),
            _num(r.tlg),
            _num(r.ct_mean_hu, ".0f"),
        ]
        table.add_row(*([r.study_uid] if with_study else []), *cells)
    return table


@results.command("lesions")
@click.argument("study_uid", required=False)
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def lesions(ctx: click.Context, study_uid: str | None, limit: int, as_json: bool) -> None:
    """Lesions of the newest analysed version of one study (or of every study)."""
    with readonly_session(ctx) as session:
        rows = repo.list_lesions(session, study_uid, limit=limit)
    if as_json:
        _emit_json([asdict(r) for r in rows])
        return
    _console().print(_lesion_table(rows, with_study=study_uid is None))


@results.command("show")
@click.argument("study_uid")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def show(ctx: click.Context, study_uid: str, as_json: bool) -> None:
    """Everything about one study: series, versions, analyses, lesions, reports, exports."""
    with readonly_session(ctx) as session:
        detail = repo.study_detail(session, study_uid)
        lesion_rows = repo.list_lesions(session, study_uid) if detail is not None else []
    if detail is None:
        raise click.ClickException(f"no study with Study Instance UID {study_uid}")
    if as_json:
        _emit_json(detail)
        return
    console = _console()
    console.print(f"[bold]Study[/bold] {detail['study_uid']}")
    console.print(
        f"status {detail['status']}, {detail['instances']} instances, "
        f"first received {format_when(detail['first_received_at'])}, last {format_when(detail['last_received_at'])}"
        + (", late instances pending" if detail["has_late_instances"] else "")
    )
    series = Table(title="Series")
    for name in ("Series Instance UID", "Modality", "Instances", "Number of Slices"):
        series.add_column(name, no_wrap=name == "Series Instance UID")
    for s in detail["series"]:
        series.add_row(s["series_uid"], s["modality"], str(s["instances"]), str(s["number_of_slices"] or "—"))
    console.print(series)
    versions = Table(title="Versions")
    for name in ("Version", "State", "Rule", "Ready", "Instances", "Analysis", "Reason"):
        versions.add_column(name)
    for v in detail["versions"]:
        a = v["analysis"] or {}
        versions.add_row(
            str(v["version"]),
            v["state"],
            v["completion_rule"],
            format_when(v["ready_at"]),
            str(v["instances"]),
            a.get("status", "—"),
            " ".join(x for x in (a.get("reason_code"), a.get("reason")) if x)
            or escape(no_report_reason(a.get("result")) or "—"),
        )
    console.print(versions)
    if lesion_rows:
        console.print(_lesion_table(lesion_rows, with_study=False))
    if detail["reports"]:
        reports = Table(title="Reports")
        for name in ("Version", "SR SOP Instance UID", "Predecessor", "Exports"):
            reports.add_column(name, no_wrap=name != "Exports")
        for r in detail["reports"]:
            exports = ", ".join(f"{e['destination']}: {e['state']}" for e in r["exports"]) or "—"
            reports.add_row(str(r["version"]), r["sr_sop_uid"], r["predecessor_sop_uid"] or "—", exports)
        console.print(reports)
