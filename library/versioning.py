"""Binding model checkpoints to the anatomy library they were trained with.

A localizer trained on Locus descriptions learns the library's exact texts and hierarchy; run
against a different library its scores silently mean something else.  Checkpoints therefore
record :meth:`AnatomyLibrary.stamp` (name, version, ``content_hash``), and loading one with a
different library is refused unless the operator explicitly overrides (e.g. after a code-only
correction that does not change any retrieval text).

``content_hash`` is the sha256 of a canonical JSON serialisation of the parsed library files
(:meth:`library.anatomy.RawLibrary.canonical_json`), so comments and formatting do not matter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from library.anatomy import AnatomyLibrary
from library.errors import LibraryError, LibraryHashMismatch

log = logging.getLogger(__name__)

#: Key under which checkpoints store :meth:`AnatomyLibrary.stamp`.
CHECKPOINT_KEY = "anatomy_library"


def library_stamp(library: AnatomyLibrary) -> dict[str, str]:
    """What to store in a checkpoint's metadata under :data:`CHECKPOINT_KEY`."""
    return library.stamp()


def stamp_hash(metadata: Mapping[str, Any]) -> str | None:
    """The library hash recorded in checkpoint metadata (a stamp, or a mapping holding one)."""
    stamp = metadata.get(CHECKPOINT_KEY, metadata)
    if not isinstance(stamp, Mapping):
        return None
    value = stamp.get("content_hash")
    return value if isinstance(value, str) else None


def check_library_hash(expected_hash: str | None, library: AnatomyLibrary, override: bool = False) -> None:
    """Refuse to use ``library`` with a checkpoint trained on a library with ``expected_hash``.

    Raises :class:`LibraryHashMismatch` on a mismatch and :class:`LibraryError`
    (``library_hash_missing``) when the checkpoint records no hash, unless ``override`` is set,
    in which case the mismatch is logged as a warning and the caller should flag the result.
    """
    if expected_hash is None:
        if override:
            log.warning("checkpoint records no anatomy library hash; using library %s (%s) by override",
                        library.version, library.content_hash[:12])
            return
        raise LibraryError("the checkpoint records no anatomy library hash, so it cannot be matched to this "
                           f"library ({library.name} {library.version}); override explicitly to use it anyway",
                           code="library_hash_missing")
    if expected_hash == library.content_hash:
        return
    message = (f"the checkpoint was trained with anatomy library {expected_hash[:12]}…, but the loaded library "
               f"{library.name} {library.version} is {library.content_hash[:12]}…; its site texts or codes differ. "
               "Load the matching library or override explicitly")
    if override:
        log.warning("%s (overridden)", message)
        return
    raise LibraryHashMismatch(message, expected=expected_hash, actual=library.content_hash)
