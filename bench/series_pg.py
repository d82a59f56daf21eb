"""Series window + PostgreSQL sink: row writes to dicom_state_meta, and the sink's rows/s against COPY.

Two measurements on one embedded PostgreSQL 16, same run:

1. **Row writes.** A fresh Tansu broker and ONE worker with DICOMFLOW_POSTGRES_DSN and the
   default 5 s series window; 50 series x 100 instances are backfilled back to back while
   it runs. Once dicom_state_meta holds 50 rows of 100 instances, ``row_writes``
   (n_tup_ins + n_tup_upd) is read until PostgreSQL's asynchronous statistics settle. The
   baselines are one write per instance (5,000) and the distinct (series, window) pairs the
   instances actually spanned, from their broker timestamps (the fewest writes a
   per-window flush can make). ``row_writes`` is read after the output has been quiet for
   1.5 windows and the worker has stopped (PostgreSQL publishes a session's statistics
   when it ends; a live idle session may hold them back for up to 10 s).
2. **Sink rows/s.** ``PostgresSink.write`` on synthetic DicomStateMeta rows (distinct series,
   batches of 500) into an empty dicom_state_meta, against ``copy_records_to_table`` of the
   same rows, same batches, into an identical empty table (``LIKE … INCLUDING ALL``).
   Alternating order, median of ``--repeat`` rounds.

    python -m bench.series_pg [--series 50] [--instances-per-series 100] [--sink-rows 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import Figure, figures_table, poll_until, table, write_result
from bench.dataset import CT_SMALL, build
from bench.kafka import OffsetProbe
from bench.pipeline import Run, backfill, create_database, pipeline_run
from dicom.extract import Extracted, extract
from dicomflow.embedded.postgres import EmbeddedPostgres
from schemas.records import DicomStateMeta
from sinks.base import SinkBatch, SinkItem
from sinks.postgres import COLUMNS, PostgresSink, row_writes
from streams.topology import SERIES_INSTANCES, STATE, STORAGE
from tests.harness import read_all

__all__ = ["SeriesResult", "run_series_pg", "main"]

TENANT = "bench-series"
TARGET_WRITES = 150  # for 50 series x 100 instances
SINK_BATCH = 500
COPY_TABLE = "dicom_state_meta_copy"


@dataclass
class SeriesResult:
    params: dict[str, Any]
    writes: dict[str, Any]
    sink: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    path: Path | None = None


async def _series_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT series_uid, series_related_instances FROM dicom_state_meta")
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


async def _settled_writes(dsn: str, timeout: float = 30.0) -> int:
    """row_writes once two reads agree; call after the writers disconnected (their stats are then flushed)."""
    conn = await asyncpg.connect(dsn)
    try:
        last = -1
        deadline = time.monotonic() + timeout
        while True:
            value = await row_writes(conn)
            if value == last:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"row_writes did not settle (last {value})")
            last = value
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def _quiet(run: Run, quiet_s: float, timeout: float = 120.0) -> None:
    """Wait until dicom_state_queue gets no new message for ``quiet_s`` (a late flush would show there)."""
    async with OffsetProbe(run.broker.url) as probe:
        last, since = await probe.count(STATE), time.monotonic()
        deadline = since + timeout
        while time.monotonic() - since < quiet_s:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{STATE} kept growing for {timeout:.0f}s")
            await asyncio.sleep(0.25)
            count = await probe.count(STATE)
            if count != last:
                last, since = count, time.monotonic()


async def _windows_spanned(run: Run, window_s: float) -> int:
    # With a series index, ingest hands instances to the windows in-process, timed by their
    # storage events; without one, they travel on the internal topic.
    spans = {(m.key, (m.timestamp_ms / 1000.0) // window_s)
             for topic in (STORAGE, SERIES_INSTANCES)
             for m in await read_all(run.broker.url, topic) if "flush" not in (m.json() or {})
             and (topic == SERIES_INSTANCES or m.key)}
    return len(spans)


async def _measure_writes(run: Run, dsn: str, series: int, per_series: int, window_s: float) -> dict[str, Any]:
    n = series * per_series
    worker = run.worker(DICOMFLOW_POSTGRES_DSN=dsn, DICOMFLOW_SERIES_WINDOW_SECONDS=str(window_s)).start()
    try:
        started = time.monotonic()
        published, backfill_s = await asyncio.to_thread(backfill, run, run.storage_root, TENANT)
        if published != n:
            raise RuntimeError(f"backfill published {published}, expected {n}")

        def complete(rows: list[asyncpg.Record]) -> bool:
            return sum(1 for r in rows if r["series_related_instances"] == per_series) == series

        rows, done = await poll_until(lambda: _series_rows(dsn), complete, timeout=180 + n / 20, interval=0.5,
                                      what=f"{series} rows of {per_series} instances")
        # Nothing more to come: no state message for a window and a half. Then stop the
        # worker: its sink sessions' exit flushes their statistics, so row_writes is exact.
        await _quiet(run, 1.5 * window_s + 1)
        await asyncio.to_thread(worker.stop)
        writes = await _settled_writes(dsn)
        rows = await _series_rows(dsn)
        windows = await _windows_spanned(run, window_s)
        flushes = len(await read_all(run.broker.url, STATE))
    except BaseException:
        print(f"--- worker log tail ({run.home / 'worker.log'}):\n{worker.log_tail(40)}")
        raise
    finally:
        await asyncio.to_thread(worker.stop)
    if len(rows) != series:
        raise AssertionError(f"dicom_state_meta has {len(rows)} rows, expected {series}")
    return {"instances": n, "series": series, "window_s": window_s, "row_writes": writes,
            "one_write_per_instance": n, "windows_spanned": windows, "state_messages": flushes,
            "backfill_s": backfill_s, "backfill_start_to_all_rows_s": done - started}


def _synthetic(rows: int) -> list[DicomStateMeta]:
    base = extract(CT_SMALL, TENANT)
    assert isinstance(base, Extracted), base
    now = datetime.now()
    return [dataclasses.replace(base.state, series_uid=f"1.2.826.0.1.3680043.8.498.9.{i}",
                                series_related_instances=100, created_time=now, updated_time=now)
            for i in range(rows)]


def _batches(records: list[DicomStateMeta]) -> list[SinkBatch[DicomStateMeta]]:
    batches = []
    for start in range(0, len(records), SINK_BATCH):
        items = [SinkItem(value=r, key=r.key, topic=STATE, partition=0, offset=start + i)
                 for i, r in enumerate(records[start:start + SINK_BATCH])]
        batches.append(SinkBatch(STATE, 0, items))
    return batches


async def _time_sink(sink: PostgresSink, batches: list[SinkBatch[DicomStateMeta]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        rejected = await sink.write(batch)
        if rejected:
            raise AssertionError(f"sink rejected {len(rejected)} rows: {rejected[0].error}")
    return time.perf_counter() - started


async def _time_copy(conn: asyncpg.Connection, batches: list[SinkBatch[DicomStateMeta]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        records = [tuple(getattr(item.value, c) for c in COLUMNS) for item in batch.items]
        await conn.copy_records_to_table(COPY_TABLE, records=records, columns=list(COLUMNS))
    return time.perf_counter() - started


async def _measure_sink(dsn: str, rows: int, repeat: int) -> dict[str, Any]:
    records = _synthetic(rows)
    batches = _batches(records)
    sink = PostgresSink(dsn)
    await sink.start()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TABLE {COPY_TABLE} (LIKE dicom_state_meta INCLUDING ALL)")
        sink_s: list[float] = []
        copy_s: list[float] = []
        for rnd in range(repeat):
            await conn.execute(f"TRUNCATE dicom_state_meta, {COPY_TABLE}")
            if rnd % 2 == 0:
                sink_s.append(await _time_sink(sink, batches))
                copy_s.append(await _time_copy(conn, batches))
            else:
                copy_s.append(await _time_copy(conn, batches))
                sink_s.append(await _time_sink(sink, batches))
            counts = [await conn.fetchval(f"SELECT count(*) FROM {t}") for t in ("dicom_state_meta", COPY_TABLE)]
            if counts != [rows, rows]:
                raise AssertionError(f"row counts after round {rnd}: {counts}, expected {rows} each")
    finally:
        await conn.close()
        await sink.stop()
    return {"rows": rows, "batch": SINK_BATCH, "repeat": repeat, "sink_s": sink_s, "copy_s": copy_s,
            "sink_rows_per_s": rows / statistics.median(sink_s), "copy_rows_per_s": rows / statistics.median(copy_s)}


def run_series_pg(*, series: int = 50, per_series: int = 100, sink_rows: int = 20_000, repeat: int = 3,
                  window_s: float = 5.0, workdir: Path | None = None) -> SeriesResult:
    own = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="dicomflow-bench-series-"))
    pg = EmbeddedPostgres(work / "pg")
    try:
        print("series_pg: starting embedded PostgreSQL ...", flush=True)
        pg.start()
        storage = work / "storage"
        print(f"series_pg: building {series} x {per_series} instances ...", flush=True)
        build(storage / "series", instances=series * per_series, series=series)
        print("series_pg: pipeline run (one worker, PostgreSQL sink) ...", flush=True)
        with pipeline_run(work, storage, "run-series") as run:
            dsn = asyncio.run(create_database(pg, "bench_pipeline"))
            writes = asyncio.run(_measure_writes(run, dsn, series, per_series, window_s))
        print(f"series_pg: sink vs COPY, {sink_rows} rows x {repeat} rounds ...", flush=True)
        sink = asyncio.run(_measure_sink(asyncio.run(create_database(pg, "bench_sink")), sink_rows, repeat))
    finally:
        pg.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    params = {"series": series, "instances_per_series": per_series, "window_s": window_s, "workers": 1,
              "partitions": 4, "sink_rows": sink_rows, "sink_batch": SINK_BATCH, "repeat": repeat,
              "postgres": "embedded 16 (pgserver wheel), default durability settings"}
    result = SeriesResult(params, writes, sink, _figures(writes, sink))
    result.path = write_result("series_pg", {"params": params, "writes": writes, "sink": sink,
                                             "figures": [f.as_dict() for f in result.figures]})
    return result


def _figures(writes: dict[str, Any], sink: dict[str, Any]) -> list[Figure]:
    # The 150 for 50 series, i.e. 3 per series, for other sizes.
    target = TARGET_WRITES * writes["series"] / 50
    return [
        Figure("dicom_state_meta row writes", writes["row_writes"], "rows", writes["one_write_per_instance"],
               "one per instance", f"<= {target:.0f}", writes["row_writes"] <= target),
        Figure("row writes vs windows spanned", writes["row_writes"], "rows", writes["windows_spanned"],
               "(series, window) pairs"),
        Figure("PostgresSink.write rows/s", sink["sink_rows_per_s"], "rows/s", sink["copy_rows_per_s"],
               "plain COPY rows/s"),
    ]


def report(r: SeriesResult) -> str:
    w, s = r.writes, r.sink
    return "\n".join([
        f"series_pg: {w['series']} series x {w['instances'] // w['series']} instances, window {w['window_s']} s, "
        "1 worker",
        table(["pipeline", "value"], [
            ["row writes (n_tup_ins + n_tup_upd)", w["row_writes"]],
            ["dicom_state_queue messages", w["state_messages"]],
            ["(series, window) pairs spanned", w["windows_spanned"]], ["backfill s", w["backfill_s"]],
            ["backfill start -> all rows final s", w["backfill_start_to_all_rows_s"]],
        ]),
        "",
        table(["sink vs COPY", "median s", f"rounds (s) for {s['rows']:,} rows, batches of {s['batch']}"], [
            ["PostgresSink.write", statistics.median(s["sink_s"]), " ".join(f"{x:.2f}" for x in s["sink_s"])],
            ["copy_records_to_table", statistics.median(s["copy_s"]), " ".join(f"{x:.2f}" for x in s["copy_s"])],
        ]),
        "",
        figures_table(r.figures),
        f"\nresults: {r.path}" if r.path else "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=50)
    parser.add_argument("--instances-per-series", type=int, default=100)
    parser.add_argument("--sink-rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--window", type=float, default=5.0, help="DICOMFLOW_SERIES_WINDOW_SECONDS")
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    r = run_series_pg(series=args.series, per_series=args.instances_per_series, sink_rows=args.sink_rows,
                      repeat=args.repeat, window_s=args.window, workdir=args.workdir)
    print(report(r))


if __name__ == "__main__":
    main()
