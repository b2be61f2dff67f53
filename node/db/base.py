"""Engine, sessions and migrations for the results database (SQLite or PostgreSQL).

``Database`` is created once per process (never per request: pynetdicom's qrscp is the
counter-example) and hands out short sessions.  On SQLite it switches on WAL (readers
never block the writer) with ``synchronous=FULL`` (a committed row survives a power cut),
a busy timeout (writers queue instead of failing), foreign keys,
and takes the write lock at ``BEGIN`` (``BEGIN IMMEDIATE``): a deferred transaction that
reads and then writes can fail with SQLITE_BUSY *without* waiting when another writer
committed in between, which the listener threads, the sweeper and the workers would hit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData, create_engine, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

_UPGRADE_LOCK = threading.Lock()

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Deterministic constraint names, identical on both backends, so migrations can name
# what they alter and autogenerate comparisons stay clean.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSON documents; JSONB on PostgreSQL so findings can be queried and indexed there.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends.

    SQLite has no time zone type and returns naive values; PostgreSQL returns
    ``timestamptz`` in the session zone.  Both come back as aware UTC here, and naive
    values are refused on the way in (they are always a bug in a multi-process node).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Store UTC: naive datetimes are taken as UTC, aware ones converted (SQLite keeps no zone)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass timezone-aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Return aware UTC datetimes whatever the backend gave back."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so Alembic migrations name constraints stably."""
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DatabaseNotReady(RuntimeError):
    """The configured database cannot be used as it is: unreachable, missing, or at
    another schema revision than this version of Locus.  The message is one line for
    people (credentials masked) naming what to do; the CLI prints it without a traceback."""


#: Backends the repository code is written and tested for.
SUPPORTED_BACKENDS = frozenset({"sqlite", "postgresql"})


class Database:
    """One engine plus session factories for a database URL.

    ``session()`` is the unit of work: commit on success, rollback on any exception.
    ``session(readonly=True)`` (SQLite only matters) begins a deferred transaction so
    queries from the CLI do not take the write lock.
    """

    def __init__(self, url: str | URL, *, echo: bool = False, sqlite_busy_timeout_ms: int = 30_000) -> None:
        self.url: URL = make_url(url)
        backend = self.url.get_backend_name()
        if backend not in SUPPORTED_BACKENDS:
            # Idempotent inserts use dialect-specific ON CONFLICT; refuse early, with the reason.
            raise ValueError(
                f"database {backend!r} is not supported: use SQLite or PostgreSQL "
                f"(got {self.masked_url})"
            )
        self.is_sqlite = backend == "sqlite"
        self.sqlite_busy_timeout_ms = sqlite_busy_timeout_ms
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            db_path = self.url.database
            if db_path and db_path != ":memory:" and not db_path.startswith("file:"):
                Path(db_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            # Threads share the engine; each pooled connection is used by one thread at a time.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": sqlite_busy_timeout_ms / 1000}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            _install_sqlite_hooks(self.engine, sqlite_busy_timeout_ms)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._readonly_sessions = sessionmaker(
            self.engine.execution_options(locus_readonly=True), expire_on_commit=False
        )

    def __repr__(self) -> str:
        return f"Database({self.masked_url!r})"

    @property
    def masked_url(self) -> str:
        """The URL for people and logs: password masked (:func:`node.urls.mask_url`)."""
        from node.urls import mask_url

        return mask_url(self.url.render_as_string(hide_password=False))

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """A session whose transaction commits when the block ends normally."""
        factory = self._readonly_sessions if readonly else self._sessions
        with factory() as session:
            try:
                yield session
                if readonly:
                    session.rollback()
                else:
                    session.commit()
            except BaseException:
                session.rollback()
                raise

    def upgrade(self, revision: str = "head") -> None:
        """Apply Alembic migrations up to ``revision`` (idempotent; safe when run concurrently)."""
        from alembic import command

        # Alembic keeps its migration context in module globals: one upgrade per process
        # at a time.  Across processes the database serialises them (see env.py).
        with _UPGRADE_LOCK, self.engine.connect() as connection:
            cfg = alembic_config(connection)
            command.upgrade(cfg, revision)
            connection.commit()

    def current_heads(self) -> set[str]:
        """The Alembic revisions the database is at (empty for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return set(MigrationContext.configure(connection).get_current_heads())

    def check_schema(self, *, allow_older: bool = False) -> None:
        """Raise :class:`DatabaseNotReady` unless the database is at this code's head revision(s).

        Run before any other statement, so a fresh or older database stops the process with
        one line naming ``locus db upgrade`` instead of ``UndefinedTable`` tracebacks on every
        query; a database newer than the code (an older node started against it) is refused too.
        ``allow_older`` (before an automatic upgrade) refuses only the unreachable and the newer.
        """
        from sqlalchemy.exc import OperationalError

        from node.urls import mask_url

        masked = self.masked_url
        try:
            current = self.current_heads()
        except OperationalError as exc:
            text = str(exc.orig or exc).strip()
            reason = mask_url(text.splitlines()[0]) if text else type(exc).__name__
            raise DatabaseNotReady(f"cannot open database {masked}: {reason}") from exc
        heads = head_revisions()
        if current == heads or (allow_older and not current):
            return
        if not current:
            raise DatabaseNotReady(f"database {masked} has no Locus schema yet (revision empty, this Locus needs "
                                   f"{', '.join(sorted(heads))}): run `locus db upgrade` first")
        unknown = current - known_revisions()
        if unknown:
            raise DatabaseNotReady(f"database {masked} is at revision {', '.join(sorted(unknown))}, which this "
                                   "version of Locus does not know (a newer Locus migrated it): upgrade Locus")
        if allow_older:
            return
        raise DatabaseNotReady(f"database {masked} is at revision {', '.join(sorted(current))}, this Locus needs "
                               f"{', '.join(sorted(heads))}: run `locus db upgrade`")

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def dispose(self) -> None:
        """Close the pool's connections (tests and process shutdown; forked children must not share them)."""
        self.engine.dispose()


def head_revisions() -> set[str]:
    """The head revision(s) of the migration scripts shipped with this code."""
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def known_revisions() -> set[str]:
    """Every revision of the shipped migration scripts."""
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic ``Config`` built in code, so migrations run from an installed package.

    The migration scripts ship as package data beside this module; no ``alembic.ini`` is
    needed.  With ``connection`` given, env.py migrates on that connection (and engine
    hooks such as SQLite's pragmas apply).
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("version_locations", str(MIGRATIONS_DIR / "versions"))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _install_sqlite_hooks(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (see the begin hook below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            # FULL: every commit fsyncs the WAL, so an acknowledged (C-STORE Success)
            # index row survives a power cut. NORMAL would only sync at checkpoints:
            # consistent after a crash, but the last commits could be lost although
            # their files were fsynced. The listener's group commit amortises the cost.
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        readonly = conn.get_execution_options().get("locus_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")
