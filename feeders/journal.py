"""The journal: the durable record of every acknowledged storage event on the embedded stack.

The embedded broker keeps nothing across a restart, so on that stack a feeder does not
acknowledge an event once the broker has it, but once the journal has it: one JSON line
appended to a file of its own under ``$DICOMFLOW_HOME/journal/`` and fsynced (with the
directory, for a new file). The relay (feeders/relay.py) publishes journal lines to the
broker and, whenever the pipeline is drained, records how far every file is fully
processed (the checkpoint). A restarted stack publishes again everything after the
checkpoint, and every stage is idempotent for what it sees twice.

Files are never rewritten: a writer appends to ``{source}-{start}-{pid}.jsonl`` and closes
it when it stops; the relay deletes a file once it is closed and fully checkpointed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import BrokerError
from schemas import codec

__all__ = ["JournalWriter", "JournalPublisher", "Checkpoint", "journal_files", "journal_id", "read_lines",
           "writer_gone", "CLOSED_SUFFIX"]

log = logging.getLogger(__name__)

#: A writer that stopped renames its file to this suffix: nothing will be appended any more.
CLOSED_SUFFIX = ".closed.jsonl"
OPEN_SUFFIX = ".jsonl"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournalWriter:
    """Appends events to one journal file, each durable (fsync) before :meth:`append` returns.

    Thread-safe: the SCP appends from pynetdicom's handler threads.
    """

    def __init__(self, directory: Path, source: str) -> None:
        self.directory = directory
        self.source = source
        self.path: Path | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{self.source}-{time.time_ns()}-{os.getpid()}{OPEN_SUFFIX}"
        self.path = self.directory / name
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _fsync_dir(self.directory)  # the file itself must survive a power loss, not only its lines

    def append(self, line: bytes) -> None:
        """Write one line whole and fsync it; on any failure the file is cut back to before it,
        so a half-written line never hides the next ones (and the caller answers failure)."""
        if b"\n" in line:
            raise BrokerError("a journal line must not contain a newline")
        data = memoryview(line + b"\n")
        with self._lock:
            if self._fd is None:
                raise BrokerError("the journal is not open")
            start = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                while data:
                    written = os.write(self._fd, data)
                    data = data[written:]
                os.fsync(self._fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None or self.path is None:
                return
            os.fsync(fd)
            os.close(fd)
            closed = self.path.with_name(self.path.name.removesuffix(OPEN_SUFFIX) + CLOSED_SUFFIX)
            os.replace(self.path, closed)
            _fsync_dir(self.directory)
            self.path = closed


class JournalPublisher:
    """A feeder's publisher on the embedded stack: "published" means "in the journal".

    Same interface as :class:`feeders.publisher.EventPublisher`, so the SCP and backfill use
    either; the relay takes the events on to the broker.
    """

    def __init__(self, directory: Path, source: str) -> None:
        self.writer = JournalWriter(directory, source)

    async def start(self) -> None:
        self.writer.open()

    async def stop(self) -> None:
        self.writer.close()

    async def publish(self, event: dict[str, Any], key: str | None, *, topic: str | None = None) -> None:
        await self._append(codec.dumps({"key": key, "event": event}))

    async def publish_raw(self, value: bytes, key: str | None, *, topic: str | None = None) -> None:
        """An event as exact bytes (``replay-dlq`` re-publishes a message that was not even JSON)."""
        await self._append(codec.dumps({"key": key, "raw_b64": base64.b64encode(value).decode("ascii")}))

    async def _append(self, line: bytes) -> None:
        import asyncio

        await asyncio.to_thread(self._append_blocking, line)

    def publish_blocking(self, event: dict[str, Any], key: str | None) -> None:
        """:meth:`publish` for a caller on a thread of its own (the SCP's handler threads): no
        event loop between the handler and the file (issue #15: the loop hop and its thread
        switches cost the SCP about 0.3 ms of CPU per instance)."""
        self._append_blocking(codec.dumps({"key": key, "event": event}))

    def _append_blocking(self, line: bytes) -> None:
        try:
            self.writer.append(line)
        except OSError as exc:
            raise BrokerError(f"cannot write the journal {self.writer.path}: {exc}") from exc


def journal_id(path: Path) -> str:
    """A file's identity in the checkpoint: its name without the open/closed suffix."""
    return path.name.removesuffix(CLOSED_SUFFIX).removesuffix(OPEN_SUFFIX)


def writer_gone(path: Path) -> bool:
    """True when nothing can append to ``path`` any more: closed, or its writer process died."""
    if path.name.endswith(CLOSED_SUFFIX):
        return True
    try:
        pid = int(journal_id(path).rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def complete_size(path: Path) -> int:
    """Bytes up to the last complete line: a writer killed mid-line leaves a tail that is not one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        back = min(size, 1 << 16)
        while back:
            f.seek(size - back)
            chunk = f.read(back)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                return size - back + cut + 1
            if back == size:
                return 0
            back = min(size, back * 2)
    return 0


def journal_files(directory: Path) -> list[Path]:
    """Every journal file, oldest first (by the start time in its name)."""
    if not directory.is_dir():
        return []
    files = [p for p in directory.iterdir() if p.name.endswith(OPEN_SUFFIX) and not p.name.startswith(".")]

    def start(p: Path) -> tuple[int, str]:
        parts = journal_id(p).split("-")
        try:
            return int(parts[-2]), p.name
        except (IndexError, ValueError):
            return 0, p.name

    return sorted(files, key=start)


@dataclass(frozen=True, slots=True)
class Line:
    """One complete journal line and the byte position just after it."""

    key: str | None
    event: dict[str, Any]
    end: int
    #: The event's exact bytes, when it was journaled as bytes (see ``publish_raw``).
    raw: bytes | None = None


def read_lines(path: Path, start: int) -> Iterator[Line]:
    """Complete lines of ``path`` from byte ``start`` (a line still being written is not one yet)."""
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for text in f:
            if not text.endswith(b"\n"):
                return
            pos += len(text)
            try:
                doc = json.loads(text)
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                # Cannot happen for lines written whole; never stop the relay on one, but say so.
                log.error("journal line not decodable file=%s end=%s: %s", path.name, pos, exc)
                continue
            exact = base64.b64decode(doc["raw_b64"]) if doc.get("raw_b64") else None
            yield Line(doc.get("key"), doc.get("event") or {}, pos, exact)


class Checkpoint:
    """How far each journal file is fully processed by the pipeline; written atomically."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "checkpoint.json"
        self.positions: dict[str, int] = {}

    def load(self) -> Checkpoint:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            self.positions = {str(k): int(v) for k, v in data.get("positions", {}).items()}
        return self

    def get(self, name: str) -> int:
        return self.positions.get(name, 0)

    def save(self, positions: dict[str, int]) -> None:
        self.positions = dict(positions)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump({"positions": self.positions, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
