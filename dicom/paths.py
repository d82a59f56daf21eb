"""The storage layout: where a stored instance lives, and strict resolution of event paths."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import Code, FileAccessError

__all__ = ["resolve_in_root"]


def resolve_in_root(root: Path, file_path: str) -> Path:
    """Resolve an event's ``file_path`` strictly inside ``root``.

    Relative paths are taken from the root; an absolute path is accepted only if it lies
    inside it. ``..`` components are refused outright (even when they would land back
    inside), and so is any symlink whose target leaves the root.
    """
    if "\x00" in file_path:
        raise FileAccessError("file_path contains a NUL byte", code=Code.PATH_ESCAPE, field="file_path")
    candidate = Path(file_path)
    if ".." in candidate.parts:
        raise FileAccessError(f"file_path must not contain '..': {file_path!r}", code=Code.PATH_ESCAPE,
                              field="file_path")
    root_real = Path(os.path.realpath(root))
    joined = candidate if candidate.is_absolute() else root_real / candidate
    if candidate.is_absolute() and not _inside(Path(os.path.abspath(joined)), root_real) \
            and not _inside(Path(os.path.abspath(joined)), Path(os.path.abspath(root))):
        raise FileAccessError(f"file_path is outside the storage root: {file_path!r}", code=Code.PATH_ESCAPE,
                              field="file_path")
    real = Path(os.path.realpath(joined))
    if not _inside(real, root_real):
        raise FileAccessError(f"file_path resolves outside the storage root (symlink?): {file_path!r}",
                              code=Code.PATH_ESCAPE, field="file_path")
    if not real.exists():
        raise FileAccessError(f"file not found under the storage root: {file_path!r}", code=Code.FILE_MISSING,
                              field="file_path")
    if not real.is_file():
        raise FileAccessError(f"file_path is not a regular file: {file_path!r}", code=Code.FILE_UNREADABLE,
                              field="file_path")
    if not os.access(real, os.R_OK):
        raise FileAccessError(f"file is not readable: {file_path!r}", code=Code.FILE_UNREADABLE,
                              field="file_path")
    return real


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
