"""Backfill feeder: publish one storage event per file already on disk.

Idempotent: the trace id is derived from tenant, SOP Instance UID and path, so a
re-run publishes the same identities and downstream stages do not double-count.
Files that are not DICOM are published too: the worker dead-letters them with the
reason, which is where a data engineer looks for them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from core.errors import BrokerError, Code, ConfigError, ContractError, ExtractionError, FileAccessError
from dicom.paths import check_tenant_tree, tree_owner
from dicom.reader import InstanceHeader, read_instance_header
from feeders.events import build_event, event_key, validated
from feeders.publisher import EventPublisher
from schemas.identity import trace_id_for

__all__ = ["BackfillSummary", "iter_files", "event_for", "backfill"]

log = logging.getLogger(__name__)


@dataclass
class BackfillSummary:
    files: int = 0
    published: int = 0
    unreadable_headers: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def iter_files(root: Path, *, json_root: Path | None = None) -> Iterator[Path]:
    """Every regular file below root, in a stable order (symlinks are not followed).

    Dot-entries are skipped: they are work in progress (the SCP's spool directory, its
    ``.name.part`` temporaries and ``.prev`` safety copies), never stored instances. So are
    the series JSON documents, ``{json_root}/{tenant}/metadata/``: by default they live in the
    storage root too, and they are dicomflow's output, not instances.
    """
    documents = json_root.resolve() if json_root is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (d == "metadata" and documents is not None
                                      and here.resolve().parent == documents))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _header(path: Path) -> InstanceHeader | None:
    try:
        return read_instance_header(path)
    except ExtractionError as exc:
        if exc.code == Code.MALFORMED_DICOM:
            raise  # a hostile structure: refused here, see backfill()
        return None  # published anyway: ingest dead-letters the file with the reason
    except FileAccessError:
        return None  # published anyway: ingest dead-letters the file with the reason


def event_for(path: Path, storage_root: Path, tenant: str, worker: str) -> tuple[dict[str, Any], str | None, bool]:
    """The validated storage event for one file, its key, and whether its identifiers were readable.

    Raises :class:`ContractError` (naming the field) when the event breaks the contract, and
    :class:`ExtractionError` (MALFORMED_DICOM) when the header's structure is beyond the reader's bounds,
    and :class:`FileAccessError` (TENANT_MISMATCH) when the file lies in another tenant's tree.
    """
    relative = path.resolve().relative_to(storage_root.resolve())
    check_tenant_tree(storage_root, relative, tenant)  # another tenant's tree: TENANT_MISMATCH
    rel = relative.as_posix()
    header = _header(path)
    sop = header.sop_uid if header is not None and header.sop_uid else ""
    trace_id = trace_id_for(tenant, sop, rel)
    event = validated(build_event(tenant=tenant, header=header, file_path=rel, file_size=path.stat().st_size,
                                  trace_id=trace_id, worker_node_id=worker, now=datetime.now(),
                                  source_ae="BACKFILL"), trace_id)
    return event, event_key(event), bool(sop)


async def backfill(root: Path, *, storage_root: Path, tenant: str, worker: str, publisher: EventPublisher,
                   progress: bool = True, max_in_flight: int = 256, json_root: Path | None = None) -> BackfillSummary:
    """Walk ``root`` (which must lie inside the storage root) and publish an event per file."""
    root = root.resolve()
    storage = storage_root.resolve()
    if root != storage and storage not in root.parents:
        raise ConfigError(f"{root} is not inside the storage root {storage}; set DICOMFLOW_STORAGE_ROOT "
                          "to a folder that contains it", field="DICOMFLOW_STORAGE_ROOT")
    if root != storage:
        owner = tree_owner(storage, root.relative_to(storage).parts[0])
        if owner is not None and owner != tenant:
            raise ConfigError(f"{root} is in the tree of tenant {owner!r}; it cannot be backfilled as tenant "
                              f"{tenant!r}", field="--tenant")
    files = list(iter_files(root, json_root=json_root))
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
        try:
            event, key, readable = await loop.run_in_executor(None, event_for, path, storage, tenant, worker)
        except (ContractError, ExtractionError, FileAccessError) as exc:
            # Not published: a data engineer fixes the tenant or the path (or removes a malformed
            # file, which ingest would only reject again), then re-runs.
            summary.failed += 1
            summary.errors.append(f"{path}: {exc.code}: {exc.field}: {exc.message}")
            log.warning("backfill refused path=%s code=%s field=%s reason=%s", path, exc.code, exc.field,
                        exc.message)
            if bar is not None:
                bar.update(1)
            continue
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
