"""Dead letters that outlive the embedded broker.

The embedded broker keeps nothing across a restart, and ``up`` recycles it to bound its
memory, but a dead letter is what a data engineer needs to see, and ``replay-dlq`` to
re-publish. So on that stack the relay copies every dead letter it finds on the dead-letter
topics to one append-only, fsynced file (``$DICOMFLOW_HOME/deadletters/archive.jsonl``),
and a relay that starts on a fresh broker publishes the archived letters back. Readers
(``dicomflow dlq``, ``status``, ``replay-dlq``) then keep reading the topics.

A letter is identified by a digest of its topic, key and envelope without the time and the
worker: a restored letter (same bytes, new offset) is recognised as archived, and an event
refused again after a replay is archived (and restored) once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from streams.broker import end_offsets, read_range

__all__ = ["DeadLetterArchive"]

log = logging.getLogger(__name__)

ARCHIVE_NAME = "archive.jsonl"


class RawSink(Protocol):
    async def publish_raw(self, value: bytes, key: str | None, *, topic: str | None = None) -> None: ...


#: Envelope fields that differ when the same event is refused again (after a replay).
_CIRCUMSTANCE = ("time", "worker")


def _digest(topic: str, key: bytes | None, value: bytes) -> str:
    """One letter's identity: the same event refused for the same reason is one letter, even
    when a restart after a power loss processed it twice (different time and worker)."""
    h = hashlib.sha256(topic.encode())
    h.update(b"\0" + (key or b"") + b"\0")
    try:
        doc = json.loads(value)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        h.update(json.dumps({k: v for k, v in doc.items() if k not in _CIRCUMSTANCE}, sort_keys=True).encode())
    else:
        h.update(value)
    return h.hexdigest()[:32]


class DeadLetterArchive:
    """Copies new dead letters to disk; restores the archive into a broker that lost them."""

    def __init__(self, directory: Path, bootstrap: str, publisher: RawSink, topics: list[str]) -> None:
        self.path = directory / ARCHIVE_NAME
        self.bootstrap = bootstrap
        self.publisher = publisher
        self.topics = topics
        #: Digests of every archived letter.
        self._archived: set[str] = set()
        #: How far this process has read each partition (a fresh broker starts again at 0).
        self._scanned: dict[tuple[str, int], int] = {}
        self._restored = False
        self.counters = {"archived": 0, "restored": 0}

    def _read(self) -> Iterator[tuple[str, str, bytes | None, bytes]]:
        """(digest, topic, key, value) of every archived letter, from the file."""
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line cut by a crash was never fsynced as a whole: not archived
                try:
                    doc = json.loads(line)
                    key = base64.b64decode(doc["key_b64"]) if doc.get("key_b64") is not None else None
                    value = base64.b64decode(doc["value_b64"])
                    yield _digest(doc["topic"], key, value), doc["topic"], key, value
                except (ValueError, KeyError) as exc:
                    log.error("dead-letter archive line not decodable: %s", exc)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Digests only: the letters themselves stay on disk (there may be many, up to 64 KB each).
        self._archived = {d for d, *_ in self._read()}
        log.info("dead-letter archive %s holds %d letters", self.path, len(self._archived))

    def __len__(self) -> int:
        return len(self._archived)

    async def sync(self) -> int:
        """Archive the letters not archived yet (durable on return); on the first call, publish
        back the archived letters the broker does not have. Returns how many were archived."""
        ends = await end_offsets(self.bootstrap, self.topics)
        seen: set[str] = set()
        new: list[tuple[str, str, bytes | None, bytes]] = []
        batch: set[str] = set()
        first = not self._restored
        for tp, end in sorted(ends.items(), key=lambda kv: (kv[0].topic, kv[0].partition)):
            start = 0 if first else self._scanned.get((tp.topic, tp.partition), 0)
            if end > start:
                for record in await read_range(self.bootstrap, tp.topic, tp.partition, start, end):
                    d = _digest(record.topic, record.key, record.value)
                    seen.add(d)
                    if d not in self._archived and d not in batch:
                        batch.add(d)
                        new.append((d, record.topic, record.key, record.value))
            self._scanned[(tp.topic, tp.partition)] = end
        if new:
            self._append(new)
        if first:
            restored = 0
            for d, topic, key, value in self._read():
                if d not in seen and topic in self.topics:
                    seen.add(d)
                    await self.publisher.publish_raw(value, key.decode() if key else None, topic=topic)
                    restored += 1
            if restored:
                log.info("dead-letter archive: %d letters published back to a broker that had lost them", restored)
            self.counters["restored"] += restored
            self._restored = True
        return len(new)

    def _append(self, letters: list[tuple[str, str, bytes | None, bytes]]) -> None:
        lines = b"".join(
            json.dumps({"topic": topic, "key_b64": base64.b64encode(key).decode() if key is not None else None,
                        "value_b64": base64.b64encode(value).decode()}).encode() + b"\n"
            for _, topic, key, value in letters)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                data = memoryview(lines)
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
                if created:  # the file itself must survive a power loss, not only its lines
                    dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # never leave half a line before the next one
                raise
        finally:
            os.close(fd)
        self._archived.update(d for d, *_ in letters)
        self.counters["archived"] += len(letters)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "letters": len(self._archived), **self.counters}
