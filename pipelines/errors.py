"""One exception tree for everything a worker can fail with.

The node turns these into recorded states: an :class:`InputError` is a property of the
study (never retried, recorded with its ``code`` and human-readable reason), a
:class:`TransientError` is retried with backoff, and the rest are failures of Locus
itself (model or report) that are recorded and surfaced to the operator.

Every error carries a stable machine-readable ``code`` (snake_case) so the database,
the CLI and tests can match on it without parsing prose.
"""

from __future__ import annotations


class LocusError(Exception):
    """Base of every error Locus raises on purpose."""

    code: str = "locus_error"
    retryable: bool = False

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code

    def __str__(self) -> str:  # the reason is what people read
        return self.reason

    def to_json(self) -> dict[str, str]:
        """The error as JSON, for CLI output and recorded reasons."""
        return {"error": type(self).__name__, "code": self.code, "reason": self.reason}


class InputError(LocusError):
    """The study's data cannot be analysed as sent (never retried)."""

    code = "input_error"


class GeometryError(InputError):
    """Slices or masks cannot be placed consistently in patient space."""

    code = "geometry_error"


class SuvError(InputError):
    """SUV cannot be computed from the PET headers (the caller may fall back to Bq/mL)."""

    code = "suv_unavailable"


class SegmentationError(InputError):
    """A SEG object is unreadable or does not match its source images."""

    code = "segmentation_error"


class ModelError(LocusError):
    """A model or checkpoint is missing, malformed, or incompatible."""

    code = "model_error"


class ReportError(LocusError):
    """The structured report could not be built or validated."""

    code = "report_error"


class TransientError(LocusError):
    """A temporary condition (peer down, database locked); retried with backoff."""

    code = "transient"
    retryable = True
