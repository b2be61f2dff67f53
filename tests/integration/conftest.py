"""Fixtures shared by the node-level integration tests."""

from __future__ import annotations

import pytest

from node.db import Database
from tests.node.conftest import pg_schema_url, require_postgres  # noqa: F401 - fixture re-exported


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    """Database settings for a running node: the embedded default, or a fresh PostgreSQL schema.

    Production databases are migrated by ``locus db upgrade``, not by the node, so the
    PostgreSQL schema is upgraded here first.
    """
    if request.param == "sqlite":
        return {}
    require_postgres()
    url = request.getfixturevalue("pg_schema_url")
    Database(url).upgrade()
    return {"url": url}
