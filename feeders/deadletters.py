"""Reading dead letters: both dead-letter topics, filtered, for ``dicomflow dlq`` and ``replay-dlq``.

A dead letter is the envelope of :mod:`schemas.deadletter` (original, error, stage, time,
worker, source) on ``storage_queue_dlq`` (storage events the pipeline refused) or
``dicomflow_sink_dlq`` (rows PostgreSQL or Doris refused as data). Readers take a topic
from its beginning up to the end it had when they started, with no consumer group, so
looking never hides a letter from anyone. On the embedded stack the relay archives dead
letters and restores them into these topics after a broker restart, so the topics stay
the one source.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from aiokafka import TopicPartition

from core.errors import ConfigError
from schemas import codec
from streams.broker import Record, end_offsets, read_range
from streams.topology import DLQ, SINK_DLQ

__all__ = ["TOPICS", "Letter", "LetterFilter", "read_letters", "find_letter", "topics_for", "parse_since", "to_jsonl",
           "to_csv", "CSV_COLUMNS"]

#: ``--topic`` names: the storage-event letters and the sink letters.
TOPICS: dict[str, str] = {"storage": DLQ, "sink": SINK_DLQ}

CSV_COLUMNS = ("time", "topic", "partition", "offset", "stage", "code", "field", "message", "tenant_id",
               "trace_id", "file_path", "worker", "original_truncated")


def topics_for(name: str | None) -> list[str]:
    """The topics ``--topic`` names (``storage``, ``sink``, or a topic's own name); None: both."""
    if name is None:
        return list(TOPICS.values())
    if name in TOPICS:
        return [TOPICS[name]]
    if name in TOPICS.values():
        return [name]
    raise ConfigError(f"--topic must be one of {', '.join(TOPICS)} (or {', '.join(TOPICS.values())}), got {name!r}",
                      field="topic")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``--since``: a duration back from now (``90s``, ``15m``, ``2h``, ``3d``) or an ISO date/time."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
    if match:
        return (now or datetime.now()) - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(f"--since must be a duration like 15m, 2h, 3d or a date/time like 2026-12-02T08:00, "
                          f"got {value!r}", field="since") from None


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter where it lies, with its envelope decoded (None: not an envelope)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: float
    envelope: dict[str, Any] | None

    @classmethod
    def of(cls, record: Record) -> Letter:
        try:
            envelope = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            envelope = None
        return cls(record.topic, record.partition, record.offset, record.key, record.value, record.timestamp,
                   envelope if isinstance(envelope, dict) else None)

    @property
    def ref(self) -> str:
        """How ``dlq show`` names it: ``topic:partition:offset``."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def error(self) -> dict[str, Any]:
        err = (self.envelope or {}).get("error")
        return err if isinstance(err, dict) else {}

    @property
    def code(self) -> str:
        return str(self.error.get("code") or ("UNKNOWN" if self.envelope is not None else "UNDECODABLE"))

    @property
    def field(self) -> str | None:
        value = self.error.get("field")
        return str(value) if value is not None else None

    @property
    def stage(self) -> str | None:
        value = (self.envelope or {}).get("stage")
        return str(value) if value is not None else None

    @property
    def original(self) -> Any:
        """The refused event or row: parsed JSON, else its bytes as text (None when capped)."""
        env = self.envelope or {}
        if env.get("original") is not None:
            return env["original"]
        raw = env.get("original_raw_base64")
        if isinstance(raw, str) and not env.get("original_truncated"):
            data = base64.b64decode(raw)
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                return data.decode("utf-8", errors="replace")
        return None

    def _original_field(self, name: str) -> str | None:
        original = self.original
        value = original.get(name) if isinstance(original, dict) else None
        return str(value) if value is not None else None

    @property
    def tenant(self) -> str | None:
        return self._original_field("tenant_id")

    @property
    def trace_id(self) -> str | None:
        return self._original_field("trace_id")

    @property
    def file_path(self) -> str | None:
        return self._original_field("file_path")

    @property
    def time(self) -> datetime | None:
        """When the letter was written (the envelope's time, else the record's timestamp)."""
        raw = (self.envelope or {}).get("time")
        if isinstance(raw, str):
            try:
                return datetime.fromisoformat(raw)
            except ValueError:
                pass
        return datetime.fromtimestamp(self.timestamp) if self.timestamp else None

    def row(self) -> dict[str, Any]:
        """The flat row of ``dlq list``/``export``."""
        when = self.time
        return {"time": when.isoformat(sep=" ", timespec="seconds") if when else None, "topic": self.topic,
                "partition": self.partition, "offset": self.offset, "stage": self.stage, "code": self.code,
                "field": self.field, "message": self.error.get("message"), "tenant_id": self.tenant,
                "trace_id": self.trace_id, "file_path": self.file_path,
                "worker": (self.envelope or {}).get("worker"),
                "original_truncated": bool((self.envelope or {}).get("original_truncated"))}

    def detail(self) -> dict[str, Any]:
        """Everything ``dlq show`` prints: where, the reason, the envelope, the original pretty."""
        env = dict(self.envelope or {})
        return {"where": {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                          "key": self.key.decode("utf-8", errors="replace") if self.key else None},
                "reason": self.error or {"code": self.code},
                "envelope": {k: v for k, v in env.items() if k not in ("original", "original_raw_base64")}
                if self.envelope is not None else self.value.decode("utf-8", errors="replace"),
                "original": self.original}


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """``--code`` (any of), ``--tenant``, ``--since``; an empty filter keeps every letter."""

    codes: frozenset[str] = frozenset()
    tenant: str | None = None
    since: datetime | None = None
    stage: str | None = None

    def matches(self, letter: Letter) -> bool:
        if self.codes and letter.code not in self.codes:
            return False
        if self.tenant is not None and letter.tenant != self.tenant:
            return False
        if self.stage is not None and letter.stage != self.stage:
            return False
        if self.since is not None:
            when = letter.time
            if when is None or _naive(when) < _naive(self.since):
                return False
        return True


def _naive(when: datetime) -> datetime:
    """Envelope times are local and naive (schemas.codec); compare aware ones in local time."""
    return when.astimezone().replace(tzinfo=None) if when.tzinfo is not None else when


async def read_letters(bootstrap: str, topics: Iterable[str], where: LetterFilter | None = None) -> list[Letter]:
    """The letters of ``topics`` that pass ``where``, oldest first (up to the ends when called)."""
    names = list(topics)
    ends = await end_offsets(bootstrap, names)
    out: list[Letter] = []
    for tp in sorted(ends, key=lambda t: (t.topic, t.partition)):
        if ends[tp] <= 0:
            continue
        for record in await read_range(bootstrap, tp.topic, tp.partition, None, ends[tp]):
            letter = Letter.of(record)
            if where is None or where.matches(letter):
                out.append(letter)
    out.sort(key=lambda x: (_naive(x.time) if x.time else datetime.min, x.topic, x.partition, x.offset))
    return out


async def find_letter(bootstrap: str, ref: str, topics: Iterable[str]) -> Letter | None:
    """The letter named by ``ref``: ``topic:partition:offset``, ``partition:offset`` (of the one
    topic given), a bare offset (partition 0), or a trace id (the newest letter carrying it)."""
    names = list(topics)
    parts = ref.split(":")
    numeric = parts[-2:] if len(parts) > 1 else parts
    if len(parts) <= 3 and all(p.isdigit() for p in numeric):
        offset = int(parts[-1])
        partition = int(parts[-2]) if len(parts) >= 2 else 0
        candidates = [parts[0]] if len(parts) == 3 else names
        ends = await end_offsets(bootstrap, candidates)
        for name in candidates:
            # Only an offset below the end: reading one that does not exist yet would wait for it.
            if offset < ends.get(TopicPartition(name, partition), 0):
                records = await read_range(bootstrap, name, partition, offset, offset + 1)
                if records:
                    return Letter.of(records[0])
        if len(parts) > 1:
            return None
    matches = [letter for letter in await read_letters(bootstrap, names) if letter.trace_id == ref]
    return matches[-1] if matches else None


def to_jsonl(letters: Iterable[Letter]) -> str:
    """One JSON object per letter: its flat row plus the original."""
    return "".join(codec.dumps({**x.row(), "original": x.original}).decode() + "\n" for x in letters)


def to_csv(letters: Iterable[Letter]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for letter in letters:
        writer.writerow(letter.row())
    return buf.getvalue()
