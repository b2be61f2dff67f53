"""Credentials are masked wherever a URL is shown: one helper (node.urls.mask_url), also on log lines."""

from __future__ import annotations

import logging

import pytest

from node.logging import CredentialMask
from node.settings import LocusSettings
from node.urls import mask_url


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql+psycopg://locus:s3cr@t:x@db.example:5432/locus", "postgresql+psycopg://locus:***@db.example:5432/locus"),
    ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:***@127.0.0.1:5672//"),
    ("redis://user:p/w@host/0", "redis://user:***@host/0"),
    ("postgresql://u@h/db?password=abc&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
    ("sqlite:////data/locus.db", "sqlite:////data/locus.db"),
    ("sqla+sqlite:////data/a:b/broker.db", "sqla+sqlite:////data/a:b/broker.db"),
    ("postgresql://locus@db/locus", "postgresql://locus@db/locus"),
    ('cannot reach "amqp://a:b@h//" nor redis://:c@k/1.', 'cannot reach "amqp://a:***@h//" nor redis://:***@k/1.'),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_settings_urls_and_log_lines_are_masked(caplog: pytest.LogCaptureFixture) -> None:
    settings = LocusSettings(database={"url": "postgresql+psycopg://locus:topsecret@db/locus"},
                             broker={"url": "redis://:brokerpw@redis:6379/0"})
    assert "topsecret" not in mask_url(settings.database.url)
    assert "brokerpw" not in mask_url(settings.broker.url)
    record = logging.LogRecord("kombu", logging.ERROR, __file__, 1, "cannot connect to %s: %s",
                               (settings.broker.url, "refused"), None)
    assert CredentialMask().filter(record)
    assert record.getMessage() == "cannot connect to redis://:***@redis:6379/0: refused"
