"""Errors raised by the anatomy library.

``library`` imports nothing else from Locus, so it cannot use ``pipelines.errors``; these classes
mirror that contract (a human-readable reason plus a stable snake_case ``code``) so callers in
``pipelines``/``node`` can translate them without parsing messages.
"""

from __future__ import annotations


class LibraryError(Exception):
    """The anatomy library (or a file that claims to be one) is unusable.

    ``code`` is stable snake_case, e.g. ``library_file_missing``, ``library_format``,
    ``library_hash_mismatch``, ``unknown_site``, ``hclal_format``, ``hclal_unmapped``.
    """

    def __init__(self, message: str, *, code: str = "library_error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class LibraryHashMismatch(LibraryError):
    """A model checkpoint was trained with a different anatomy library than the one loaded."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message, code="library_hash_mismatch")
        self.expected = expected
        self.actual = actual
