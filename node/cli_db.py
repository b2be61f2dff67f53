"""``locus db``: migrate the results database.

The embedded SQLite database is migrated automatically when a process opens it; a
shared PostgreSQL is migrated explicitly with ``locus db upgrade`` before the services
start (several versions of the node must never race to alter a shared schema).
"""

from __future__ import annotations

import click

from node.db import open_database
from node.settings import LocusSettings


def _settings(ctx: click.Context) -> LocusSettings:
    obj = ctx.find_object(LocusSettings)
    if obj is None:
        raise click.UsageError("no settings on the click context (run through the `locus` command)")
    return obj


@click.group("db")
def db() -> None:
    """Results database maintenance."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to migrate to.")
@click.pass_context
def upgrade(ctx: click.Context, revision: str) -> None:
    """Apply the database migrations (idempotent)."""
    settings = _settings(ctx)
    database = open_database(settings.database, upgrade=False, check=False)
    try:
        before = database.current_revision()
        database.upgrade(revision)
        after = database.current_revision()
    finally:
        database.dispose()
    url = database.masked_url
    if before == after:
        click.echo(f"{url}: already at revision {after}")
    else:
        click.echo(f"{url}: migrated from {before or 'empty'} to {after}")


@db.command("current")
@click.pass_context
def current(ctx: click.Context) -> None:
    """Print the revision the database is at ("empty" before the first upgrade)."""
    settings = _settings(ctx)
    database = open_database(settings.database, upgrade=False, check=False)
    try:
        click.echo(database.current_revision() or "empty")
    finally:
        database.dispose()
