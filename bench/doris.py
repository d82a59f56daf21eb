"""Doris sink at saturation: rows per Stream Load and loads per second, default batching settings.

``storage_queue`` is preloaded with N instances (``dicomflow backfill``), then ONE worker is
started with the Doris sink pointed at the in-process Stream Load emulator
(``tests/doris_emulator.py``, FE + BE on loopback, served by this benchmark's own event
loop; its body limit raised from aiohttp's 1 MiB to Doris' 100 MB, see ``BenchEmulator``)
and **default** batching (DICOMFLOW_DORIS_MAX_ROWS/_MAX_BYTES/_MAX_INTERVAL unset:
5000 rows / 16 MiB / 10 s per partition and table). Timed until every row is in all three
tables (dicom_state_meta: one row per series with all its instances).

Each load's completion time is recorded as the emulator logs it. The label carries the
partition and offset range, so the last load of each (table, partition) is known: it is
the drain of the backlog, not a batch closed under load; rows per load are given over all
loads and over the others ("under load") when there are any.

Baselines from the same run: the ingest rate (first to N-th message on dicom_image_queue)
for rows/s into Doris, and "ingest events per partition per flush interval" for rows per
load: the most an interval-closed batch can hold at that ingest rate.

    python -m bench.doris [--instances 5000] [--per-series 100]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsIndex

from aiohttp import web

from bench.clones import build_fast
from bench.common import Figure, figures_table, poll_until, table, write_result
from bench.kafka import OffsetProbe
from bench.pipeline import Run, backfill, pipeline_run
from core.settings import Settings
from streams.topology import IMAGE, STORAGE
from tests.doris_emulator import DorisEmulator, LoadRecord

__all__ = ["DorisResult", "run_doris", "main"]

TENANT = "bench-doris"
USER, PASSWORD, DB = "dicomflow", "bench-pw", "dicomflow"
TABLES = ("dicom_object_meta", "dicom_image_meta", "dicom_state_meta")
TARGET_ROWS_PER_LOAD = 1000
PARTITIONS = 4
DORIS_JSON_MAX_BYTES = 100 * 1024 * 1024


class BenchEmulator(DorisEmulator):
    """The emulator with a BE that accepts a real batch's body.

    ``DorisEmulator.start`` builds its aiohttp apps with the default ``client_max_size`` of
    1 MiB, so a default-sized batch (up to 5000 rows / 16 MiB; a dicom_image_meta row is
    ~1.2 KB, so > ~850 rows) gets HTTP 413 from aiohttp after the label already went
    RUNNING, and stays RUNNING: the sink then retries "label RUNNING" forever. Doris' own
    limit for a JSON body is ``streaming_load_json_max_mb`` = 100 MB; used here.
    """

    async def start(self) -> None:
        fe = web.Application(client_max_size=DORIS_JSON_MAX_BYTES)
        fe.router.add_route("PUT", "/api/{db}/{table}/_stream_load", self._fe_load, expect_handler=self._fe_expect)
        be = web.Application(client_max_size=DORIS_JSON_MAX_BYTES)
        be.router.add_route("PUT", "/api/{db}/{table}/_stream_load", self._be_load, expect_handler=self._be_expect)
        be.router.add_get("/api/_load_error_log", self._be_error_log)
        self.fe_port = await self._serve(fe)
        self.be_port = await self._serve(be)


class TimedLoads(list[LoadRecord]):
    """The emulator's load log, with the monotonic time each entry was appended (the BE's answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: LoadRecord, /) -> None:
        self.times.append(time.monotonic())
        super().append(item)

    def insert(self, index: SupportsIndex, item: LoadRecord, /) -> None:  # never used by the emulator
        raise NotImplementedError


@dataclass(frozen=True)
class Load:
    table: str
    partition: int
    first: int
    last: int
    rows: int
    t: float
    status: str


@dataclass
class DorisResult:
    params: dict[str, Any]
    run: dict[str, Any]
    tables: dict[str, dict[str, Any]]
    figures: list[Figure] = field(default_factory=list)
    path: Path | None = None


def _defaults() -> dict[str, Any]:
    s = Settings.from_env({})
    return {"max_rows": s.doris_max_rows, "max_bytes": s.doris_max_bytes, "max_interval_s": s.doris_max_interval}


def _loads(log: TimedLoads) -> list[Load]:
    out = []
    for rec, t in zip(log, log.times, strict=True):
        # dicomflow:{db}:{table}:{topic}:{partition}:{first}:{last}
        parts = (rec.label or "").split(":")
        partition, first, last = (int(p) for p in parts[-3:]) if len(parts) == 7 else (-1, -1, -1)
        out.append(Load(rec.table, partition, first, last, rec.loaded, t, rec.status))
    return out


def _complete(emu: DorisEmulator, n: int, per_series: list[int]) -> bool:
    if len(emu.rows("dicom_object_meta")) < n or len(emu.rows("dicom_image_meta")) < n:
        return False
    counts = sorted(int(r["series_related_instances"] or 0) for r in emu.rows("dicom_state_meta"))
    return counts == sorted(per_series)


async def _measure(run: Run, n: int, per_series: list[int]) -> tuple[dict[str, Any], list[Load]]:
    published, backfill_s = await asyncio.to_thread(backfill, run, run.storage_root, TENANT)
    if published != n:
        raise RuntimeError(f"backfill published {published} events, expected {n}")
    emu = BenchEmulator(user=USER, password=PASSWORD, databases=(DB,))
    log = TimedLoads()
    emu.loads = log
    await emu.start()
    worker = run.worker(DICOMFLOW_DORIS_FE_URL=emu.fe_url, DICOMFLOW_DORIS_USER=USER,
                        DICOMFLOW_DORIS_PASSWORD=PASSWORD, DICOMFLOW_DORIS_DATABASE=DB)
    try:
        async with OffsetProbe(run.broker.url) as probe:
            if (preloaded := await probe.count(STORAGE)) != n:
                raise RuntimeError(f"storage_queue holds {preloaded} events, expected {n}")
            started = time.monotonic()
            worker.start()
            _, t_first = await poll_until(lambda: probe.count(IMAGE), lambda c: c > 0, timeout=120,
                                          interval=0.05, what="first output")
            _, t_ingested = await poll_until(lambda: probe.count(IMAGE), lambda c: c >= n, timeout=120 + n / 20,
                                             interval=0.05, what=f"{n} messages on {IMAGE}")

        async def complete() -> bool:
            return _complete(emu, n, per_series)

        _, t_done = await poll_until(complete, bool, timeout=120 + n / 50, interval=0.1,
                                     what="every row in the three Doris tables")
    except BaseException:
        print(f"--- worker log tail ({run.home / 'worker.log'}):\n{worker.log_tail(30)}")
        raise
    finally:
        await asyncio.to_thread(worker.stop)
        await emu.stop()
    counts = {t: len(emu.rows(t)) for t in TABLES}
    info = {"instances": n, "series": len(per_series), "backfill_s": backfill_s, "startup_s": t_first - started,
            "t_first": t_first, "ingest_s": t_ingested - t_first, "ingest_rate": n / (t_ingested - t_first),
            "first_output_to_all_rows_s": t_done - t_first, "rows": counts,
            "statuses": dict(Counter(rec.status for rec in log))}
    return info, _loads(log)


def _table_stats(loads: list[Load], t_first: float) -> dict[str, Any]:
    ok = [ld for ld in loads if ld.status == "Success"]
    if not ok:
        return {"loads": 0}
    last_of_partition = {ld.partition: ld for ld in sorted(ok, key=lambda x: x.first)}
    under_load = [ld for ld in ok if last_of_partition[ld.partition] is not ld]
    rows = [ld.rows for ld in ok]
    span = max(ld.t for ld in ok) - t_first
    return {"loads": len(ok), "rows": sum(rows), "rows_per_load_mean": statistics.fmean(rows),
            "rows_per_load_p50": statistics.median(rows), "rows_per_load_max": max(rows),
            "loads_under_load": len(under_load),
            "rows_per_load_under_load_mean": statistics.fmean(ld.rows for ld in under_load) if under_load else None,
            "first_output_to_last_load_s": span, "loads_per_s": len(ok) / span, "rows_per_s": sum(rows) / span,
            "partitions": len(last_of_partition)}


def run_doris(*, instances: int, per_series: int = 100, workdir: Path | None = None) -> DorisResult:
    own = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="dicomflow-bench-doris-"))
    series = max(1, instances // per_series)
    try:
        storage = work / "storage"
        print(f"doris: building {instances} instances in {series} series ...", flush=True)
        ds = build_fast(storage / "doris", instances=instances, series=series)
        per = [sum(1 for f in ds.files if f.parent.name == f"s{s:03d}") for s in range(series)]
        print("doris: one worker, default Doris batching, Stream Load emulator in-process ...", flush=True)
        with pipeline_run(work, storage, "run-doris") as run:
            info, loads = asyncio.run(_measure(run, instances, per))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    defaults = _defaults()
    stats = {t: _table_stats([ld for ld in loads if ld.table == t], info["t_first"]) for t in TABLES}
    ok = [ld for ld in loads if ld.status == "Success"]
    span = max(ld.t for ld in ok) - info["t_first"]
    info.update({"loads": len(ok), "loads_per_s": len(ok) / span, "rows_per_s_all_tables": sum(ld.rows for ld in ok)
                 / span, "interval_bound_rows_per_load": info["ingest_rate"] / PARTITIONS * defaults["max_interval_s"]})
    params = {"instances": instances, "series": series, "per_series": per_series, "workers": 1,
              "partitions": PARTITIONS, "doris_defaults": defaults, "series_window_s": 5.0,
              "doris": "tests/doris_emulator.py in the benchmark's event loop"}
    result = DorisResult(params, info, stats, _figures(info, stats))
    result.path = write_result("doris", {"params": params, "run": info, "tables": stats,
                                         "loads": [ld.__dict__ for ld in loads],
                                         "figures": [f.as_dict() for f in result.figures]})
    return result


def _figures(info: dict[str, Any], stats: dict[str, dict[str, Any]]) -> list[Figure]:
    bound, base = info["interval_bound_rows_per_load"], "ingest ev/partition/interval"
    target = f">= {TARGET_ROWS_PER_LOAD}"
    figures = []
    for t in ("dicom_object_meta", "dicom_image_meta"):
        s = stats[t]
        under = s["rows_per_load_under_load_mean"]
        if under is not None:
            figures.append(Figure(f"Doris rows/load under load {t}", under, "rows", bound, base, target,
                                  under >= TARGET_ROWS_PER_LOAD))
        else:
            figures.append(Figure(f"Doris rows/load under load {t}", s["rows_per_load_mean"], "rows", bound, base,
                                  f"{target} (n/a: drain loads only)"))
        figures.append(Figure(f"Doris rows/load {t} (mean, all)", s["rows_per_load_mean"], "rows", bound, base))
        figures.append(Figure(f"Doris rows/load {t} (p50, all)", s["rows_per_load_p50"], "rows", bound, base))
    figures.append(Figure("Doris rows/load dicom_state_meta (mean)", stats["dicom_state_meta"]["rows_per_load_mean"],
                          "rows"))
    figures.append(Figure("Doris loads/s (all tables)", info["loads_per_s"], "loads/s"))
    figures.append(Figure("Doris rows/s dicom_image_meta", stats["dicom_image_meta"]["rows_per_s"], "rows/s",
                          info["ingest_rate"], "ingest ev/s (same run)"))
    return figures


def report(r: DorisResult) -> str:
    i = r.run
    rows = [[t, s.get("loads"), s.get("rows"), s.get("rows_per_load_mean"), s.get("rows_per_load_p50"),
             s.get("rows_per_load_max"), s.get("rows_per_load_under_load_mean"), s.get("loads_per_s"),
             s.get("rows_per_s")] for t, s in r.tables.items()]
    d = r.params["doris_defaults"]
    return "\n".join([
        f"doris: {i['instances']} instances, {i['series']} series, 1 worker, {PARTITIONS} partitions, defaults "
        f"max_rows={d['max_rows']} max_interval={d['max_interval_s']}s; statuses {i['statuses']}",
        table(["table", "loads", "rows", "rows/load mean", "p50", "max", "mean excl. drain", "loads/s", "rows/s"],
              rows),
        "",
        table(["run", "value"], [
            ["preload (backfill) s", i["backfill_s"]], ["worker start -> first output s", i["startup_s"]],
            ["ingest ev/s (first -> N-th image message)", i["ingest_rate"]],
            ["first output -> all rows in Doris s", i["first_output_to_all_rows_s"]],
            ["interval-bound rows/load (ingest/partitions x interval)", i["interval_bound_rows_per_load"]],
            ["rows/s into Doris, all tables", i["rows_per_s_all_tables"]],
        ]),
        "",
        figures_table(r.figures),
        f"\nresults: {r.path}" if r.path else "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--per-series", type=int, default=100)
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    print(report(run_doris(instances=args.instances, per_series=args.per_series, workdir=args.workdir)))


if __name__ == "__main__":
    main()
