"""The spool: where received DICOM files live until (and after) a worker reads them.

Everything that touches spool files goes through the small :class:`Spool` interface so
the listener (writer) and the workers (readers) agree on one layout and one durability
rule, and so another backend can be swapped in later without touching either side.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. The three
UIDs are validated (PS3.5 §9.1 character repertoire, at most 64 characters) *before* they
are used in a path, so a hostile or broken sender cannot write outside the spool (the
path-traversal lesson of the DCMTK qrscp example).

Durability (the listener answers Success only after this returns): the bytes go to a
temporary file in the target directory (same filesystem), which is flushed and
``fsync``-ed, then moved into place with an atomic no-clobber link (or ``os.replace``
where the filesystem has no hard links), and the directory itself is ``fsync``-ed so the
new name survives a power cut. A reader therefore never sees a half-written file, and a
crash leaves at most a ``*.part`` file, which :meth:`LocalSpool.sweep_partials` removes.
The listener's group-commit writer passes ``sync_dir=False`` and fsyncs each directory
once per batch (:meth:`LocalSpool.sync_parent`) before it commits the batch's index rows,
so the order file fsync → name → directory fsync → index commit → Success is kept.

:class:`LocalSpool` also serves a shared filesystem (NFS, CIFS, a bind-mounted volume):
the listener and the workers only need to mount the same root. ``os.replace`` and
``link`` are atomic within one directory on POSIX filesystems and on NFSv3/v4.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from pipelines.dicom import uid as _uid
from pipelines.dicom.uid import InvalidUidError as InvalidUidError  # raised by validate_uid, re-exported

if TYPE_CHECKING:
    from node.settings import StorageSettings

LOGGER = logging.getLogger(__name__)


_SUFFIX = ".dcm"
_PARTIAL_SUFFIX = ".part"
_COPY_CHUNK = 1 << 20


class SpoolFullError(OSError):
    """The spool is above its free-space watermark; nothing was written."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ENOSPC, reason)
        self.reason = reason


def is_valid_uid(value: object) -> bool:
    """Whether a received UID may be filed (:func:`pipelines.dicom.uid.is_valid_uid`, leading zeros allowed)."""
    return _uid.is_valid_uid(value, allow_leading_zeros=True)


def validate_uid(value: object, what: str) -> str:
    """A received UID checked as by :func:`is_valid_uid`, else :class:`InvalidUidError` naming ``what``."""
    return _uid.validate_uid(value, what, allow_leading_zeros=True)


_VARIANT = re.compile(r"^[0-9a-f]{1,64}$")


def relpath_for(study_uid: str, series_uid: str, sop_uid: str, variant: str | None = None) -> str:
    """The spool-relative path of an instance (validates all three UIDs first).

    ``variant`` (lower-case hex, e.g. a content digest) names a later copy of the same
    SOP instance that replaces the first in the index (dicom.duplicate_policy =
    "replace"): ``<sop>.<variant>.dcm`` beside ``<sop>.dcm``, which is kept.
    """
    study = validate_uid(study_uid, "StudyInstanceUID")
    series = validate_uid(series_uid, "SeriesInstanceUID")
    sop = validate_uid(sop_uid, "SOPInstanceUID")
    if variant is None:
        return f"{study}/{series}/{sop}{_SUFFIX}"
    if not _VARIANT.fullmatch(variant):
        raise ValueError(f"spool variant must be lower-case hex, got {variant!r}")
    return f"{study}/{series}/{sop}.{variant}{_SUFFIX}"


@dataclass(frozen=True)
class Watermark:
    """Free-space floor for the spool filesystem (docs/design.md F7: disk full).

    A write is refused when, after it, fewer than ``min_free_bytes`` would be free or
    the free fraction would fall below ``min_free_fraction``. Both 0 disables the check.
    """

    min_free_bytes: int = 0
    min_free_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0:
            raise ValueError("min_free_bytes must be >= 0")
        if not 0.0 <= self.min_free_fraction < 1.0:
            raise ValueError("min_free_fraction must be in [0, 1)")


@dataclass(frozen=True)
class SpaceReport:
    """Free space of the spool filesystem and whether a write of ``incoming`` bytes fits."""

    free_bytes: int
    total_bytes: int
    incoming_bytes: int
    ok: bool
    reason: str


@runtime_checkable
class Spool(Protocol):
    """What the listener and the workers need from spool storage."""

    def put_atomic(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        data: bytes | os.PathLike[str] | str,
        *,
        sync_dir: bool = True,
        variant: str | None = None,
    ) -> str:
        """Store one instance durably; return its spool-relative path.

        ``data`` is the encoded file (bytes) or the path of a finished temporary file,
        which is moved (same filesystem) or copied. If the instance is already stored,
        the existing copy is kept and its path returned. ``sync_dir=False`` leaves the
        final directory fsync to the caller (:meth:`sync_parent`), which may then make
        many new names durable with one fsync (group commit). ``variant``: see
        :func:`relpath_for`.
        """
        ...

    def sync_parent(self, relpath: str) -> None:
        """Make the directory entry of ``relpath`` durable (fsync its directory)."""
        ...

    def exists(self, relpath: str) -> bool:
        """Whether the file is stored (a resend is detected by this)."""

    def open(self, relpath: str) -> BinaryIO:
        """Open a stored file for reading."""

    def path(self, relpath: str) -> Path:
        """The filesystem path of a stored file (workers read it directly)."""

    def space(self, incoming_bytes: int = 0) -> SpaceReport:
        """Free space against the watermarks, counting ``incoming_bytes`` as already written."""

    def free_space_ok(self, incoming_bytes: int = 0) -> bool:
        """Whether a store of ``incoming_bytes`` keeps the spool above its watermark."""

    def remove(self, relpath: str) -> None:
        """Delete one stored file (a refused instance's copy, retention); missing is not an error."""


def _fsync_dir(path: Path) -> None:
    """Make a directory entry change durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


_partial_names = itertools.count()


def _create_partial(directory: Path, sop_uid: str) -> tuple[int, Path]:
    """Create a new, empty temporary file for one instance in ``directory``.

    The name is unique to this process, thread and call (``O_EXCL`` still guards it), so
    no random name has to be drawn and retried as ``tempfile.mkstemp`` does; a leftover
    of a crashed process with the same pid falls back to ``mkstemp``. The ``.part``
    suffix marks it for :meth:`LocalSpool.sweep_partials`.
    """
    name = f".{sop_uid}.{os.getpid()}-{threading.get_ident()}-{next(_partial_names)}{_PARTIAL_SUFFIX}"
    path = directory / name
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
    except FileExistsError:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{sop_uid}.", suffix=_PARTIAL_SUFFIX, dir=directory)
        return fd, Path(tmp_name)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until everything is written (a write may be short, e.g. on signals)."""
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


def write_file_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``path`` so that readers see the old state or the whole new file, never a part.

    Temp file in the target directory, fsync, rename over the target, fsync the
    directory (used for reports; spooled instances go through :meth:`LocalSpool.put_atomic`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if fsync:
        _fsync_dir(path.parent)


class LocalSpool:
    """A spool on a local or shared (network-mounted) POSIX filesystem.

    Parameters are plain values so the listener, the workers and the tests build it the
    same way; ``fsync=False`` exists only for throw-away benchmarks of the fsync cost.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        watermark: Watermark | None = None,
        fsync: bool = True,
        create: bool = True,
    ) -> None:
        self.root = Path(root).resolve()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise FileNotFoundError(f"spool root {self.root} is not a directory")
        self.watermark = watermark or Watermark()
        self.fsync = fsync
        self._hardlinks = True

    @classmethod
    def from_settings(cls, storage: StorageSettings) -> LocalSpool:
        """The spool described by ``LocusSettings.storage`` (watermark in % used and bytes)."""
        return cls(
            storage.spool_dir,
            watermark=Watermark(
                min_free_bytes=storage.min_free_bytes,
                min_free_fraction=max(0.0, 1.0 - storage.disk_watermark_percent / 100.0),
            ),
        )

    def __repr__(self) -> str:
        return f"LocalSpool({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------
    def path(self, relpath: str) -> Path:
        """Absolute path of a spool-relative path; refuses anything outside the spool."""
        rel = PurePosixPath(relpath)
        if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
            raise ValueError(f"not a spool-relative path: {relpath!r}")
        return self.root.joinpath(*rel.parts)

    def exists(self, relpath: str) -> bool:
        """Whether the file is stored (a resend is detected by this)."""
        return self.path(relpath).is_file()

    def open(self, relpath: str) -> BinaryIO:
        """Open a stored file for reading."""
        return self.path(relpath).open("rb")

    # -- space -------------------------------------------------------------------------
    def space(self, incoming_bytes: int = 0) -> SpaceReport:
        """Free space of the spool's filesystem against the watermarks."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        after = free - max(incoming_bytes, 0)
        wm = self.watermark
        reason = ""
        if wm.min_free_bytes and after < wm.min_free_bytes:
            reason = (
                f"disk watermark: {after} bytes free after this write, "
                f"below the floor of {wm.min_free_bytes}"
            )
        elif wm.min_free_fraction and total > 0 and after / total < wm.min_free_fraction:
            reason = (
                f"disk watermark: {after / total:.2%} free after this write, "
                f"below the floor of {wm.min_free_fraction:.2%}"
            )
        return SpaceReport(free, total, incoming_bytes, not reason, reason)

    def free_space_ok(self, incoming_bytes: int = 0) -> bool:
        """Whether a store of ``incoming_bytes`` keeps the spool above its watermark."""
        return self.space(incoming_bytes).ok

    # -- writing -----------------------------------------------------------------------
    def _ensure_dir(self, directory: Path) -> None:
        """Create the study/series directories, fsyncing each new entry's parent."""
        if directory.is_dir():
            return
        missing: list[Path] = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                new.mkdir()
            if self.fsync:
                _fsync_dir(new.parent)

    def put_atomic(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        data: bytes | os.PathLike[str] | str,
        *,
        sync_dir: bool = True,
        variant: str | None = None,
    ) -> str:
        """Store one instance durably (see :meth:`Spool.put_atomic`): an instance is acknowledged only after this."""
        relpath = relpath_for(study_uid, series_uid, sop_uid, variant)
        target = self.path(relpath)
        if target.is_file():
            return relpath  # idempotent resend: keep the copy that was indexed first
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else os.path.getsize(data)
        report = self.space(size)
        if not report.ok:
            raise SpoolFullError(report.reason)
        self._ensure_dir(target.parent)
        if not isinstance(data, (bytes, bytearray, memoryview)) and self._link_in_place(
            Path(data), target, sync_dir=sync_dir
        ):
            return relpath
        fd, tmp = _create_partial(target.parent, sop_uid)
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                try:
                    _write_all(fd, data)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                with os.fdopen(fd, "wb") as out, open(data, "rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                    out.flush()
                    if self.fsync:
                        os.fsync(out.fileno())
            self._publish(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        if self.fsync and sync_dir:
            _fsync_dir(target.parent)
        return relpath

    def sync_parent(self, relpath: str) -> None:
        """fsync the file's directory, so the rename survives a power loss."""
        if self.fsync:
            _fsync_dir(self.path(relpath).parent)

    def _link_in_place(self, source: Path, target: Path, *, sync_dir: bool = True) -> bool:
        """Adopt a finished temp file on the spool filesystem without copying it.

        The source is fsync-ed, then hard-linked to its final name (no-clobber); the
        caller may delete the source name afterwards (pynetdicom does, for chunked
        receives). Returns False when a copy is needed (other filesystem, no links).
        """
        if not self._hardlinks:
            return False
        if self.fsync:
            with open(source, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.link(source, target)
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            raise
        if self.fsync and sync_dir:
            _fsync_dir(target.parent)
        return True

    def _publish(self, tmp: Path, target: Path) -> None:
        """Move a finished temp file to its final name without clobbering an existing one.

        ``link`` fails if the name exists, so two associations storing the same instance
        at once keep exactly one (the first) copy; filesystems without hard links fall
        back to ``os.replace`` (still atomic; last writer wins, same bytes in practice).
        """
        if self._hardlinks:
            try:
                os.link(tmp, target)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                self._hardlinks = False
                LOGGER.info("spool %s has no hard links; using os.replace", self.root)
                os.replace(tmp, target)
                return
            tmp.unlink()
            return
        os.replace(tmp, target)

    def remove(self, relpath: str) -> None:
        """Delete one stored file (retention); missing files are not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.path(relpath).unlink()

    def sweep_partials(self) -> int:
        """Remove ``*.part`` leftovers of writes interrupted by a crash; return the count."""
        removed = 0
        for part in self.root.rglob(f".*{_PARTIAL_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
                removed += 1
        return removed
