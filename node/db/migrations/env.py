"""Alembic environment for the results database.

Runs on the connection handed over in ``config.attributes["connection"]`` (what
``Database.upgrade`` does, so SQLite's WAL/foreign-key hooks apply), or on a fresh engine
for ``sqlalchemy.url`` / ``$LOCUS_DATABASE__URL`` when Alembic is driven from its own CLI.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from node.db import models  # noqa: F401  (registers the tables on Base.metadata)
from node.db.base import Base

target_metadata = Base.metadata

# Serialises concurrent "upgrade head" runs on PostgreSQL (several services starting at
# once); SQLite is serialised by BEGIN IMMEDIATE already.
_PG_LOCK_KEY = 0x4C4F435553  # "LOCUS"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER needs table copies
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get("LOCUS_DATABASE__URL")
    if not url:
        raise RuntimeError("no database: pass a connection or set sqlalchemy.url / LOCUS_DATABASE__URL")
    from node.db.base import Database

    database = Database(url)
    try:
        with database.engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        database.dispose()


def run_migrations_offline() -> None:
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get("LOCUS_DATABASE__URL")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
