"""Peak RSS of the worker while it ingests N instances: the never-pruned series tables make it grow.

One worker (default settings, no sinks) on a fresh embedded Tansu broker:

1. ``storage_queue`` is preloaded with the largest size (``dicomflow backfill``), then the
   worker starts; its RSS is the sum over the worker and all its descendants (the ingest
   stage's ``spawn`` pool, DICOMFLOW_INGEST_PROCESSES = cores by default), read from /proc
   every 0.2 s;
2. the baseline (same run) is the last sample before the worker's first output: started,
   nothing ingested yet (the pool is spawned by the first batch);
3. the peak "at k instances" is the largest sample taken until the k-th message appeared on
   ``dicom_image_queue`` (for the largest size: until the series window has emitted every
   series with all its instances). One run gives every checkpoint: the tables only grow,
   so a separate k-instance run would see the same curve (its last window flush aside).

    python -m bench.rss [--sizes 5000,20000] [--per-series 100]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.clones import build_fast
from bench.common import Figure, figures_table, poll_until, table, write_result
from bench.kafka import OffsetProbe
from bench.pipeline import Run, backfill, pipeline_run
from bench.procstat import descendants, rss_bytes
from streams.topology import IMAGE, STATE, STORAGE
from tests.harness import read_all

__all__ = ["RssResult", "RssSampler", "run_rss", "main"]

TENANT = "bench-rss"
INTERVAL_S = 0.2
MB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    t: float
    total: int
    main: int
    processes: int


class RssSampler:
    """Samples RSS of ``pid`` and its descendants from a thread, every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = INTERVAL_S) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            main = rss_bytes(self.pid)
            if main is None:
                return
            kids = [r for r in (rss_bytes(p) for p in descendants(self.pid)) if r is not None]
            self.samples.append(Sample(time.monotonic(), main + sum(kids), main, 1 + len(kids)))
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> Sample:
        window = [s for s in self.samples if since <= s.t <= until]
        if not window:
            raise RuntimeError("no RSS sample in the interval")
        return max(window, key=lambda s: s.total)


@dataclass
class RssResult:
    params: dict[str, Any]
    start: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    figures: list[Figure] = field(default_factory=list)
    path: Path | None = None


async def _series_done(run: Run, series: int, n: int) -> bool:
    latest: dict[bytes | None, int] = {}
    for m in await read_all(run.broker.url, STATE):
        latest[m.key] = int((m.json() or {}).get("series_related_instances") or 0)
    return len(latest) == series and sum(latest.values()) == n


async def _measure(run: Run, sizes: list[int], series: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    n = max(sizes)
    published, backfill_s = await asyncio.to_thread(backfill, run, run.storage_root, TENANT)
    if published != n:
        raise RuntimeError(f"backfill published {published}, expected {n}")
    worker = run.worker()
    pending = sorted(sizes)
    reached: dict[int, float] = {}
    try:
        async with OffsetProbe(run.broker.url) as probe:
            if (preloaded := await probe.count(STORAGE)) != n:
                raise RuntimeError(f"storage_queue holds {preloaded} events, expected {n}")
            started = time.monotonic()
            worker.start()
            assert worker.proc is not None
            sampler = RssSampler(worker.proc.pid).start()
            _, t_first = await poll_until(lambda: probe.count(IMAGE), lambda c: c > 0, timeout=120,
                                          interval=0.05, what="first output")
            deadline = t_first + 120 + n / 20
            while pending:
                count = await probe.count(IMAGE)
                now = time.monotonic()
                while pending and count >= pending[0]:
                    reached[pending.pop(0)] = now
                if now > deadline:
                    raise TimeoutError(f"{IMAGE} holds {count} of {n} after {now - t_first:.0f}s")
                await asyncio.sleep(0.1)
        _, t_done = await poll_until(lambda: _series_done(run, series, n), bool, timeout=120, interval=0.5,
                                     what="series window emitted every series complete")
        t_images = reached[n]
        reached[n] = t_done
        sampler.stop()
    except BaseException:
        print(f"--- worker log tail ({run.home / 'worker.log'}):\n{worker.log_tail(30)}")
        raise
    finally:
        await asyncio.to_thread(worker.stop)
    before = [smp for smp in sampler.samples if smp.t < t_first]
    if not before:
        raise RuntimeError("no RSS sample before the worker's first output")
    start = before[-1]
    before_d = {"total_mb": start.total / MB, "main_mb": start.main / MB, "processes": start.processes,
                "seconds_after_start": start.t - started}
    points = []
    for k in sorted(sizes):
        peak = sampler.peak(started, reached[k])
        points.append({"instances": k, "seconds_from_first_output": reached[k] - t_first,
                       "peak_total_mb": peak.total / MB, "peak_main_mb": peak.main / MB,
                       "processes_at_peak": peak.processes,
                       "mb_per_1k_over_start": (peak.total - start.total) / MB / k * 1000,
                       "main_mb_per_1k_over_start": (peak.main - start.main) / MB / k * 1000})
    points[-1].update({"backfill_s": backfill_s, "samples": len(sampler.samples),
                       "ingest_rate": n / (t_images - t_first), "images_to_series_done_s": t_done - t_images})
    return before_d, points


def run_rss(*, sizes: list[int], per_series: int = 100, workdir: Path | None = None) -> RssResult:
    own = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="dicomflow-bench-rss-"))
    n = max(sizes)
    series = max(1, n // per_series)
    try:
        storage = work / "storage"
        print(f"rss: building {n} instances in {series} series ...", flush=True)
        build_fast(storage / "rss", instances=n, series=series)
        print(f"rss: one worker ingesting {n} (checkpoints {', '.join(map(str, sorted(sizes)))}) ...", flush=True)
        with pipeline_run(work, storage, "run-rss") as run:
            start, points = asyncio.run(_measure(run, sizes, series))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    params = {"sizes": sorted(sizes), "series": series, "per_series": per_series, "interval_s": INTERVAL_S,
              "workers": 1, "sinks": "none", "ingest_processes": "default (cores)"}
    result = RssResult(params, start, points, _figures(start, points))
    result.path = write_result("rss", {"params": params, "start": start, "checkpoints": points,
                                       "figures": [f.as_dict() for f in result.figures]})
    return result


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _figures(start: dict[str, Any], points: list[dict[str, Any]]) -> list[Figure]:
    figures = [Figure(f"worker peak RSS @{_k(p['instances'])} (+children)", p["peak_total_mb"], "MB",
                      start["total_mb"], "worker before 1st output MB") for p in points]
    figures += [Figure(f"worker RSS MB per 1k instances @{_k(p['instances'])}", p["mb_per_1k_over_start"],
                       "MB/1k", None, "(peak - start) / k") for p in points]
    if len(points) >= 2:
        a, b = points[0], points[-1]
        span = f"{_k(a['instances'])}->{_k(b['instances'])}"
        for what, key in (("worker+children", "peak_total_mb"), ("worker main process", "peak_main_mb")):
            slope = (b[key] - a[key]) / (b["instances"] - a["instances"]) * 1000
            figures.append(Figure(f"{what} RSS growth {span}", slope, "MB/1k", None, "marginal"))
    return figures


def report(r: RssResult) -> str:
    s = r.start
    rows = [["started, before 1st output", 0, s["total_mb"], s["main_mb"], s["processes"], None, None]]
    rows += [[f"peak until {p['instances']:,} instances", p["seconds_from_first_output"], p["peak_total_mb"],
              p["peak_main_mb"], p["processes_at_peak"], p["mb_per_1k_over_start"], p["main_mb_per_1k_over_start"]]
             for p in r.checkpoints]
    return "\n".join([
        f"rss: one worker, {r.params['series']} series x {r.params['per_series']} instances, RSS every "
        f"{INTERVAL_S} s (worker + descendants)",
        table(["worker", "s after 1st output", "total MB", "main MB", "procs", "MB/1k over start",
               "main MB/1k"], rows),
        "",
        figures_table(r.figures),
        f"\nresults: {r.path}" if r.path else "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,20000", help="comma-separated checkpoints (the largest is run)")
    parser.add_argument("--per-series", type=int, default=100)
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    r = run_rss(sizes=[int(s) for s in args.sizes.split(",")], per_series=args.per_series, workdir=args.workdir)
    print(report(r))


if __name__ == "__main__":
    main()
