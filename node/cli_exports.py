"""``locus exports``: see report exports and re-send the failed ones.

``ctx.obj`` is the node's ``LocusSettings`` (built once by the ``locus`` entrypoint).
"""

from __future__ import annotations

import json
from typing import Any

import click

from node.db import open_database, repo
from node.export.outbox import process_due_exports_from_settings


def _settings(ctx: click.Context) -> Any:
    settings = ctx.find_root().obj
    if settings is None:
        raise click.UsageError("no settings: run through the `locus` command")
    return settings


def _export_rows(db: Any, state: str | None, study_uid: str | None, limit: int) -> list[dict[str, Any]]:
    """Exports, newest study first, from the public study queries of node.db.repo."""
    rows: list[dict[str, Any]] = []
    with db.session(readonly=True) as session:
        uids = [study_uid] if study_uid else [s.study_uid for s in repo.list_studies(session, limit=limit)]
        for uid in uids:
            detail = repo.study_detail(session, uid, audit_limit=0)
            if detail is None:
                continue
            for report in detail["reports"]:
                for export in report["exports"]:
                    if state and export["state"] != state:
                        continue
                    rows.append(
                        {
                            "study_uid": uid,
                            "version": report["version"],
                            "sr_sop_uid": report["sr_sop_uid"],
                            **export,
                        }
                    )
    return rows


@click.group("exports")
def exports() -> None:
    """Report exports to the PACS (C-STORE)."""


@exports.command("list")
@click.option("--state", type=click.Choice(["pending", "sending", "done", "failed"]), default=None)
@click.option("--study", "study_uid", default=None, help="Only this Study Instance UID.")
@click.option("--limit", default=100, show_default=True, help="Most recent studies to look at.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_exports(ctx: click.Context, state: str | None, study_uid: str | None, limit: int, as_json: bool) -> None:
    """List exports with their state, attempts and the peer's last status or error."""
    from node.cli_results import query_database

    _settings(ctx)
    db = query_database(ctx, as_json=as_json)
    try:
        rows = _export_rows(db, state, study_uid, limit)
    finally:
        db.dispose()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no exports")
        return
    for r in rows:
        status = f"0x{r['last_status']:04X}" if r["last_status"] is not None else "-"
        line = f"{r['state']:<8} {r['destination']:<16} v{r['version']} attempts={r['attempts']} status={status} sr={r['sr_sop_uid']}"
        if r["state"] != "done" and r["last_error"]:
            line += f"\n         {r['last_error']}"
        click.echo(line)


@exports.command("retry")
@click.option("--study", "study_uid", default=None, help="Only exports of this Study Instance UID.")
@click.option("--destination", default=None, help="Only exports to this destination name.")
@click.option("--send/--no-send", default=True, show_default=True, help="Send now instead of waiting for the worker.")
@click.pass_context
def retry(ctx: click.Context, study_uid: str | None, destination: str | None, send: bool) -> None:
    """Put failed exports back in the queue (a new round of attempts) and send them."""
    from datetime import UTC, datetime

    settings = _settings(ctx)
    db = open_database(settings.database, create=False)
    with db.session() as session:
        count = repo.retry_failed_exports(session, datetime.now(UTC), study_uid=study_uid, destination=destination)
    click.echo(f"{count} failed export(s) queued again")
    if not send or count == 0:
        return
    outcomes = process_due_exports_from_settings(settings, db)
    delivered = sum(o.ok for o in outcomes)
    for o in outcomes:
        if not o.ok:
            when = o.next_attempt_at.isoformat() if o.next_attempt_at else "no further attempts"
            click.echo(f"export {o.export_id} to {o.destination}: {o.error} (next: {when})", err=True)
    click.echo(f"{delivered} of {len(outcomes)} due export(s) delivered")
    if delivered < len(outcomes):
        ctx.exit(1)
