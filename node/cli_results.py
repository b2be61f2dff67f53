"""``locus results``: what the node measured, for people (tables) and scripts (``--json``).

Reads go through ``node.db.repo`` in read-only sessions (on SQLite they do not take the
write lock, so querying never delays the listener).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from node.db import Database, Session, open_database, repo
from node.db.models import StudyStatus
from node.presentation import LesionView, no_report_reason, plural, print_lesions, print_table, wide_console
from node.settings import LocusSettings


def query_database(ctx: click.Context, *, as_json: bool = False) -> Database:
    """Open the configured results database for a query, and say which one it is.

    Never creates a database (a query run in the wrong directory says so instead of
    reporting "0 studies" from a file it just made); the database is named, password
    masked, on stdout before a table and on stderr (only at a terminal) before JSON, so
    scripts reading ``--json`` get JSON alone.
    """
    settings = ctx.find_object(LocusSettings)
    if settings is None:
        raise click.UsageError("no settings on the click context (run through the `locus` command)")
    database: Database = open_database(settings.database, create=False)
    line = f"database: {database.masked_url}"
    if not as_json:
        click.echo(line)
    elif sys.stderr.isatty():
        click.echo(line, err=True)
    return database


@contextmanager
def readonly_session(ctx: click.Context, *, as_json: bool = False) -> Iterator[Session]:
    """A read-only session on the configured results database (for query commands)."""
    database = query_database(ctx, as_json=as_json)
    try:
        with database.session(readonly=True) as session:
            yield session
    finally:
        database.dispose()


def require_study(session: Session, study_uid: str) -> None:
    """Stop with "no such study" (exit 1) unless the database knows ``study_uid``."""
    if not repo.study_exists(session, study_uid):
        raise click.ClickException(f"no such study: no study with Study Instance UID {study_uid} in this database")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default, sort_keys=False))


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
@click.option("--status", default=None, type=click.Choice([s.value for s in StudyStatus]),
              help="Only studies in this status.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def studies(ctx: click.Context, limit: int, status: str | None, as_json: bool) -> None:
    """Most recently active studies."""
    with readonly_session(ctx, as_json=as_json) as session:
        rows = repo.list_studies(session, limit=limit, status=status)
    if as_json:
        _emit_json([asdict(r) for r in rows])
        return
    headers = ("Study Instance UID", "Status", "Version", "Series", "Instances", "Lesions", "Last received")
    cells = [[r.study_uid, r.status + (" (late instances)" if r.has_late_instances else ""),
              str(r.latest_version or "—"), str(r.series), str(r.instances),
              "—" if r.lesions is None else str(r.lesions), format_when(r.last_received_at)] for r in rows]
    print_table(_console(), plural(len(rows), "study", "studies"), headers, cells, no_wrap=("Study Instance UID",))


def lesion_views(rows: list[repo.LesionRow]) -> list[LesionView]:
    """Database rows as the shared lesion view (same columns and rounding as the demo)."""
    return [LesionView(lesion_id=r.lesion_id, segment=r.segment_number, label=r.label, site=r.site_name or r.site_id,
                       suv_max=r.suv_max, suv_mean=r.suv_mean, suv_peak=r.suv_peak, suv_unit=r.suv_unit,
                       volume_ml=r.volume_ml, tlg=r.tlg, ct_mean_hu=r.ct_mean_hu, study_uid=r.study_uid)
            for r in rows]


@results.command("lesions")
@click.argument("study_uid", required=False)
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def lesions(ctx: click.Context, study_uid: str | None, limit: int, as_json: bool) -> None:
    """Lesions of the newest analysed version of one study (or of every study)."""
    with readonly_session(ctx, as_json=as_json) as session:
        if study_uid is not None:
            require_study(session, study_uid)
        rows = repo.list_lesions(session, study_uid, limit=limit)
    if as_json:
        _emit_json([asdict(r) for r in rows])
        return
    print_lesions(lesion_views(rows), _console(), title=plural(len(rows), "lesion"), with_study=study_uid is None)


@results.command("show")
@click.argument("study_uid")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def show(ctx: click.Context, study_uid: str, as_json: bool) -> None:
    """Everything about one study: series, versions, analyses, lesions, reports, exports."""
    with readonly_session(ctx, as_json=as_json) as session:
        require_study(session, study_uid)
        detail = repo.study_detail(session, study_uid)
        lesion_rows = repo.list_lesions(session, study_uid) if detail is not None else []
    if detail is None:
        raise click.ClickException(f"no such study: no study with Study Instance UID {study_uid} in this database")
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
    print_table(console, "Series", ("Series Instance UID", "Modality", "Instances", "Slices"),
                [[s["series_uid"], s["modality"], str(s["instances"]), _slices(s)] for s in detail["series"]],
                no_wrap=("Series Instance UID",))
    version_rows = []
    for v in detail["versions"]:
        a = v["analysis"] or {}
        version_rows.append([
            str(v["version"]),
            v["state"],
            v["completion_rule"],
            format_when(v["ready_at"]),
            str(v["instances"]),
            a.get("status", "—"),
            escape(" ".join(x for x in (a.get("reason_code"), a.get("reason")) if x)
                   or no_report_reason(a.get("result")) or "—"),
        ])
    print_table(console, "Versions", ("Version", "State", "Rule", "Ready", "Instances", "Analysis", "Reason"),
                version_rows)
    if lesion_rows:
        print_lesions(lesion_views(lesion_rows), console, title=plural(len(lesion_rows), "lesion"))
    if detail["reports"]:
        print_table(console, "Reports", ("Version", "SR SOP Instance UID", "Predecessor", "Exports"),
                    [[str(r["version"]), r["sr_sop_uid"], r["predecessor_sop_uid"] or "—",
                      escape(", ".join(f"{e['destination']}: {e['state']}" for e in r["exports"]) or "—")]
                     for r in detail["reports"]],
                    no_wrap=("SR SOP Instance UID", "Predecessor"))


#: Single-frame image modalities: one instance per slice.
_ONE_SLICE_PER_INSTANCE = frozenset({"CT", "MR", "PT"})


def _slices(series: dict[str, Any]) -> str:
    """Slices of a series: Number of Slices (0054,0081) where the sender gave it (PET, PS3.3
    C.8.9.4), else the instance count of a single-frame CT/MR/PET series, else "—"."""
    if series.get("number_of_slices"):
        return str(series["number_of_slices"])
    return str(series["instances"]) if series.get("modality") in _ONE_SLICE_PER_INSTANCE else "—"


def _attach_similar() -> None:
    """``locus results similar`` lives in its own module (HLIP search); attached here."""
    from node.cli_similar import similar

    results.add_command(similar, name="similar")


_attach_similar()
