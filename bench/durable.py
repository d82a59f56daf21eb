"""Bounded state on the embedded stack: memory at 5k, 50k and 200k instances, and restart-to-ready.

One `dicomflow up` (embedded Tansu and PostgreSQL, default settings: 5 s window, broker recycled
at DICOMFLOW_BROKER_RECYCLE_MB) indexes CT clones fed by `dicomflow backfill` in steps. After
each step, once PostgreSQL holds every instance (``dicom_series_instance``), it reports the
resident memory of the worker (with its parse pool), of the broker and of the relay: the last
sample and the peak during the step. At 10k and at the end, `up` is stopped (SIGTERM, drained)
and started again on the same home; restart-to-ready is the time from the new start to "dicomflow
is up" (the SCP accepting), and the time until the next instance is indexed is reported too.

The baseline (same run) is each process's memory at the first step (5k): "flat" means the
later figures stay within 10% of it, or below the broker's stated cap.

    python -m bench.durable [--sizes 5000,50000,200000] [--restart-at 10000] [--per-series 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.clones import build_fast
from bench.common import machine_info, table, write_result
from bench.procstat import descendants, rss_bytes
from bench.stack import UpStack
from tests.harness import REPO

__all__ = ["main", "run"]

TENANT = "bench-durable"
MB = 2**20


def _stack_json(home: Path) -> dict[str, Any]:
    try:
        data = json.loads((home / "stack.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _tree_rss(pid: int | None) -> int:
    if not pid:
        return 0
    return sum(rss_bytes(p) or 0 for p in [pid, *descendants(pid)])


class Sampler:
    """RSS of the worker tree, the broker and the relay, every 0.5 s, from the stack's own pids."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            info = _stack_json(self.home)
            kids = info.get("children", {})
            broker_pid = (info.get("broker_memory") or {}).get("pid")
            self.samples.append({
                "t": time.monotonic(),
                "worker": _tree_rss((kids.get("worker-0") or {}).get("pid")) / MB,
                "broker": (rss_bytes(broker_pid) or 0) / MB if broker_pid else 0.0,
                "relay": _tree_rss((kids.get("relay") or {}).get("pid")) / MB,
                "scp": _tree_rss((kids.get("scp") or {}).get("pid")) / MB,
            })

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def window(self, since: float) -> list[dict[str, float]]:
        return [s for s in self.samples if s["t"] >= since]


async def _indexed(dsn: str) -> int:
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return -1
    try:
        return int(await conn.fetchval("SELECT count(*) FROM dicom_series_instance"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def _wait_indexed(stack: UpStack, want: int, timeout: float) -> float:
    started = time.monotonic()
    got = -1
    while time.monotonic() - started < timeout:
        got = asyncio.run(_indexed(stack.dsn))
        if got >= want:
            return time.monotonic() - started
        time.sleep(1.0)
    raise RuntimeError(f"{got} of {want} instances indexed after {timeout:.0f} s\n{stack.log_tail(30)}")


def _backfill(stack: UpStack, directories: list[Path]) -> float:
    started = time.monotonic()
    env = stack.env()
    for d in directories:
        proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(d), "--tenant", TENANT,
                               "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"backfill {d} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.monotonic() - started


def _restart(stack: UpStack, extra: Path, indexed: int) -> dict[str, float]:
    """Stop (drained) and start again; then time one more series of 10 being indexed."""
    stack.stop()
    stop_s = stack.stop_s or 0.0
    stack.proc = None
    stack.start()
    ready_s = stack.startup_s
    started = time.monotonic()
    _backfill(stack, [extra])
    _wait_indexed(stack, indexed + 10, 600)
    return {"stop_s": stop_s, "ready_s": ready_s, "next_indexed_s": time.monotonic() - started}


def run(sizes: list[int], restart_at: list[int], per_series: int, workdir: Path) -> dict[str, Any]:
    home = workdir / "home"
    storage = home / "storage"
    steps = sorted(set(sizes + restart_at))
    # one folder per step, so each step is one backfill of exactly its instances
    step_dirs: list[Path] = []
    built_s, done = 0.0, 0
    for n, step in enumerate(steps):
        built = build_fast(storage / "data" / f"step{n}", instances=step - done,
                           series=max(1, (step - done) // per_series))
        step_dirs.append(built.root)
        built_s += built.seconds
        done = step
    extra_dirs = [build_fast(storage / "extra" / f"r{n}", instances=10, series=1).root
                  for n in range(len(restart_at) + 1)]
    print(f"built {done + 10 * len(extra_dirs)} files in {built_s:.0f} s", flush=True)

    stack = UpStack(home, TENANT, scp_stop_grace_s=None, start_timeout=300.0)
    stack.start()
    sampler = Sampler(home).start()
    points: list[dict[str, Any]] = []
    restarts: list[dict[str, Any]] = []
    indexed = 0
    try:
        previous = 0
        for step, directory in zip(steps, step_dirs, strict=True):
            since = time.monotonic()
            publish_s = _backfill(stack, [directory])
            _wait_indexed(stack, indexed + step - previous, 7200)
            previous = step
            indexed = asyncio.run(_indexed(stack.dsn))
            took = time.monotonic() - since
            window = sampler.window(since)
            last = window[-1] if window else {}
            info = _stack_json(home)
            point = {"instances": indexed, "seconds": took, "publish_s": publish_s,
                     "rate": (indexed - (points[-1]["instances"] if points else 0)) / took,
                     "recycles": info.get("broker_recycles", 0),
                     **{f"{k}_mb": round(last.get(k, 0.0), 1) for k in ("worker", "broker", "relay", "scp")},
                     **{f"{k}_peak_mb": round(max((s[k] for s in window), default=0.0), 1)
                        for k in ("worker", "broker", "relay")}}
            points.append(point)
            print(f"step {point}", flush=True)
            if step in restart_at:
                r = _restart(stack, extra_dirs[len(restarts)], indexed)
                indexed += 10
                restarts.append({"instances": step, **r})
                print(f"restart {restarts[-1]}", flush=True)
        if steps[-1] not in restart_at:  # restart-to-ready at the largest size too
            restarts.append({"instances": steps[-1], **_restart(stack, extra_dirs[-1], indexed)})
            print(f"restart {restarts[-1]}", flush=True)
        recycle_mb = (_stack_json(home).get("broker_memory") or {}).get("recycle_mb")
    finally:
        sampler.stop()
        stack.stop()
    return {"points": points, "restarts": restarts, "machine": machine_info(),
            "recycle_mb": recycle_mb, "per_series": per_series}


def report(result: dict[str, Any]) -> str:
    pts = result["points"]
    base = pts[0] if pts else {}
    rows = [[f"{p['instances']:,}", f"{p['worker_mb']:.0f} ({p['worker_peak_mb']:.0f})",
             f"{p['broker_mb']:.0f} ({p['broker_peak_mb']:.0f})", f"{p['relay_mb']:.0f}",
             p["recycles"], f"{p['rate']:.0f}",
             f"{p['worker_mb'] / base['worker_mb']:.2f}" if base.get("worker_mb") else "-"] for p in pts]
    out = table(["indexed", "worker MB (peak)", "broker MB (peak)", "relay MB", "recycles", "inst/s",
                 "worker vs 5k"], rows)
    rrows = [[f"{r['instances']:,}", f"{r['stop_s']:.1f}" if r.get("stop_s") is not None else "-",
              f"{r['ready_s']:.1f}",
              f"{r['next_indexed_s']:.1f}" if r.get("next_indexed_s") is not None else "-"]
             for r in result["restarts"]]
    return out + "\n\n" + table(["restart at", "stop s", "start to ready s", "next series indexed s"], rrows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,50000,200000")
    parser.add_argument("--restart-at", default="10000")
    parser.add_argument("--per-series", type=int, default=100)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    restart_at = [int(x) for x in args.restart_at.split(",") if x]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicomflow-durable-"))
    try:
        result = run(sizes, restart_at, args.per_series, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    path = write_result("durable", result)
    print(report(result))
    print(f"\nresult: {path}")


if __name__ == "__main__":
    main()
