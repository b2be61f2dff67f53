"""The results database: the only package of Locus that imports SQLAlchemy.

``Database`` (engine + sessions + migrations) lives in :mod:`node.db.base`, the tables in
:mod:`node.db.models`, and every read and write the rest of the node does goes through
the functions of :mod:`node.db.repo`, which take a ``Session`` first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from node.db.base import Database, DatabaseNotReady

if TYPE_CHECKING:
    from node.settings import DatabaseSettings

__all__ = ["Database", "DatabaseNotReady", "Session", "open_database"]


def open_database(settings: DatabaseSettings, *, upgrade: bool | None = None, create: bool = True,
                  check: bool = True) -> Database:
    """Open the configured database, migrating it first where that is automatic.

    ``upgrade=None`` follows ``settings.should_auto_upgrade`` (on for the embedded SQLite
    default, off for a shared PostgreSQL, which ``locus db upgrade`` migrates).  Without an
    upgrade the schema revision is checked (``check``) and :class:`DatabaseNotReady` raised
    when it is not this code's head.  ``create=False`` (query commands) refuses to create
    a SQLite file that does not exist: a query that reads the wrong directory says so
    instead of reporting "0 studies" from a database it just made.
    """
    if not create and is_missing_sqlite_file(settings.url):
        from node.urls import mask_url

        masked = mask_url(settings.url)
        raise DatabaseNotReady(f"no results database at {masked}: nothing was stored with these settings (set "
                               "LOCUS_DATA_DIR or database.url to the node's; `locus db upgrade` creates an empty one)")
    database = Database(settings.url, echo=settings.echo, sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    try:
        if settings.should_auto_upgrade if upgrade is None else upgrade:
            if check:
                database.check_schema(allow_older=True)
            database.upgrade()
        elif check:
            database.check_schema()
    except BaseException:
        database.dispose()
        raise
    return database


def is_missing_sqlite_file(url: str) -> bool:
    """Whether ``url`` names a SQLite file that does not exist (in-memory databases exist)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    path = parsed.database
    if not path or path == ":memory:" or path.startswith("file:"):
        return False
    return not Path(path).expanduser().exists()
