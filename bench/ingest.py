"""Ingest throughput: events/s from storage_queue to the three outputs, against the raw header parse.

Same files, same run:

1. baselines, one process: ``pydicom.dcmread(stop_before_pixels=True)`` (the ratio's
   denominator), ``dicom.extract.extract`` and ``agents.fanout.process``;
2. ``storage_queue`` preloaded with one event per file (``dicomflow backfill``), then ONE
   worker started on a fresh embedded Tansu broker, with an embedded PostgreSQL as its index
   as ``dicomflow up`` runs it (``--no-index``: without, the series windows in the broker).
   Timed from the worker's first output on ``dicom_image_queue`` until all N image messages
   are there; ``log_queue`` must then hold N, every series its row with the exact count in
   PostgreSQL (without an index: N series-instance records), the DLQ none;
3. with ``--profile``, a second identical run under py-spy (attached for exactly the timed
   interval) or cProfile, reduced to the top functions by cumulative time and self time
   by library. The profiled run's rate is never the reported figure.

The raw baseline is measured before and after the pipeline runs, and the ratio uses their
mean: on a shared VM the baseline itself moves between minutes (it moved 1.6x between two runs
an hour apart). CPU time stolen by the hypervisor (``/proc/stat`` steal) is reported for
each measurement: where it differs, the figures taken under it are slower.

    python -m bench.ingest [--instances 2000] [--series 20] [--profile] [--profiler auto|py-spy|cprofile]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import parse_rates
from bench.common import Figure, figures_table, poll_until, table, write_result
from bench.dataset import BenchDataset, build
from bench.kafka import OffsetProbe
from bench.parse_rates import Rate
from bench.pipeline import CpuMeter, Run, backfill, create_database, pipeline_run
from bench.profiling import CProfiledWorker, Profile, PySpy, find_py_spy, summarize_pstats, summarize_py_spy
from dicomflow.embedded.postgres import EmbeddedPostgres
from streams.topology import DLQ, IMAGE, LOG, SERIES_INSTANCES, STORAGE
from tests.harness import WorkerProcess, read_all

__all__ = ["IngestResult", "run_ingest", "main"]

TENANT = "bench-ingest"
#: Issue #15: the backfill path at >= 0.9x the raw header parse.
TARGET_RATIO = 0.9
POLL_S = 0.05


@dataclass
class PipelineRun:
    events: int
    backfill_s: float
    startup_s: float
    wall_s: float
    rate: float
    timestamp_span_s: float | None
    timestamp_rate: float | None
    cpu_s: dict[str, float]
    cores: dict[str, float]
    counts: dict[str, int]
    #: Cores' worth of CPU the hypervisor took from this VM during the timed interval.
    steal_cores: float = 0.0
    #: First output -> every series row in the index with its exact count (None: no index).
    to_series_rows_s: float | None = None

    @property
    def worker_cpu_ms_per_event(self) -> float | None:
        cpu = self.cpu_s.get("worker")
        return 1000 * cpu / self.events if cpu is not None else None


def steal_seconds() -> float:
    """CPU seconds stolen from this VM so far (all cores; /proc/stat, USER_HZ ticks)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / 100.0
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class IngestResult:
    dataset: dict[str, Any]
    baselines: dict[str, Rate]
    pipeline: PipelineRun
    #: The raw baseline measured again after the pipeline runs (the ratio uses the mean).
    raw_after: Rate | None = None
    #: Cores stolen by the hypervisor during the baselines (before, after).
    baseline_steal: tuple[float, float] = (0.0, 0.0)
    index: bool = True
    profile: Profile | None = None
    profiled_run: PipelineRun | None = None
    figures: list[Figure] = field(default_factory=list)
    path: Path | None = None


def _timestamps(messages: list[Any]) -> tuple[float, float] | None:
    stamps = [m.timestamp_ms for m in messages if m.timestamp_ms > 0]
    return (min(stamps) / 1000, max(stamps) / 1000) if stamps else None


async def _series_counted(dsn: str) -> int:
    """Instances counted in the index's series rows."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT COALESCE(SUM(series_related_instances), 0) FROM dicom_state_meta")
                   or 0)
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def _verify(run: Run, n: int, index: bool) -> tuple[dict[str, int], float | None]:
    """Exact output counts (flush requests on the series topic are not instances) and the output time span."""
    images = await read_all(run.broker.url, IMAGE)
    logs = await read_all(run.broker.url, LOG)
    series = [m for m in await read_all(run.broker.url, SERIES_INSTANCES) if "flush" not in (m.json() or {})]
    dlq = await read_all(run.broker.url, DLQ)
    counts = {IMAGE: len(images), LOG: len(logs), SERIES_INSTANCES: len(series), DLQ: len(dlq)}
    # With an index, ingest hands the instances to the series windows in-process: the topic stays empty.
    want = {IMAGE: n, LOG: n, SERIES_INSTANCES: 0 if index else n, DLQ: 0}
    if counts != want:
        raise AssertionError(f"outputs do not match the input: want {want}, got {counts}")
    spans = [s for s in (_timestamps(images), _timestamps(logs), _timestamps(series)) if s]
    span = max(s[1] for s in spans) - min(s[0] for s in spans) if spans else None
    return counts, span


async def _measure(run: Run, n: int, *, profiler: str | None, worker_env: dict[str, str] | None = None,
                   dsn: str | None = None) -> tuple[PipelineRun, Profile | None]:
    published, backfill_s = await asyncio.to_thread(backfill, run, run.storage_root, TENANT)
    if published != n:
        raise RuntimeError(f"backfill published {published} events, expected {n}")
    prof_out = run.home / ("worker.prof" if profiler == "cprofile" else "py-spy.txt")
    extra = {**({"DICOMFLOW_POSTGRES_DSN": dsn} if dsn else {}), **(worker_env or {})}
    worker: WorkerProcess = (CProfiledWorker(run.env(**extra), run.home / "worker.log", prof_out)
                             if profiler == "cprofile" else run.worker(**extra))
    spy: PySpy | None = None
    timeout = 120 + n / 50
    async with OffsetProbe(run.broker.url) as probe:
        preloaded = await probe.count(STORAGE)
        if preloaded != n:
            raise RuntimeError(f"storage_queue holds {preloaded} events, expected {n}")
        started = time.monotonic()
        worker.start()
        assert worker.proc is not None
        try:
            _, t_first = await poll_until(lambda: probe.count(IMAGE), lambda c: c > 0, timeout=120,
                                          interval=POLL_S, what="first output")
            cpu = CpuMeter({"worker": worker.proc.pid, "broker": run.broker_pid})
            cpu.start()
            steal0 = steal_seconds()
            if profiler == "py-spy":
                exe = find_py_spy()
                assert exe is not None
                spy = PySpy(exe, worker.proc.pid, prof_out)
                spy.start()
            _, t_done = await poll_until(lambda: probe.count(IMAGE), lambda c: c >= n, timeout=timeout,
                                         interval=POLL_S, what=f"{n} messages on {IMAGE}")
            cpu.stop()
            steal = steal_seconds() - steal0
            if spy is not None:
                await asyncio.to_thread(spy.stop)
            to_rows: float | None = None
            if dsn is not None:
                _, t_rows = await poll_until(lambda: _series_counted(dsn), lambda c: c >= n, timeout=120,
                                             interval=POLL_S, what=f"{n} instances counted in the series rows")
                to_rows = t_rows - t_first
                if (counted := await _series_counted(dsn)) != n:
                    raise AssertionError(f"the series rows count {counted} instances, not {n}")
            await poll_until(lambda: probe.counts(LOG, SERIES_INSTANCES),
                             lambda c: c[LOG] >= n and (dsn is not None or c[SERIES_INSTANCES] >= n), timeout=60,
                             interval=0.2, what="log and series-instance outputs")
            counts, span = await _verify(run, n, dsn is not None)
        except BaseException:
            print(f"--- worker log tail ({run.home / 'worker.log'}):\n{worker.log_tail(40)}")
            raise
        finally:
            if spy is not None and spy.proc is not None and spy.proc.poll() is None:
                spy.proc.kill()
            await asyncio.to_thread(worker.stop)
    wall = t_done - t_first
    result = PipelineRun(n, backfill_s, t_first - started, wall, n / wall, span, n / span if span else None,
                         cpu.used, cpu.cores(), counts, steal_cores=steal / wall, to_series_rows_s=to_rows)
    profile = None
    if profiler == "py-spy":
        profile = summarize_py_spy(prof_out)
    elif profiler == "cprofile":
        if not prof_out.exists():
            raise RuntimeError(f"cProfile wrote no {prof_out}; worker log:\n{worker.log_tail(20)}")
        profile = summarize_pstats(prof_out)
    return result, profile


def _choose_profiler(choice: str) -> str:
    if choice == "auto":
        return "py-spy" if find_py_spy() else "cprofile"
    if choice == "py-spy" and not find_py_spy():
        raise SystemExit("py-spy not found (PATH, $BENCH_PY_SPY or next to python); use --profiler cprofile")
    return choice


def _baselines(files: list[Path], storage: Path) -> tuple[dict[str, Rate], float]:
    s0, t0 = steal_seconds(), time.monotonic()
    rates = parse_rates.measure(files, tenant=TENANT, storage_root=storage)
    return rates, (steal_seconds() - s0) / max(time.monotonic() - t0, 1e-6)


def run_ingest(*, instances: int, series: int, profile: bool = False, profiler: str = "auto",
               workdir: Path | None = None, worker_env: dict[str, str] | None = None,
               index: bool = True) -> IngestResult:
    own = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="dicomflow-bench-ingest-"))
    pg: EmbeddedPostgres | None = None
    try:
        storage = work / "storage"
        print(f"ingest: building {instances} instances in {series} series ...", flush=True)
        ds = build(storage / "ingest", instances=instances, series=series)
        if index:
            print("ingest: starting embedded PostgreSQL (the worker's index, as in `dicomflow up`) ...", flush=True)
            pg = EmbeddedPostgres(work / "pg")
            pg.start()
        print(f"ingest: baselines over {ds.instances} files ...", flush=True)
        baselines, steal_before = _baselines(ds.files, storage)
        print("ingest: pipeline run (one worker) ...", flush=True)
        with pipeline_run(work, storage, "run-timed") as run:
            dsn = asyncio.run(create_database(pg, "timed")) if pg else None
            timed, _ = asyncio.run(_measure(run, ds.instances, profiler=None, worker_env=worker_env, dsn=dsn))
        print("ingest: raw baseline again ...", flush=True)
        after, steal_after = _baselines(ds.files, storage)
        result = IngestResult(_dataset_info(ds), baselines, timed, raw_after=after["raw"],
                              baseline_steal=(steal_before, steal_after), index=index)
        if profile:
            tool = _choose_profiler(profiler)
            print(f"ingest: profiled run ({tool}) ...", flush=True)
            with pipeline_run(work, storage, "run-profiled") as run:
                dsn = asyncio.run(create_database(pg, "profiled")) if pg else None
                result.profiled_run, result.profile = asyncio.run(_measure(run, ds.instances, profiler=tool,
                                                                           worker_env=worker_env, dsn=dsn))
            if result.profile is not None:
                kept = work / "run-profiled" / Path(result.profile.raw_path).name
                result.profile.raw_path = str(_keep_profile(kept))
        result.figures = _figures(result)
        result.path = write_result("ingest", _payload(result, instances, series))
        return result
    finally:
        if pg is not None:
            pg.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _keep_profile(path: Path) -> Path:
    """Copy the raw profile next to the JSON results (the work dir is removed)."""
    from bench.common import OUT_DIR

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    dest = OUT_DIR / f"ingest-profile{path.suffix}"
    shutil.copy(path, dest)
    return dest


def _dataset_info(ds: BenchDataset) -> dict[str, Any]:
    return {"instances": ds.instances, "series": ds.series, "bytes": ds.bytes, "build_s": ds.seconds}


def raw_rate(r: IngestResult) -> float:
    """The raw baseline: the mean of its measurements before and after the pipeline runs."""
    before = r.baselines["raw"].per_s
    return (before + r.raw_after.per_s) / 2 if r.raw_after else before


def raw_cpu_ms(r: IngestResult) -> float:
    before = r.baselines["raw"].cpu_ms
    return (before + r.raw_after.cpu_ms) / 2 if r.raw_after else before


def _figures(r: IngestResult) -> list[Figure]:
    p, raw = r.pipeline, raw_rate(r)
    figures = [
        Figure("ingest events/s (1 worker)", p.rate, "ev/s", raw, "raw dcmread files/s",
               f">= {TARGET_RATIO} x", p.rate / raw >= TARGET_RATIO),
        Figure("ingest vs extract()", p.rate, "ev/s", r.baselines["extract"].per_s, "extract files/s"),
        Figure("ingest vs fanout.process()", p.rate, "ev/s", r.baselines["process"].per_s, "process files/s"),
    ]
    if p.timestamp_rate:
        figures.append(Figure("ingest events/s (broker timestamps)", p.timestamp_rate, "ev/s", raw,
                              "raw dcmread files/s"))
    cpu = p.worker_cpu_ms_per_event
    if cpu:
        # CPU-normalised: robust to other load on a shared machine (higher is better, like a rate).
        figures.append(Figure("ingest events per worker-CPU-s", 1000 / cpu, "ev/cpu-s",
                              1000 / raw_cpu_ms(r), "raw dcmread files/cpu-s", f">= {TARGET_RATIO} x",
                              raw_cpu_ms(r) / cpu >= TARGET_RATIO))
    return figures


def _payload(r: IngestResult, instances: int, series: int) -> dict[str, Any]:
    def run_dict(p: PipelineRun | None) -> dict[str, Any] | None:
        if p is None:
            return None
        return {**p.__dict__, "worker_cpu_ms_per_event": p.worker_cpu_ms_per_event}

    return {
        "params": {"instances": instances, "series": series, "workers": 1, "partitions": 4,
                   "broker": "embedded tansu", "index": "embedded postgresql" if r.index else None,
                   "target_ratio": TARGET_RATIO},
        "dataset": r.dataset,
        "baselines": {name: rate.__dict__ for name, rate in r.baselines.items()},
        "raw_after": r.raw_after.__dict__ if r.raw_after else None,
        "baseline_steal_cores": r.baseline_steal,
        "pipeline": run_dict(r.pipeline),
        "profiled_run": run_dict(r.profiled_run),
        "profile": r.profile.as_dict() if r.profile else None,
        "figures": [f.as_dict() for f in r.figures],
    }


def report(r: IngestResult) -> str:
    p = r.pipeline
    per_event = {name: 1000 / rate.per_s for name, rate in r.baselines.items()}
    lines = [
        f"ingest: {p.events} events, {r.dataset['series']} series, 1 worker, 4 partitions, "
        f"{'index: embedded PostgreSQL' if r.index else 'no index (series windows in the broker)'}",
        table(["baseline (1 process)", "files/s", "ms/file", "CPU ms/file"],
              [[name, rate.per_s, per_event[name], rate.cpu_ms] for name, rate in r.baselines.items()]
              + ([["raw, after the pipeline", r.raw_after.per_s, 1000 / r.raw_after.per_s, r.raw_after.cpu_ms]]
                 if r.raw_after else [])),
        f"hypervisor steal (cores): baselines {r.baseline_steal[0]:.2f} before, {r.baseline_steal[1]:.2f} after; "
        f"timed pipeline interval {p.steal_cores:.2f}",
        "",
        table(["pipeline", "value"], [
            ["preload (backfill) s", p.backfill_s], ["worker start -> first output s", p.startup_s],
            ["first output -> all N images s", p.wall_s],
            ["first output -> every series row counted s", p.to_series_rows_s],
            ["events/s (wall, polled)", p.rate],
            ["events/s (broker timestamps)", p.timestamp_rate], ["worker ms/event (wall)", 1000 / p.rate],
            ["worker CPU ms/event", p.worker_cpu_ms_per_event], ["worker cores busy", p.cores.get("worker")],
            ["broker cores busy", p.cores.get("broker")],
            ["overhead over process() ms/event", 1000 / p.rate - per_event["process"]],
        ]),
        "",
        figures_table(r.figures),
    ]
    if r.profile is not None:
        lines += ["", profile_report(r.profile, r.profiled_run)]
    if r.path:
        lines.append(f"\nresults: {r.path}")
    return "\n".join(lines)


def profile_report(profile: Profile, run: PipelineRun | None) -> str:
    rate = f", profiled run {run.rate:,.0f} ev/s" if run else ""
    head = f"profile ({profile.tool}, {profile.samples:,.0f} {'samples' if profile.tool == 'py-spy' else 's'}{rate})"
    return "\n".join([
        head, f"  {profile.notes}",
        table(["self time by library", "share"], [[lib, share] for lib, share in profile.by_library[:15]]),
        "",
        *([table(["by stage of the worker", "share"], [[t, share] for t, share in profile.by_stage]), ""]
          if profile.by_stage else []),
        "",
        table(["top functions by cumulative time", "share"], [[f, s] for f, s in profile.cumulative]),
        f"raw profile: {profile.raw_path}",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="add a profiled run and print where the time goes")
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile"], default="auto")
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temp dir, removed)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the worker (e.g. DICOMFLOW_INGEST_PROCESSES=0)")
    parser.add_argument("--no-index", action="store_true",
                        help="no PostgreSQL: the series windows and their changelog in the broker")
    args = parser.parse_args(argv)
    r = run_ingest(instances=args.instances, series=args.series, profile=args.profile, profiler=args.profiler,
                   workdir=args.workdir, worker_env=dict(e.split("=", 1) for e in args.env), index=not args.no_index)
    print(report(r))


if __name__ == "__main__":
    main()
