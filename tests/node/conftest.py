"""Database fixtures for node tests: every DB test runs on SQLite and on PostgreSQL.

SQLite: a fresh file per test.  PostgreSQL (``$LOCUS_TEST_PG_URL``, default the local
server): a fresh schema per test, made the connection's search_path, dropped afterwards.
When PostgreSQL is unreachable the PostgreSQL half is skipped locally but FAILS when
``CI=true`` (a missing service must not turn into a green build).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from node.db import Database

PG_URL = os.environ.get("LOCUS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

_pg_state: dict[str, str | None] = {}


def _pg_unreachable_reason() -> str | None:
    if "reason" not in _pg_state:
        try:
            engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _pg_state["reason"] = None
        except Exception as exc:  # any failure to connect means "not available"
            _pg_state["reason"] = f"PostgreSQL at {make_url(PG_URL).render_as_string(hide_password=True)}: {exc}"
    return _pg_state["reason"]


def require_postgres() -> None:
    reason = _pg_unreachable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI but unreachable: {reason}")
    pytest.skip(f"PostgreSQL unreachable: {reason}")


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL schema (dropped after the test)."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'locus.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file per session; tests get copies (migrating each costs ~0.5 s)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "locus.db"
    db = Database(f"sqlite:///{path}")
    db.upgrade()
    db.dispose()  # closing the last connection checkpoints the WAL into the file
    assert not path.with_name("locus.db-wal").exists()
    return path


@pytest.fixture
def database(db_url: str, request: pytest.FixtureRequest) -> Iterator[Database]:
    """A migrated, empty results database on each backend."""
    if db_url.startswith("sqlite:///"):
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), db_url.removeprefix("sqlite:///"))
        db = Database(db_url, sqlite_busy_timeout_ms=20_000)
    else:
        db = Database(db_url, sqlite_busy_timeout_ms=20_000)
        db.upgrade()
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def sqlite_db(_sqlite_template: Path, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty SQLite results database (for tests about something else)."""
    path = tmp_path / "locus-sqlite.db"
    shutil.copyfile(_sqlite_template, path)
    db = Database(f"sqlite:///{path}")
    try:
        yield db
    finally:
        db.dispose()
