"""Series JSON documents on disk: where they live, how one is written atomically, how one is read.

Path (the seeds'): ``{json_root}/{tenant}/metadata/{study_date}/{study_uid}/{series_uid}.json``,
``.json.gz`` when compressed. Every component is reduced to ``[A-Za-z0-9._-]`` as the
instance store does, so a hostile UID in a request or a row cannot leave the root.

A document is a JSON array with one DICOM JSON object per instance, ordered by
InstanceNumber then SOP Instance UID. Instances arrive in file order, so they are first
appended to a spool file beside the target (one instance in memory at a time, plus a small
index of offsets); the document is then assembled in order into a temporary file, fsynced,
renamed over the old one, and the directory fsynced. A reader sees the old document or the
new one, never a part.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from dicom.json_model import InstanceJson, JsonOptions, series_objects

if TYPE_CHECKING:
    from sinks.index import SeriesIndex

__all__ = ["DocumentWriter", "SeriesDocument", "document_path", "series_directory", "write_series_document",
           "open_document", "iter_document", "safe_component", "instance_files", "Lookup", "check_ids",
           "find_document"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_COMPONENT = 80
_CHUNK = 256 * 1024


def safe_component(value: str) -> str:
    """The instance store's rule (feeders/storage.py, a floor this one cannot import; a test checks
    they agree): ``[A-Za-z0-9._-]`` only, never empty, ``.``, ``..`` or hidden."""
    text = _UNSAFE.sub("_", value.strip(" \x00"))[:_MAX_COMPONENT]
    if not text or set(text) == {"."}:
        return "_"
    return "_" + text[1:] if text.startswith(".") else text


def document_path(json_root: Path, tenant: str, study_date: str, study_uid: str, series_uid: str, *,
                  compressed: bool = False) -> Path:
    """Where a series' document lives (the seeds' layout)."""
    name = safe_component(series_uid) + (".json.gz" if compressed else ".json")
    return (Path(json_root) / safe_component(tenant) / "metadata" / safe_component(study_date or "00000000")
            / safe_component(study_uid) / name)


def series_directory(storage_root: Path, tenant: str, study_date: str, study_uid: str, series_uid: str) -> Path:
    """Where the C-STORE SCP stores a series' instances: ``{root}/{tenant}/{date}/{study}/{series}``."""
    return (Path(storage_root) / safe_component(tenant) / safe_component(study_date or "00000000")
            / safe_component(study_uid) / safe_component(series_uid))


def instance_files(directory: Path) -> list[Path]:
    """The instance files of a series directory (work in progress and hidden files are dot-files)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return sorted(Path(e.path) for e in entries if not e.name.startswith(".") and e.is_file(follow_symlinks=False))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class SeriesDocument:
    """What a written document holds."""

    path: Path
    instances: int
    #: Bytes on disk (compressed size when gzip).
    bytes_written: int
    #: Files that were not readable DICOM of this series, with the reason.
    skipped: list[tuple[str, str]] = field(default_factory=list)


class DocumentWriter:
    """Collects instance objects in any order; :meth:`commit` writes the ordered document atomically."""

    def __init__(self, target: Path, *, compress: bool = False, compress_level: int = 6) -> None:
        self.target = Path(target)
        self.compress = compress
        self.compress_level = compress_level
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # The spool sits beside the target: same filesystem, cleaned with it, never a document name.
        self._spool: BinaryIO = tempfile.TemporaryFile(dir=self.target.parent, prefix=".spool-")
        self._index: list[tuple[tuple[int, int, str], int, int]] = []
        self._offset = 0

    def add(self, instance: InstanceJson) -> None:
        self._spool.write(instance.data)
        self._index.append((instance.key, self._offset, len(instance.data)))
        self._offset += len(instance.data)

    @property
    def count(self) -> int:
        return len(self._index)

    def _ordered(self) -> Iterator[bytes]:
        yield b"["
        fd = self._spool.fileno()
        for n, (_, offset, length) in enumerate(sorted(self._index, key=lambda e: e[0])):
            if n:
                yield b","
            yield os.pread(fd, length, offset)
        yield b"]"

    def commit(self) -> int:
        """Write the document (temp, fsync, rename, directory fsync); returns its size on disk."""
        self._spool.flush()
        fd, tmp_name = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if self.compress:
                    # mtime=0: the same content gives the same bytes.
                    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=self.compress_level, mtime=0) as gz:
                        for chunk in self._ordered():
                            gz.write(chunk)
                else:
                    for chunk in self._ordered():
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            os.replace(tmp, self.target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self.close()
        _fsync_dir(self.target.parent)
        return size

    def close(self) -> None:
        self._spool.close()

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_series_document(files: Iterable[Path], target: Path, options: JsonOptions, *, series_uid: str,
                          compress: bool = False) -> SeriesDocument:
    """Read each file once, streaming, and write the series' document at ``target``.

    A file of another series (or not DICOM), or a second file of an instance already written, is
    skipped and reported, not fatal: a stray file in a series directory must not stop its document.
    """
    skipped: list[tuple[str, str]] = []

    def on_error(path: Path, exc: Exception) -> None:
        skipped.append((str(path), str(exc)))

    seen: set[str] = set()
    with DocumentWriter(target, compress=compress) as writer:
        for instance in series_objects(files, options, on_error):
            if instance.series_uid != series_uid:
                skipped.append((instance.sop_uid, f"belongs to series {instance.series_uid}"))
                continue
            if instance.sop_uid in seen:
                # The same instance in two files (indexed path and the SCP's layout): once.
                skipped.append((instance.sop_uid, "a second file of an instance already in the document"))
                continue
            seen.add(instance.sop_uid)
            writer.add(instance)
        size = writer.commit()
        return SeriesDocument(target, writer.count, size, skipped)


def open_document(json_root: Path, tenant: str, study_date: str, study_uid: str,
                  series_uid: str) -> tuple[Path, bool] | None:
    """The existing document of a series and whether it is gzip, or None."""
    for compressed in (False, True):
        path = document_path(json_root, tenant, study_date, study_uid, series_uid, compressed=compressed)
        if path.is_file():
            return path, compressed
    return None


def iter_document(path: Path, *, compressed: bool, decompress: bool = True,
                  chunk: int = _CHUNK) -> Iterator[bytes]:
    """The document's bytes in chunks (never whole); gzip is inflated unless ``decompress`` is False."""
    with open(path, "rb") as f:
        inflate = zlib.decompressobj(wbits=31) if compressed and decompress else None
        while block := f.read(chunk):
            if inflate is None:
                yield block
                continue
            out = inflate.decompress(block)
            if out:
                yield out
        if inflate is not None:
            with contextlib.suppress(zlib.error):
                tail = inflate.flush()
                if tail:
                    yield tail


_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where a series' document is, or why there is none (``code``: BAD_REQUEST, NOT_FOUND)."""

    path: Path | None = None
    compressed: bool = False
    code: str = ""
    message: str = ""

    @property
    def found(self) -> bool:
        return self.path is not None


def check_ids(tenant: str | None, study_uid: str, series_uid: str | None = None) -> Lookup | None:
    """A BAD_REQUEST lookup naming the field, or None when the ids are well formed."""
    if not tenant or not _TENANT.fullmatch(tenant):
        return Lookup(code="BAD_REQUEST", message="tenant: required (header X-Tenant-Id or query parameter "
                                                  "tenant), letters, digits, '.', '_', '-', at most 64")
    if not _UID.fullmatch(study_uid):
        return Lookup(code="BAD_REQUEST", message="study: not a UID")
    if series_uid is not None and not _UID.fullmatch(series_uid):
        return Lookup(code="BAD_REQUEST", message="series: not a UID")
    return None


async def find_document(index: SeriesIndex, json_root: Path, tenant: str, study_uid: str,
                        series_uid: str) -> Lookup:
    """The document of a series, found through its ``dicom_json_meta`` row (which knows its date)."""
    bad = check_ids(tenant, study_uid, series_uid)
    if bad is not None:
        return bad
    meta = await index.json_meta(tenant, study_uid, series_uid)
    if meta is None:
        known = any(r.series_uid == series_uid for r in await index.series_of_study(tenant, study_uid))
        why = "its JSON is not generated yet" if known else "unknown series"
        return Lookup(code="NOT_FOUND", message=f"{why}: tenant={tenant} study={study_uid} series={series_uid}")
    found = open_document(json_root, tenant, meta.study_date_origin, study_uid, series_uid)
    if found is None:
        return Lookup(code="NOT_FOUND", message=f"no JSON document for series {series_uid} (json_status="
                                                f"{meta.json_status})")
    return Lookup(path=found[0], compressed=found[1])
