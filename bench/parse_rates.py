"""Single-process baselines for the ingest benchmark: how fast can one core read these headers?

* ``raw``: ``pydicom.dcmread(path, stop_before_pixels=True)``, nothing else (the issue's baseline);
* ``extract``: ``dicom.extract.extract`` (read only the needed tags, then decode and validate them);
* ``process``: ``agents.fanout.process``, the ingest agent's whole pure core (event JSON in,
  three encoded output messages out), without any broker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pydicom

from agents.fanout import process
from dicom.extract import Extracted, extract
from feeders.backfill import event_for
from schemas import codec

__all__ = ["Rate", "measure"]

_WARMUP = 50
T = TypeVar("T")


@dataclass(frozen=True)
class Rate:
    """One baseline: files per second of wall time, and CPU milliseconds per file."""

    per_s: float
    cpu_ms: float


def _rate(items: Sequence[T], fn: Callable[[T], object]) -> Rate:
    for item in items[:_WARMUP]:
        fn(item)
    wall, cpu = time.perf_counter(), time.process_time()
    for item in items:
        fn(item)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Rate(len(items) / wall, 1000 * cpu / len(items))


def measure(files: Sequence[Path], *, tenant: str, storage_root: Path) -> dict[str, Rate]:
    """Each baseline over all ``files`` (one pass each, after a short warm-up)."""
    bad = [f for f in files[:5] if not isinstance(extract(f, tenant), Extracted)]
    if bad:
        raise RuntimeError(f"extract rejects the benchmark files: {extract(bad[0], tenant)}")
    events: list[tuple[bytes, bytes | None]] = []
    for f in files:
        event, key, _ = event_for(f, storage_root, tenant, "worker-bench")
        events.append((codec.dumps(event), key.encode() if key else None))

    def run_process(item: tuple[bytes, bytes | None]) -> object:
        raw, key = item
        outcome = process(raw, key, storage_root=storage_root, worker="worker-bench")
        if outcome.error is not None:
            raise RuntimeError(f"process failed: {outcome.error}")
        return outcome

    return {
        "raw": _rate(files, lambda f: pydicom.dcmread(f, stop_before_pixels=True)),
        "extract": _rate(files, lambda f: extract(f, tenant)),
        "process": _rate(events, run_process),
    }
