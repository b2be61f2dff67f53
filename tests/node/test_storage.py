"""The spool: UID validation before paths, atomic durable writes, watermark, shared reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.storage import (
    InvalidUidError,
    LocalSpool,
    Spool,
    SpoolFullError,
    Watermark,
    is_valid_uid,
    relpath_for,
    validate_uid,
)

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


@pytest.mark.parametrize(
    "uid",
    ["1.2.3", "0", "1.2.840.10008.5.1.4.1.1.66.7", "1." + "2" * 62],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert validate_uid(uid, "X") == uid


@pytest.mark.parametrize(
    "uid",
    ["", " ", "1.2.", ".1.2", "1..2", "../../etc", "1.2/3", "1.2.3\x00", "1.2.3 ", "a.b", "1." + "2" * 63, None, 123],
)
def test_invalid_uids_are_refused_before_any_path(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUidError) as info:
        validate_uid(uid, "SOPInstanceUID")
    assert "SOPInstanceUID" in info.value.reason
    assert info.value.code == "invalid_uid"


def test_relpath_layout_and_escape_refused(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "spool")
    assert relpath_for(STUDY, SERIES, SOP) == f"{STUDY}/{SERIES}/{SOP}.dcm"
    with pytest.raises(InvalidUidError):
        spool.put_atomic(STUDY, "..", SOP, b"x")
    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError):
            spool.path(bad)
    assert not any((tmp_path / "spool").iterdir())


def test_put_atomic_writes_once_and_is_idempotent(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "spool")
    assert isinstance(spool, Spool)
    rel = spool.put_atomic(STUDY, SERIES, SOP, b"first")
    assert spool.path(rel) == tmp_path / "spool" / STUDY / SERIES / f"{SOP}.dcm"
    with spool.open(rel) as fh:
        assert fh.read() == b"first"
    # A resend keeps the copy that was stored (and indexed) first.
    assert spool.put_atomic(STUDY, SERIES, SOP, b"second") == rel
    assert spool.path(rel).read_bytes() == b"first"
    files = [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    assert files == [spool.path(rel)]  # no temp files left behind


def test_put_from_tempfile_same_and_other_filesystem(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "spool")
    src = tmp_path / "spool" / "incoming.tmp"  # same filesystem: adopted by a hard link
    src.write_bytes(b"payload-1")
    rel = spool.put_atomic(STUDY, SERIES, SOP, src)
    src.unlink()  # pynetdicom deletes its chunked temp file after the handler
    assert spool.path(rel).read_bytes() == b"payload-1"
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        other = shm / f"locus-test-{os.getpid()}.tmp"
        other.write_bytes(b"payload-2")
        try:
            rel2 = spool.put_atomic(STUDY, SERIES, "1.2.3.4", other)  # other filesystem: copied
        finally:
            other.unlink()
        assert spool.path(rel2).read_bytes() == b"payload-2"


def test_watermark_refuses_without_writing(tmp_path: Path) -> None:
    free = LocalSpool(tmp_path / "s1").space().free_bytes
    full = LocalSpool(tmp_path / "s2", watermark=Watermark(min_free_bytes=free + 10**12))
    report = full.space(1000)
    assert not report.ok and "watermark" in report.reason
    assert not full.free_space_ok()
    with pytest.raises(SpoolFullError) as info:
        full.put_atomic(STUDY, SERIES, SOP, b"data")
    assert "watermark" in str(info.value.reason)
    assert not any((tmp_path / "s2").iterdir())
    # The incoming size counts: a floor just under the free space trips for a big object.
    edge = LocalSpool(tmp_path / "s3", watermark=Watermark(min_free_bytes=max(free - 10**9, 1)))
    assert edge.free_space_ok(0)
    assert not edge.free_space_ok(2 * 10**9)
    frac = LocalSpool(tmp_path / "s4", watermark=Watermark(min_free_fraction=0.999999))
    assert not frac.free_space_ok()
    with pytest.raises(ValueError):
        Watermark(min_free_fraction=1.5)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = LocalSpool(tmp_path / "spool")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)  # the outermost edge: the kernel call
    with pytest.raises(OSError):
        spool.put_atomic(STUDY, SERIES, SOP, b"data")
    monkeypatch.undo()
    assert not spool.exists(relpath_for(STUDY, SERIES, SOP))
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []


def test_sweep_partials_and_shared_mount_reader(tmp_path: Path) -> None:
    writer = LocalSpool(tmp_path / "spool")
    rel = writer.put_atomic(STUDY, SERIES, SOP, b"abc")
    (writer.path(rel).parent / f".{SOP}.xyz.part").write_bytes(b"half")
    assert writer.sweep_partials() == 1
    # A worker mounting the same root (here: the same directory, not created by it) reads it.
    reader = LocalSpool(tmp_path / "spool", create=False)
    assert reader.exists(rel) and reader.open(rel).read() == b"abc"
    with pytest.raises(FileNotFoundError):
        LocalSpool(tmp_path / "missing", create=False)


def test_directory_fsync_left_to_the_caller_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sync_dir=False`` (group commit): the file is fsynced, its directory only by sync_parent."""
    spool = LocalSpool(tmp_path / "spool")
    spool.put_atomic(STUDY, SERIES, "1.2.3.0", b"first")  # creates (and syncs) the directories
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    rel = spool.put_atomic(STUDY, SERIES, SOP, b"data", sync_dir=False)
    assert synced == ["file"] and spool.path(rel).read_bytes() == b"data"
    spool.sync_parent(rel)
    assert synced == ["file", "dir"]
    synced.clear()
    spool.put_atomic(STUDY, SERIES, "1.2.3.9", b"more")  # the default keeps the directory fsync
    assert synced == ["file", "dir"]
