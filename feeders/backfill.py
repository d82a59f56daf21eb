"""Backfill feeder: publish one storage event per file already on disk.

Idempotent: the trace id is derived from tenant, SOP Instance UID and path, so a
re-run publishes the same identities and downstream stages do not double-count.
Files that are not DICOM are published too: the worker dead-letters them with the
reason, which is where a data engineer looks for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom

from core.errors import BrokerError, ConfigError
from dicom.headerscan import scan_file
from feeders.publisher import EventPublisher
from schemas import codec
from schemas.identity import trace_id_for
from schemas.records import series_key

__all__ = ["BackfillSummary", "iter_files", "event_for", "backfill"]

log = logging.getLogger(__name__)

_ID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"]
_ID_TAG_NUMBERS = {"StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E, "SOPInstanceUID": 0x00080018,
                   "PatientID": 0x00100020}


@dataclass
class BackfillSummary:
    files: int = 0
    published: int = 0
    unreadable_headers: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file below root, in a stable order (symlinks are not followed).

    Dot-entries are skipped: they are work in progress (the SCP's spool directory, its
    ``.name.part`` temporaries and ``.prev`` safety copies), never stored instances.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _ids(path: Path) -> dict[str, str]:
    try:
        scanned = scan_file(path, _ID_TAG_NUMBERS.values())
    except (OSError, ValueError):
        scanned = None
    if scanned is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(Exception):  # a value pydicom cannot convert: its full read decides
                return {k: str(scanned.value(t) or "").strip() for k, t in _ID_TAG_NUMBERS.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_ID_TAGS, force=True)
        return {k: str(ds.get(k, "") or "").strip() for k in _ID_TAGS}
    except Exception:
        return {}


def event_for(path: Path, storage_root: Path, tenant: str, worker: str) -> tuple[dict[str, Any], str | None, bool]:
    """The storage event for one file, its key, and whether its identifiers were readable."""
    rel = path.resolve().relative_to(storage_root.resolve())
    ids = _ids(path)
    sop = ids.get("SOPInstanceUID", "")
    event: dict[str, Any] = {
        "tenant_id": tenant,
        "file_path": str(rel),
        "trace_id": trace_id_for(tenant, sop, str(rel)),
        "worker_node_id": worker,
        "source_ae": "BACKFILL",
        "file_size": path.stat().st_size,
        "created_time": codec.format_datetime(datetime.now()),
    }
    study, series = ids.get("StudyInstanceUID", ""), ids.get("SeriesInstanceUID", "")
    for name, value in (("study_uid", study), ("series_uid", series), ("sop_uid", sop),
                        ("patient_id", ids.get("PatientID", ""))):
        if value and len(value) <= 64:
            event[name] = value
    key = series_key(tenant, study, series) if study and series and len(study) <= 64 and len(series) <= 64 else None
    return event, key, bool(sop)


async def backfill(root: Path, *, storage_root: Path, tenant: str, worker: str, publisher: EventPublisher,
                   progress: bool = True, max_in_flight: int = 256) -> BackfillSummary:
    """Walk ``root`` (which must lie inside the storage root) and publish an event per file."""
    root = root.resolve()
    storage = storage_root.resolve()
    if root != storage and storage not in root.parents:
        raise ConfigError(f"{root} is not inside the storage root {storage}; set DICOMFLOW_STORAGE_ROOT "
                          "to a folder that contains it", field="DICOMFLOW_STORAGE_ROOT")
    files = list(iter_files(root))
    summary = BackfillSummary(files=len(files))
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="file", desc="backfill")
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def send(event: dict[str, Any], key: str | None) -> None:
        try:
            await publisher.publish(event, key)
            summary.published += 1
        except BrokerError as exc:
            summary.failed += 1
            summary.errors.append(f"{event['file_path']}: {exc.message}")
        if bar is not None:
            bar.update(1)

    for path in files:
        event, key, readable = await loop.run_in_executor(None, event_for, path, storage, tenant, worker)
        if not readable:
            summary.unreadable_headers += 1
        task = asyncio.ensure_future(send(event, key))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if len(pending) >= max_in_flight:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if pending:
        await asyncio.gather(*pending)
    if bar is not None:
        bar.close()
    return summary
