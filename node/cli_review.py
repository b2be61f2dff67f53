"""``locus review``: radiologists confirm or correct lesion locations, so the site can train on its own data.

* ``locus review confirm STUDY_UID LESION_ID --by NAME [--note TEXT]``: the location shown (the
  newest review, else the localizer's prediction) is right;
* ``locus review correct STUDY_UID LESION_ID SITE_ID --by NAME [--note TEXT]``: the lesion is at
  the library site ``SITE_ID`` (``locus library show`` lists ids; an unknown id is refused);
* ``locus review list [STUDY_UID] [--latest] [--json]``: the review history.

Lesions are those of the study's newest analysed version, named as ``locus results lesions``
shows them.  Every review is kept (the newest wins) and audited with who and when.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from typing import Any

import click
from rich.markup import escape

from library import load_library
from node.cli_results import format_when, readonly_session, require_study
from node.db import Database, open_database
from node.db.reviews import ReviewError, ReviewRow, confirm_location, correct_location, list_reviews
from node.presentation import plural, print_table, wide_console
from node.settings import LocusSettings


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, default=lambda v: v.isoformat() if isinstance(v, dt.datetime) else str(v))


def _write(ctx: click.Context, action: str, study_uid: str, lesion_id: str, site_id: str | None, by: str,
           note: str | None, as_json: bool) -> None:
    settings = ctx.find_object(LocusSettings)
    if settings is None:
        raise click.UsageError("no settings on the click context (run through the `locus` command)")
    library = load_library()
    database: Database = open_database(settings.database, create=False)
    now = dt.datetime.now(dt.UTC)
    try:
        with database.session() as session:
            if action == "confirm":
                row = confirm_location(session, study_uid, lesion_id, reviewer=by, now=now, library=library,
                                       note=note)
            else:
                row = correct_location(session, study_uid, lesion_id, site_id or "", reviewer=by, now=now,
                                       library=library, note=note)
    except ReviewError as exc:
        prefix = "no such study" if exc.code == "unknown_study" else exc.code
        raise click.ClickException(f"{prefix}: {exc.reason}") from exc
    finally:
        database.dispose()
    if as_json:
        click.echo(_json(asdict(row)))
        return
    verb = "confirmed" if action == "confirm" else "corrected"
    was = f" (was {row.previous_site_id})" if row.previous_site_id and row.previous_site_id != row.site_id else ""
    click.echo(f"{study_uid} {row.lesion_id} (version {row.version}): {verb} as {row.site_name} "
               f"[{row.site_id}, {row.site_scheme} {row.site_code}]{was} by {row.reviewer}")


@click.group("review")
def review() -> None:
    """Confirm or correct lesion locations (the ground truth of `locus dataset export`)."""


@review.command("confirm")
@click.argument("study_uid")
@click.argument("lesion_id")
@click.option("--by", "by", required=True, help="Who reviewed (recorded with the time).")
@click.option("--note", default=None, help="Free-text note (kept in the database, not exported).")
@click.option("--json", "as_json", is_flag=True, help="Print the stored review as JSON.")
@click.pass_context
def confirm(ctx: click.Context, study_uid: str, lesion_id: str, by: str, note: str | None, as_json: bool) -> None:
    """Confirm the location currently shown for LESION_ID."""
    _write(ctx, "confirm", study_uid, lesion_id, None, by, note, as_json)


@review.command("correct")
@click.argument("study_uid")
@click.argument("lesion_id")
@click.argument("site_id")
@click.option("--by", "by", required=True, help="Who reviewed (recorded with the time).")
@click.option("--note", default=None, help="Free-text note (kept in the database, not exported).")
@click.option("--json", "as_json", is_flag=True, help="Print the stored review as JSON.")
@click.pass_context
def correct(ctx: click.Context, study_uid: str, lesion_id: str, site_id: str, by: str, note: str | None,
            as_json: bool) -> None:
    """Set the location of LESION_ID to the library site SITE_ID."""
    _write(ctx, "correct", study_uid, lesion_id, site_id, by, note, as_json)


def _print_table(rows: list[ReviewRow], latest: bool) -> None:
    title = plural(len(rows), "lesion") + " reviewed" if latest else plural(len(rows), "review")
    headers = ("Study Instance UID", "Ver", "Lesion", "Action", "Site id", "Site", "Was", "Predicted", "By", "At")
    cells = [[r.study_uid, str(r.version), escape(r.lesion_id), r.action, escape(r.site_id), escape(r.site_name),
              escape(r.previous_site_id or "—"), escape(r.predicted_site_id or "—"), escape(r.reviewer),
              format_when(r.at)] for r in rows]  # escape(): names are data, not rich markup
    print_table(wide_console(), title, headers, cells, no_wrap=("Study Instance UID", "Site id"))


@review.command("list")
@click.argument("study_uid", required=False)
@click.option("--latest", is_flag=True, help="Only each lesion's newest review (the one that counts).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_command(ctx: click.Context, study_uid: str | None, latest: bool, as_json: bool) -> None:
    """Review history, oldest first (of one study, or of all)."""
    with readonly_session(ctx, as_json=as_json) as session:
        if study_uid is not None:
            require_study(session, study_uid)
        rows = list_reviews(session, study_uid, latest_only=latest)
    if as_json:
        click.echo(_json([asdict(r) for r in rows]))
        return
    _print_table(rows, latest)
