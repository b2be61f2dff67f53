"""Logging for the node: configured only at entry points, UIDs in context, never PHI.

Every record gets the study/series/job identifiers of the work in progress from
``contextvars`` (set with :func:`log_context`), so a line can be traced to a study
without ever printing a patient's name or ID. :class:`PhiGuard` drops the values of
known PHI attributes if one is ever passed as a log argument by mistake.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.config
import sys
import time
from collections.abc import Iterator
from typing import Any

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("locus_log_context", default={})  # noqa: B039  # never mutated: log_context sets a copy

# Keywords whose values must never reach a log line (PS3.15 Annex E basic profile subset).
PHI_KEYWORDS = frozenset(
    {"PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress", "AccessionNumber",
     "ReferringPhysicianName", "InstitutionName", "PatientTelephoneNumbers"}
)


@contextlib.contextmanager
def log_context(**ids: str | int | None) -> Iterator[None]:
    """Attach identifiers (study_uid, series_uid, sop_uid, version, task_id ...) to log records."""
    merged = dict(_context.get())
    merged.update({k: str(v) for k, v in ids.items() if v is not None})
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Adds the current :func:`log_context` ids to each record, for both formatters."""
    def filter(self, record: logging.LogRecord) -> bool:
        """Attach a copy of the context ids to the record; never drops it."""
        record.locus_context = dict(_context.get())
        return True


class PhiGuard(logging.Filter):
    """Redact arguments that look like PHI attributes (a pydicom DataElement of a PHI keyword)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact patient-identifying values from the record's arguments before formatting."""
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact(a) for a in record.args)
        return True

    @staticmethod
    def _redact(arg: Any) -> Any:
        keyword = getattr(arg, "keyword", None)
        if keyword in PHI_KEYWORDS:
            return f"<{keyword} redacted>"
        return arg


class CredentialMask(logging.Filter):
    """Mask the password of any URL in a log line (a driver's or broker's message may quote
    the database or broker URL it failed on): :func:`node.urls.mask_url`."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask passwords in URLs in the formatted message."""
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's to report, not ours
            return True
        if "://" in message:
            from node.urls import mask_url

            masked = mask_url(message)
            if masked != message:
                record.msg, record.args = masked, None
        return True


class _AlembicChatter(logging.Filter):
    """Drop Alembic's per-connection INFO lines ("Context impl ...", "Will assume ..."):
    the schema check opens one on every start; migrations ("Running upgrade ...") still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).startswith(("Context impl", "Will assume")))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""
    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line with its context ids."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "locus_context", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the context ids appended, for a terminal."""
    def format(self, record: logging.LogRecord) -> str:
        """The usual line, then the context ids as ``key=value``."""
        base = super().format(record)
        ctx = getattr(record, "locus_context", {})
        if ctx:
            base += " [" + " ".join(f"{k}={v}" for k, v in ctx.items()) + "]"
        return base


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Set up root logging once, from an entry point (CLI command or worker)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(PhiGuard())
    handler.addFilter(CredentialMask())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom is chatty at INFO (one line per PDU); keep its warnings.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # Alembic announces its plugins and connection context at INFO on every start.
    logging.getLogger("alembic.runtime.plugins").setLevel(max(logging.WARNING, root.level))
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _AlembicChatter) for f in migration.filters):
        migration.addFilter(_AlembicChatter())
