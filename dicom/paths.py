"""The storage layout's rules for event paths: which file an event may name, opened safely.

An event's ``file_path`` is opened by :func:`open_in_root`, which walks it one component at
a time from a descriptor of the storage root, never following a symlink (``O_NOFOLLOW``),
and hands back the descriptor it checked; the reader parses that descriptor's file
(:attr:`OpenedFile.reader_path`), so nothing swapped in after the check is read.

Tenant trees: the SCP's store marks every tenant directory it creates (``{root}/{tenant}``)
with a :data:`TENANT_MARKER` file naming the tenant. A path whose first directory carries a
marker belongs to that tenant, and an event of any other tenant may not read it. Folders no
tenant marked (a backfill of ``storage/old``, a feeder's own layout) stay readable by the
event's tenant, as before.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from core.errors import Code, FileAccessError

__all__ = ["TENANT_MARKER", "OpenedFile", "open_in_root", "tree_owner", "check_tenant_tree", "path_components"]

#: The file in a tenant directory that names its tenant (a dot-file: never an instance).
TENANT_MARKER = ".dicomflow-tenant"

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused right after.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
# The checked descriptor as a path: opening it reopens the same file, not the name.
_FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
_MARKER_MAX = 256


def _escape(message: str) -> FileAccessError:
    return FileAccessError(message, code=Code.PATH_ESCAPE, field="file_path")


@dataclass(slots=True)
class OpenedFile:
    """A regular file under the root, open read-only; close it (or use ``with``)."""

    fd: int
    size: int

    @property
    def reader_path(self) -> str:
        """A path that opens this very file (``/proc/self/fd/N``) while the descriptor is open."""
        return f"{_FD_DIR}/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def path_components(root: Path, file_path: str) -> list[str]:
    """``file_path`` as components relative to ``root``; raises PATH_ESCAPE for NUL, ``..``,
    a dot-component (``.spool``, ``.x.part``, ``.x.prev``, ``.``: work in progress or hidden)
    or an absolute path outside the root."""
    if "\x00" in file_path:
        raise _escape("file_path contains a NUL byte")
    raw = [p for p in file_path.split("/") if p]
    if ".." in raw:
        raise _escape(f"file_path must not contain '..': {file_path!r}")
    dotted = next((p for p in raw if p.startswith(".")), None)
    if dotted is not None:
        raise _escape(f"file_path has a component starting with '.' ({dotted!r}: work in progress or hidden, "
                      f"never a stored instance): {file_path!r}")
    if file_path.startswith("/"):
        absolute = os.path.normpath(file_path)
        for base in (os.path.abspath(root), os.path.realpath(root)):
            if absolute.startswith(base.rstrip("/") + "/"):
                raw = [p for p in absolute[len(base.rstrip("/")) + 1:].split("/") if p]
                break
        else:
            raise _escape(f"file_path is outside the storage root: {file_path!r}")
    if not raw:
        raise FileAccessError(f"file_path is not a regular file: {file_path!r}", code=Code.FILE_UNREADABLE,
                              field="file_path")
    return raw


def _open_at(name: str, flags: int, dir_fd: int, file_path: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileAccessError(f"file not found under the storage root: {file_path!r}", code=Code.FILE_MISSING,
                              field="file_path") from None
    except PermissionError:
        raise FileAccessError(f"file is not readable: {file_path!r}", code=Code.FILE_UNREADABLE,
                              field="file_path") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            try:
                is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
            if is_link:
                raise _escape(f"file_path goes through a symlink ({name!r}); symlinks are not followed: "
                              f"{file_path!r}") from None
            if exc.errno == errno.ENOTDIR:
                raise FileAccessError(f"file not found under the storage root: {file_path!r}",
                                      code=Code.FILE_MISSING, field="file_path") from None
        raise FileAccessError(f"cannot open {file_path!r}: {exc.strerror}", code=Code.FILE_UNREADABLE,
                              field="file_path") from None


def _owner(dir_fd: int) -> str | None:
    """The tenant named by the marker in this directory; None when there is none."""
    try:
        fd = os.open(TENANT_MARKER, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a marker we cannot read (or a symlink): refuse rather than guess
        raise FileAccessError(f"the tenant marker of the file's tree is unreadable: {exc.strerror}",
                              code=Code.TENANT_MISMATCH, field="file_path") from None
    try:
        return os.read(fd, _MARKER_MAX).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)


def _check_owner(owner: str | None, tenant: str, file_path: str) -> None:
    if owner is not None and owner != tenant:
        raise FileAccessError(f"file_path {file_path!r} is in the tree of tenant {owner!r}, not of the event's "
                              f"tenant {tenant!r}", code=Code.TENANT_MISMATCH, field="file_path")


def open_in_root(root: Path, file_path: str, tenant: str) -> OpenedFile:
    """Open an event's ``file_path`` strictly inside ``root`` for ``tenant``.

    Relative paths are taken from the root; an absolute one only if it lies inside it. Refused:
    NUL, ``..`` (even when it would land back inside), dot-components, any symlink (PATH_ESCAPE);
    a path in another tenant's marked tree (TENANT_MISMATCH); a missing file (FILE_MISSING); not
    a regular file, or no permission (FILE_UNREADABLE).
    """
    parts = path_components(root, file_path)
    try:
        dir_fd = os.open(os.path.realpath(root), os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise FileAccessError(f"cannot open the storage root: {exc.strerror}", code=Code.FILE_UNREADABLE,
                              field="file_path") from None
    try:
        for depth, name in enumerate(parts[:-1]):
            next_fd = _open_at(name, _DIR_FLAGS, dir_fd, file_path)
            os.close(dir_fd)
            dir_fd = next_fd
            if depth == 0:
                _check_owner(_owner(dir_fd), tenant, file_path)
        fd = _open_at(parts[-1], _FILE_FLAGS, dir_fd, file_path)
    finally:
        os.close(dir_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FileAccessError(f"file_path is not a regular file: {file_path!r}", code=Code.FILE_UNREADABLE,
                              field="file_path")
    return OpenedFile(fd, info.st_size)


def tree_owner(root: Path, top: str) -> str | None:
    """The tenant that marked ``{root}/{top}``; None when unmarked (or not a plain directory)."""
    try:
        dir_fd = os.open(os.path.join(os.path.realpath(root), top), _DIR_FLAGS)
    except OSError:
        return None
    try:
        return _owner(dir_fd)
    finally:
        os.close(dir_fd)


def check_tenant_tree(root: Path, relative: Path, tenant: str) -> None:
    """Raise TENANT_MISMATCH when ``relative`` (a file under ``root``) lies in another tenant's tree."""
    parts = relative.parts
    if len(parts) > 1:
        _check_owner(tree_owner(root, parts[0]), tenant, relative.as_posix())
