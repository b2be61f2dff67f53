"""``locus analyses``: see study versions' analyses and put failed or stranded ones back.

``ctx.obj`` is the node's ``LocusSettings`` (built once by the ``locus`` entrypoint).  A
requeued version goes back to ``pending``; the running node's sweeper enqueues it (no
broker connection is needed here).  Every requeue is audited (``requeued``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from node.db import open_database, repo

STATES = ("pending", "queued", "analysing", "analysed", "failed", "exported", "superseded", "stranded")


def _settings(ctx: click.Context) -> Any:
    settings = ctx.find_root().obj
    if settings is None:
        raise click.UsageError("no settings: run through the `locus` command")
    return settings


def _row_json(r: repo.AnalysisRow) -> dict[str, Any]:
    return {
        "id": r.study_version_id,
        "study_uid": r.study_uid,
        "version": r.version,
        "state": r.state,
        "analysis": r.status,
        "attempts": r.attempts,
        "lease_expires_at": r.lease_expires_at.isoformat() if r.lease_expires_at else None,
        "stranded": r.stranded,
        "reason_code": r.reason_code,
        "reason": r.reason_text,
    }


@click.group("analyses")
def analyses() -> None:
    """Analyses of study versions: state, attempts, lease, reason; re-run them."""


@analyses.command("list")
@click.option("--state", type=click.Choice(STATES), default=None,
              help="Only versions in this state (stranded: analysing, but no worker holds it).")
@click.option("--limit", default=100, show_default=True, help="Most recent study versions to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_analyses(ctx: click.Context, state: str | None, limit: int, as_json: bool) -> None:
    """List study versions (id = study version id) with their analysis state and reason."""
    db = open_database(_settings(ctx).database, create=False)
    with db.session(readonly=True) as s:
        rows = repo.list_analyses(s, datetime.now(UTC), state=state, limit=limit)
    if as_json:
        click.echo(json.dumps([_row_json(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo("no analyses")
        return
    click.echo(f"{'id':>6} {'state':<11} {'attempts':>8}  {'lease expires':<20} study / version / reason")
    for r in rows:
        lease = r.lease_expires_at.strftime("%Y-%m-%d %H:%M:%S") if r.lease_expires_at else "-"
        state_text = "stranded" if r.stranded else r.state
        line = f"{r.study_version_id:>6} {state_text:<11} {r.attempts:>8}  {lease:<20} {r.study_uid} v{r.version}"
        if r.reason_code:
            line += f"\n{'':>8}{r.reason_code}: {r.reason_text or ''}"
        click.echo(line)


@analyses.command("requeue")
@click.argument("version_id", type=int, required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed version (latest of its study).")
@click.option("--stranded", "all_stranded", is_flag=True,
              help="Every version analysing with an expired lease or without an analysis row.")
@click.pass_context
def requeue(ctx: click.Context, version_id: int | None, all_failed: bool, all_stranded: bool) -> None:
    """Put a failed or stranded study version (ID, or --failed / --stranded) back for analysis."""
    if (version_id is not None) + all_failed + all_stranded != 1:
        raise click.UsageError("give exactly one of ID, --failed, --stranded")
    db = open_database(_settings(ctx).database, create=False)
    now = datetime.now(UTC)
    done: list[int] = []
    skipped: list[int] = []
    with db.session() as s:
        if version_id is not None:
            targets = [version_id]
        elif all_failed:
            targets = [r.study_version_id for r in repo.list_analyses(s, now, state="failed", limit=1_000_000)]
        else:
            targets = repo.stranded_versions(s, now)
        for vid in targets:
            try:
                ok = repo.requeue_failed(s, vid, now) or repo.requeue_stranded(s, vid, now)
            except LookupError:
                raise click.ClickException(f"no study version {vid}") from None
            (done if ok else skipped).append(vid)
    click.echo(f"{len(done)} study version(s) requeued" + (f": {', '.join(map(str, done))}" if done else ""))
    if skipped:
        click.echo(f"not requeued (not failed/stranded, or not the latest version of its study): "
                   f"{', '.join(map(str, skipped))}", err=True)  # fmt: skip
        if version_id is not None:
            ctx.exit(1)
