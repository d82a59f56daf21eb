"""Running the real pipeline for a benchmark: broker, backfill, worker processes, CPU accounting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.procstat import child_pids, tree_cpu_seconds
from dicomflow.embedded.broker import EmbeddedBroker
from dicomflow.embedded.postgres import EmbeddedPostgres
from tests.harness import REPO, WorkerProcess, worker_env

__all__ = ["Run", "pipeline_run", "backfill", "CpuMeter", "create_database"]


@dataclass
class Run:
    """One pipeline run: a fresh broker and a worker home, sharing the dataset's storage root."""

    home: Path
    storage_root: Path
    broker: EmbeddedBroker

    def env(self, **extra: str) -> dict[str, str]:
        # Production's series window (5 s), not the tests' 1 s, unless a caller overrides it.
        base = {"DICOMFLOW_STORAGE_ROOT": str(self.storage_root), "DICOMFLOW_SERIES_WINDOW_SECONDS": "5",
                "DICOMFLOW_WORKER_ID": "worker-bench"}
        return worker_env(self.broker.url, self.home, **{**base, **extra})

    def worker(self, **extra: str) -> WorkerProcess:
        return WorkerProcess(self.env(**extra), self.home / "worker.log")

    @property
    def broker_pid(self) -> int | None:
        pids = child_pids(os.getpid(), "tansu")
        return pids[0] if len(pids) == 1 else None


async def create_database(pg: EmbeddedPostgres, name: str) -> str:
    """A fresh database on the embedded PostgreSQL (one per run); its DSN."""
    import asyncpg

    conn = await asyncpg.connect(pg.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return pg.dsn_for(name)


@contextmanager
def pipeline_run(workdir: Path, storage_root: Path, name: str) -> Iterator[Run]:
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(log_path=home / "tansu.log") as broker:
        yield Run(home, storage_root, broker)


def backfill(run: Run, directory: Path, tenant: str, timeout: float = 600.0) -> tuple[int, float]:
    """``dicomflow backfill DIRECTORY --tenant T``; returns (events published, seconds)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(directory), "--tenant", tenant,
                           "--no-progress"], env=run.env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - started
    found = re.search(r"published=(\d+) failed=(\d+)", proc.stdout)
    if proc.returncode != 0 or not found or found.group(2) != "0":
        raise RuntimeError(f"backfill failed rc={proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return int(found.group(1)), seconds


class CpuMeter:
    """CPU seconds used by a set of processes between ``start()`` and ``stop()``, each with its children
    (the worker's parse pool is the worker's cost too)."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._start: dict[str, float] = {}
        self._wall = 0.0
        self.used: dict[str, float] = {}
        self.wall = 0.0

    def start(self) -> None:
        self._wall = time.monotonic()
        self._start = {n: tree_cpu_seconds(p) or 0.0 for n, p in self.pids.items()}

    def stop(self) -> None:
        self.wall = time.monotonic() - self._wall
        self.used = {n: (tree_cpu_seconds(p) or 0.0) - self._start.get(n, 0.0) for n, p in self.pids.items()}

    def cores(self) -> dict[str, float]:
        """Average cores busy per process over the interval."""
        return {n: s / self.wall for n, s in self.used.items()} if self.wall > 0 else {}
