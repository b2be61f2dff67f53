"""Library version and content hash; checkpoints trained on another library are refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from library.anatomy import load_library
from library.errors import LibraryError, LibraryHashMismatch
from library.versioning import CHECKPOINT_KEY, check_library_hash, library_stamp, stamp_hash


def test_hash_ignores_formatting_but_not_content(library_copy: Path) -> None:
    shipped = load_library()
    same = load_library(library_copy)
    assert same.content_hash == shipped.content_hash and same.version == "1.0.0"

    head = library_copy / "sites" / "head.yaml"
    text = head.read_text()
    head.write_text("# a reviewer's comment\n" + text)
    assert load_library(library_copy).content_hash == shipped.content_hash

    old = "in the cerebellum in the posterior cranial fossa"
    assert old in text
    head.write_text(text.replace(old, "in the cerebellar hemispheres"))
    changed = load_library(library_copy)
    assert changed.content_hash != shipped.content_hash


def test_checkpoint_hash_check(library_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    lib = load_library()
    meta = {CHECKPOINT_KEY: library_stamp(lib)}
    assert stamp_hash(meta) == lib.content_hash
    check_library_hash(stamp_hash(meta), lib)  # same library: accepted

    other_hash = "0" * 64
    with pytest.raises(LibraryHashMismatch) as exc:
        check_library_hash(other_hash, lib)
    assert exc.value.code == "library_hash_mismatch"
    assert exc.value.expected == other_hash and exc.value.actual == lib.content_hash
    assert "000000000000" in exc.value.message and lib.content_hash[:12] in exc.value.message

    with caplog.at_level(logging.WARNING, logger="library.versioning"):
        check_library_hash(other_hash, lib, override=True)
    assert "overridden" in caplog.text

    with pytest.raises(LibraryError) as missing:
        check_library_hash(None, lib)
    assert missing.value.code == "library_hash_missing"
    check_library_hash(None, lib, override=True)
