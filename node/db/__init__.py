"""The results database: the only package of Locus that imports SQLAlchemy.

``Database`` (engine + sessions + migrations) lives in :mod:`node.db.base`, the tables in
:mod:`node.db.models`, and every read and write the rest of the node does goes through
the functions of :mod:`node.db.repo`, which take a ``Session`` first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from node.db.base import Database

if TYPE_CHECKING:
    from node.settings import DatabaseSettings

__all__ = ["Database", "Session", "open_database"]


def open_database(settings: DatabaseSettings, *, upgrade: bool | None = None) -> Database:
    """Open the configured database, migrating it first where that is automatic.

    ``upgrade=None`` follows ``settings.should_auto_upgrade`` (on for the embedded SQLite
    default, off for a shared PostgreSQL, which ``locus db upgrade`` migrates).
    """
    database = Database(settings.url, echo=settings.echo, sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    if settings.should_auto_upgrade if upgrade is None else upgrade:
        database.upgrade()
    return database
