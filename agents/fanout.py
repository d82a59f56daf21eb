"""What one storage event becomes: the ingest stage's pure core.

``process`` maps the raw bytes of a ``storage_queue`` message to the messages the
ingest agent must produce. It does no broker I/O, so it is unit-testable, runs in a
worker pool, and is re-run identically when an event is redelivered after a crash:
every output is keyed and built deterministically from the event and the file (only
timestamps differ), which is what makes downstream de-duplication possible.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from core.errors import Code, ContractError, DicomflowError, FileAccessError
from dicom.extract import Extracted, extract
from dicom.paths import open_in_root, path_components
from schemas import codec
from schemas.contract import parse_event
from schemas.deadletter import dead_letter
from schemas.identity import TRACE_NAMESPACE
from schemas.records import DicomObjectMeta, StorageEvent
from streams.topology import DLQ, LOG, SERIES_INSTANCES

__all__ = ["Output", "Outcome", "process", "process_many", "failure"]

_EVENT_OVERLAY = ("source_ip", "source_ae", "target_ts", "worker_node_id")


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    outputs: list[Output]
    error: DicomflowError | None = None
    trace_id: str | None = None


def _as_dict(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _str_field(data: dict[str, Any] | None, name: str, limit: int) -> str | None:
    value = (data or {}).get(name)
    if isinstance(value, str) and 0 < len(value.encode("utf-8")) <= limit:
        return value
    return None


def _failure_log_row(data: dict[str, Any] | None, raw: bytes, error: DicomflowError, worker: str,
                     now: datetime) -> DicomObjectMeta:
    """A transfer-log row for an event that failed, so analysts see failures in Doris.

    Identity fields come from the event when they are usable; a missing trace id is
    derived from the message bytes, so a redelivery maps to the same row.
    """
    trace = _str_field(data, "trace_id", 36) or str(uuid.uuid5(TRACE_NAMESPACE, hashlib.sha256(raw).hexdigest()))
    created = now
    created_raw = _str_field(data, "created_time", 32)
    if created_raw:
        try:
            created = datetime.fromisoformat(created_raw)
        except ValueError:
            pass
    row = DicomObjectMeta(
        trace_id=trace,
        worker_node_id=_str_field(data, "worker_node_id", 64) or worker,
        tenant_id=_str_field(data, "tenant_id", 64) or "",
        patient_id=_str_field(data, "patient_id", 64) or "",
        study_uid=_str_field(data, "study_uid", 64),
        series_uid=_str_field(data, "series_uid", 64),
        sop_uid=_str_field(data, "sop_uid", 64),
        file_path=_str_field(data, "file_path", 512),
        created_time=created,
        transfer_status=error.code,
        source_ip=_str_field(data, "source_ip", 64),
        source_ae=_str_field(data, "source_ae", 64),
        target_ts=_str_field(data, "target_ts", 64),
    )
    file_size = (data or {}).get("file_size")
    if isinstance(file_size, int) and not isinstance(file_size, bool) and file_size >= 0:
        row.file_size = file_size
    return row


def failure(raw: bytes, key: bytes | None, error: DicomflowError, worker: str,
            source: dict[str, Any] | None, now: datetime | None = None) -> Outcome:
    """The outcome of an event that failed: its dead letter, and a transfer-log row unless it
    was not even JSON."""
    return _fail(raw, key, error, worker, now or datetime.now(), source)


def _fail(raw: bytes, key: bytes | None, error: DicomflowError, worker: str, now: datetime,
          source: dict[str, Any] | None) -> Outcome:
    data = _as_dict(raw)
    outputs = [Output(DLQ, key, dead_letter(error=error, stage="ingest", worker=worker, raw=raw,
                                            original=data if data is not None else _json_or_none(raw),
                                            source=source, now=now))]
    trace = None
    if error.code != Code.INVALID_JSON:
        row = _failure_log_row(data, raw, error, worker, now)
        trace = row.trace_id
        outputs.append(Output(LOG, (row.key or row.trace_id).encode(), codec.dumps(row)))
    return Outcome(outputs, error, trace)


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _created(event: StorageEvent, now: datetime) -> datetime:
    if event.created_time:
        return datetime.fromisoformat(event.created_time)
    return now


def process(raw: bytes, key: bytes | None, *, storage_root: Path, worker: str,
            now: datetime | None = None, source: dict[str, Any] | None = None) -> Outcome:
    """Turn one ``storage_queue`` message into its output messages (or its dead letter)."""
    now = now or datetime.now()
    try:
        event = parse_event(raw)
        # Parsed from the descriptor that was checked, never reopened by name.
        with open_in_root(storage_root, event.file_path, event.tenant_id) as opened:
            result = extract(opened.reader_path, event.tenant_id, trace_id=event.trace_id, worker_node_id=worker,
                             file_path=event.file_path, file_size=opened.size, now=now)
        if not isinstance(result, Extracted):
            raise result
    except (ContractError, FileAccessError) as exc:
        return _fail(raw, key, exc, worker, now, source)
    except DicomflowError as exc:
        return _fail(raw, key, exc, worker, now, source)

    obj = result.object
    for name in _EVENT_OVERLAY:
        value = getattr(event, name)
        if value is not None:
            setattr(obj, name, value)
    obj.created_time = _created(event, now)
    series = result.state.key.encode()
    # Each record goes to the topic it declares; a per-series record goes to the series
    # window first, which debounces it and sends it on to its topic.
    outputs = [Output(record.ROUTE.topic, series, codec.dumps(record)) for record in result.records()
               if not record.ROUTE.per_series]
    # "path": where the instance file is, relative to the storage root (already checked above):
    # the series facts record it so the series JSON finds files stored in any layout.
    instance = {"sop_uid": result.image.sop_uid, "trace_id": event.trace_id, "state": result.state,
                "path": "/".join(path_components(storage_root, event.file_path))}
    outputs.append(Output(SERIES_INSTANCES, series, codec.dumps(instance)))
    return Outcome(outputs, None, event.trace_id)


def process_many(items: list[tuple[bytes, bytes | None, dict[str, Any]]], storage_root: Path, worker: str
                 ) -> list[Outcome]:
    """``process`` over a chunk of messages; the unit of work of the ingest parse pool.

    A bug in one message must not fail its neighbours, so each is isolated here too.
    """
    import warnings

    out: list[Outcome] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns per odd value; outcomes carry what matters
        for raw, key, source in items:
            try:
                out.append(process(raw, key, storage_root=storage_root, worker=worker, source=source))
            except Exception as exc:
                err = DicomflowError(f"internal error: {type(exc).__name__}: {exc}", code="INTERNAL")
                out.append(Outcome([Output(DLQ, key, dead_letter(error=err, stage="ingest", worker=worker, raw=raw,
                                                                 source=source))], err))
    return out
