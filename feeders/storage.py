"""Where received instances are written, and how, so that no reader ever sees half a file.

Layout: ``{root}/{tenant}/{YYYYMMDD}/{study_uid}/{series_uid}/{sop_uid}.dcm``. Each tenant
directory is marked with :data:`dicom.paths.TENANT_MARKER` (naming the tenant) when the store
first writes into it, so ingest and backfill refuse that tree to every other tenant.

Every component is reduced to ``[A-Za-z0-9._-]`` (UIDs and valid tenants pass
unchanged), so a hostile UID such as ``../../etc`` cannot leave the root; the
joined path is checked against the root as well, in case a future change forgets.

A placement fsyncs a complete temporary file (written beside the target, or
pynetdicom's spool file), then links or renames it to the final name, so the final
name never shows a partial file. The directory entry is made durable by
:meth:`Placement.sync`, which the SCP runs while the broker acknowledges the event:
neither waits for the other, and success is answered only after both. It stays
*revocable* until :meth:`Placement.commit`: the SCP answers C-STORE success only
once the broker has the event, and when that fails :meth:`Placement.rollback`
restores what was there before (a retransmission of an already stored instance must
not delete the copy an earlier event already announced) or removes the file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dicom.paths import TENANT_MARKER
from dicom.values import parse_da

__all__ = ["UNKNOWN_STUDY_DATE", "InstanceStore", "Placement", "mark_tenant_dir", "safe_component"]

log = logging.getLogger(__name__)

#: Folder name for instances without a usable StudyDate.
UNKNOWN_STUDY_DATE = "00000000"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# UIDs are at most 64 characters; the margin keeps odd-but-harmless values intact
# while bounding the whole relative path well under the contract's 512.
_MAX_COMPONENT = 80
_COPY_CHUNK = 1024 * 1024


def safe_component(value: str) -> str:
    """``value`` as a single, harmless path component (never empty, '.', or '..')."""
    text = _UNSAFE.sub("_", value.strip(" \x00"))[:_MAX_COMPONENT]
    if not text or set(text) == {"."}:
        return "_"
    # A leading dot would hide the file and collide with our temporary names.
    return "_" + text[1:] if text.startswith(".") else text


def _fsync_dir(path: Path, *, strict: bool = False) -> None:
    """Make a rename durable. ``strict``: raise on failure, except where the filesystem
    does not support fsync on a directory at all (EINVAL, ENOTSUP)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if strict and exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def mark_tenant_dir(directory: Path, tenant: str) -> None:
    """Mark ``directory`` as ``tenant``'s tree, unless it is marked already (never overwritten).

    Written to a temporary name and linked into place, so a reader never sees a partial marker.
    """
    marker = directory / TENANT_MARKER
    if marker.exists():
        return
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f"{TENANT_MARKER}.", suffix=".part")
    try:
        os.write(fd, tenant.encode("utf-8") + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp_name, 0o644)
        try:
            os.link(tmp_name, marker)
        except FileExistsError:
            pass  # another SCP marked it meanwhile
        except OSError:
            os.replace(tmp_name, marker)  # no hard links here; the content is the same either way
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    _fsync_dir(directory)


@dataclass(slots=True)
class Placement:
    """A file renamed into place, still revocable until :meth:`commit`."""

    path: Path
    relpath: PurePosixPath
    size: int
    _backup: Path | None = None

    def sync(self) -> None:
        """Make the new directory entry durable (fsync of the directory); OSError if it fails."""
        _fsync_dir(self.path.parent, strict=True)

    def commit(self) -> None:
        """The event is acknowledged: drop the safety copy of any earlier version."""
        backup, self._backup = self._backup, None
        if backup is not None:
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()

    def rollback(self) -> None:
        """Undo the placement: restore the earlier version, or remove the file."""
        backup, self._backup = self._backup, None
        try:
            if backup is not None:
                os.replace(backup, self.path)
            else:
                self.path.unlink(missing_ok=True)
        finally:
            _fsync_dir(self.path.parent)


class InstanceStore:
    """Writes instances under ``root``. Stateless apart from the root; thread-safe."""

    def __init__(self, root: Path, *, file_mode: int = 0o640) -> None:
        self.root = Path(root)
        # 0640: stored files hold PHI; the pipeline's readers share the group.
        self.file_mode = file_mode
        self._marked: set[str] = set()  # tenant directories known to carry their marker

    def _make_dirs(self, final: Path, relpath: PurePosixPath) -> None:
        """Create the instance's directories, and mark its tenant directory (once per process)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tenant = relpath.parts[0]
        if tenant not in self._marked:
            mark_tenant_dir(self.root / tenant, tenant)
            self._marked.add(tenant)

    def relpath(self, tenant: str, study_date: str | None, study_uid: str, series_uid: str,
                sop_uid: str) -> PurePosixPath:
        """The relative path of an instance; a missing or invalid ``study_date`` (DA) gives 00000000."""
        date = UNKNOWN_STUDY_DATE
        if study_date:
            with contextlib.suppress(ValueError):
                parse_da(study_date)
                date = study_date.strip()
        return PurePosixPath(safe_component(tenant), date, safe_component(study_uid),
                             safe_component(series_uid), safe_component(sop_uid) + ".dcm")

    def write_bytes(self, relpath: PurePosixPath, data: bytes) -> Placement:
        """Place ``data`` (a complete Part 10 file) at ``relpath``."""

        def fill(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())

        return self._place(relpath, fill)

    def adopt_file(self, relpath: PurePosixPath, source: Path) -> Placement:
        """Move ``source`` (e.g. pynetdicom's spool file) to ``relpath``; copy across filesystems.

        The common case, a new instance spooled on the storage filesystem, is an fsync
        and a hard link: no second temporary file, and the link fails rather than
        replacing an instance already there (which then takes the revocable path).
        """
        final = self._final(relpath)
        fd = os.open(source, os.O_RDONLY)
        try:
            # The spool file was written by another handle; fsync the data we now own.
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.chmod(source, self.file_mode)
        self._make_dirs(final, relpath)
        try:
            os.link(source, final)
        except FileExistsError:
            return self._adopt_by_copy_or_rename(relpath, source)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            return self._adopt_by_copy_or_rename(relpath, source)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source)
        return Placement(path=final, relpath=relpath, size=size)

    def _adopt_by_copy_or_rename(self, relpath: PurePosixPath, source: Path) -> Placement:

        def fill(tmp: Path) -> None:
            try:
                os.replace(source, tmp)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                with open(source, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
            # The spool file was written by another handle; fsync the data we now own.
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        return self._place(relpath, fill)

    def _final(self, relpath: PurePosixPath) -> Path:
        if relpath.is_absolute() or ".." in relpath.parts:
            raise ValueError(f"storage path escapes the root: {relpath}")
        final = self.root / Path(*relpath.parts)
        root = os.path.normpath(os.path.abspath(self.root))
        if os.path.commonpath([root, os.path.normpath(os.path.abspath(final))]) != root:
            raise ValueError(f"storage path escapes the root: {relpath}")
        return final

    def _place(self, relpath: PurePosixPath, fill: Callable[[Path], None]) -> Placement:
        final = self._final(relpath)
        self._make_dirs(final, relpath)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        backup: Path | None = None
        try:
            fill(tmp)
            os.chmod(tmp, self.file_mode)
            size = tmp.stat().st_size
            if final.exists():
                backup = final.with_name(f".{final.name}.{uuid.uuid4().hex}.prev")
                try:
                    # A hard link keeps the earlier version without a moment where
                    # the final name is missing.
                    os.link(final, backup)
                except OSError as exc:
                    log.warning("no backup of earlier version path=%s error=%s", relpath, exc)
                    backup = None
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
            raise
        return Placement(path=final, relpath=relpath, size=size, _backup=backup)
