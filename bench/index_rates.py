"""Series-index rows/s on PostgreSQL and MariaDB, each against that server's own plain bulk load.

One run, both servers, same synthetic rows (distinct series, ``DicomStateMeta`` as the
series stage emits them), same batches of 500:

* **PostgreSQL** (embedded 16 from the pgserver wheel, default durability):
  ``PostgresSink.write`` (COPY into a staging table + one guarded ``INSERT … ON CONFLICT``)
  against ``copy_records_to_table`` of the same batches into an identical empty table.
* **MariaDB** (Debian's mariadbd 10.11 from a temporary data directory, default durability:
  ``innodb_flush_log_at_trx_commit=1``): ``MySQLIndex.write`` (multi-row guarded
  ``INSERT … ON DUPLICATE KEY UPDATE``) against ``LOAD DATA INFILE`` of the same batches (a
  TSV file per batch, written inside the timing) and against a plain multi-row ``INSERT``
  into an identical empty table. ``LOAD DATA LOCAL INFILE`` is what a remote client would
  use; asyncmy 0.2.18 fails on it (a TypeError on the file name), so the server reads the
  file itself: the same parser, without the network copy, so a baseline at least as fast.

Each round writes every row once into empty tables (inserts), then the index alone writes
them all again with a newer version (updates through the guard; no baseline: a bulk load
does not update). Alternating order, median of ``--repeat`` rounds.

    python -m bench.index_rates [--rows 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

import asyncmy
import asyncpg

from bench.common import Figure, figures_table, table, write_result
from bench.dataset import CT_SMALL
from dicom.extract import Extracted, extract
from dicomflow.embedded.postgres import EmbeddedPostgres
from schemas.records import DicomStateMeta
from sinks.base import SinkBatch, SinkItem
from sinks.mysql import MySQLIndex, connect_args
from sinks.postgres import COLUMNS, PostgresSink
from tests.fixtures_mysql import MariaDB

BATCH = 500
TENANT = "bench"
TOPIC = "dicom_state_queue"
PLAIN = "bench_plain_load"


@dataclass
class ServerRates:
    server: str
    rows: int
    index_s: list[float] = field(default_factory=list)
    update_s: list[float] = field(default_factory=list)
    baselines: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, seconds: list[float]) -> float:
        return self.rows / statistics.median(seconds)


def _synthetic(rows: int) -> list[DicomStateMeta]:
    base = extract(CT_SMALL, TENANT)
    assert isinstance(base, Extracted), base
    now = datetime.now().replace(microsecond=0)
    return [dataclasses.replace(base.state, series_uid=f"1.2.826.0.1.3680043.8.498.9.{i}", series_number=i % 1000,
                                series_related_instances=100, created_time=now, updated_time=now, version=1)
            for i in range(rows)]


def _batches(records: list[DicomStateMeta]) -> list[SinkBatch[DicomStateMeta]]:
    return [SinkBatch(TOPIC, 0, [SinkItem(value=r, key=r.key, topic=TOPIC, partition=0, offset=start + i)
                                 for i, r in enumerate(records[start:start + BATCH])])
            for start in range(0, len(records), BATCH)]


async def _timed(call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def _write_all(sink: PostgresSink | MySQLIndex, batches: list[SinkBatch[DicomStateMeta]]) -> None:
    for batch in batches:
        rejected = await sink.write(batch)
        if rejected:
            raise AssertionError(f"{sink.name} rejected {len(rejected)} rows: {rejected[0].error}")


def _newer(batches: list[SinkBatch[DicomStateMeta]]) -> list[SinkBatch[DicomStateMeta]]:
    out = []
    for b in batches:
        items = [dataclasses.replace(i, value=dataclasses.replace(i.value, version=2, series_related_instances=101))
                 for i in b.items]
        out.append(SinkBatch(b.topic, b.partition, items))
    return out


# -- PostgreSQL --------------------------------------------------------------------------


async def _postgres(dsn: str, batches: list[SinkBatch[DicomStateMeta]], rows: int, repeat: int) -> ServerRates:
    result = ServerRates("PostgreSQL 16", rows, baselines={"COPY": []})
    sink = PostgresSink(dsn)
    await sink.start()
    conn = await asyncpg.connect(dsn)
    newer = _newer(batches)

    async def copy() -> None:
        for batch in batches:
            records = [tuple(getattr(item.value, c) for c in COLUMNS) for item in batch.items]
            await conn.copy_records_to_table(PLAIN, records=records, columns=list(COLUMNS))

    try:
        await conn.execute(f"CREATE TABLE {PLAIN} (LIKE dicom_state_meta INCLUDING ALL)")
        for rnd in range(repeat):
            await conn.execute(f"TRUNCATE dicom_state_meta, {PLAIN}")
            if rnd % 2 == 0:
                result.index_s.append(await _timed(lambda: _write_all(sink, batches)))
                result.baselines["COPY"].append(await _timed(copy))
            else:
                result.baselines["COPY"].append(await _timed(copy))
                result.index_s.append(await _timed(lambda: _write_all(sink, batches)))
            result.update_s.append(await _timed(lambda: _write_all(sink, newer)))
            counts = [await conn.fetchval(f"SELECT count(*) FROM {t}") for t in ("dicom_state_meta", PLAIN)]  # noqa: S608
            updated = await conn.fetchval("SELECT count(*) FROM dicom_state_meta WHERE version = 2")
            if counts != [rows, rows] or updated != rows:
                raise AssertionError(f"PostgreSQL round {rnd}: counts {counts}, updated {updated}, expected {rows}")
    finally:
        await conn.close()
        await sink.stop()
    return result


# -- MariaDB -----------------------------------------------------------------------------


def _tsv_field(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date | dtime):
        return value.isoformat()
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


async def _mariadb(server: MariaDB, batches: list[SinkBatch[DicomStateMeta]], rows: int, repeat: int,
                   tmp: Path) -> ServerRates:
    result = ServerRates("MariaDB 10.11", rows, baselines={"LOAD DATA INFILE": [], "multi-row INSERT": []})
    dsn = server.dsn
    index = MySQLIndex(dsn)
    await index.start()
    conn = await asyncmy.connect(**connect_args(dsn), autocommit=True)
    newer = _newer(batches)
    cols = ", ".join(COLUMNS)
    row_sql = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
    tmp.chmod(0o755)  # mariadbd reads the files (it runs as root here, but say so)

    async def load_data() -> None:
        async with conn.cursor() as cur:
            for n, batch in enumerate(batches):
                path = tmp / f"batch-{n}.tsv"
                path.write_text("".join("\t".join(_tsv_field(getattr(i.value, c)) for c in COLUMNS) + "\n"
                                        for i in batch.items))
                await cur.execute(f"LOAD DATA INFILE '{path}' INTO TABLE {PLAIN} ({cols})")

    async def multi_insert() -> None:
        async with conn.cursor() as cur:
            for batch in batches:
                sql = f"INSERT INTO {PLAIN} ({cols}) VALUES " + ", ".join([row_sql] * len(batch.items))  # noqa: S608
                await cur.execute(sql, [getattr(i.value, c) for i in batch.items for c in COLUMNS])

    async def count(sql: str) -> int:
        async with conn.cursor() as cur:
            await cur.execute(sql)
            return int((await cur.fetchone())[0])

    try:
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE TABLE IF NOT EXISTS {PLAIN} LIKE dicom_state_meta")
        for rnd in range(repeat):
            for name, load in (("LOAD DATA INFILE", load_data), ("multi-row INSERT", multi_insert)):
                async with conn.cursor() as cur:
                    await cur.execute(f"TRUNCATE TABLE {PLAIN}")
                    await cur.execute("TRUNCATE TABLE dicom_state_meta")
                if rnd % 2 == 0:
                    index_s = await _timed(lambda: _write_all(index, batches))
                    result.baselines[name].append(await _timed(load))
                else:
                    result.baselines[name].append(await _timed(load))
                    index_s = await _timed(lambda: _write_all(index, batches))
                result.index_s.append(index_s)  # two insert passes per round, one beside each baseline
                if name == "LOAD DATA INFILE":
                    result.update_s.append(await _timed(lambda: _write_all(index, newer)))
                    updated = await count("SELECT count(*) FROM dicom_state_meta WHERE version = 2")
                    if updated != rows:
                        raise AssertionError(f"MariaDB round {rnd}: {updated} rows updated, expected {rows}")
                counts = [await count(f"SELECT count(*) FROM {t}") for t in ("dicom_state_meta", PLAIN)]  # noqa: S608
                if counts != [rows, rows]:
                    raise AssertionError(f"MariaDB round {rnd} ({name}): counts {counts}, expected {rows}")
    finally:
        conn.close()
        await index.stop()
    return result


# -- run and report ----------------------------------------------------------------------


@dataclass
class IndexRatesResult:
    params: dict[str, Any]
    servers: list[ServerRates]
    figures: list[Figure]
    path: Path | None = None


def run_index_rates(*, rows: int = 20_000, repeat: int = 3, workdir: Path | None = None) -> IndexRatesResult:
    own = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="dicomflow-bench-index-"))
    records = _synthetic(rows)
    batches = _batches(records)
    pg = EmbeddedPostgres(work / "pg")
    maria = MariaDB(work / "mariadb", durable=True)
    try:
        print("index_rates: starting embedded PostgreSQL and MariaDB ...", flush=True)
        pg.start()
        maria.start()
        print(f"index_rates: PostgreSQL, {rows} rows x {repeat} rounds ...", flush=True)
        pg_rates = asyncio.run(_postgres(pg.dsn, batches, rows, repeat))
        print(f"index_rates: MariaDB, {rows} rows x {repeat} rounds ...", flush=True)
        load_dir = work / "load"
        load_dir.mkdir()
        my_rates = asyncio.run(_mariadb(maria, batches, rows, repeat, load_dir))
    finally:
        pg.stop()
        maria.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    params = {"rows": rows, "batch": BATCH, "repeat": repeat, "cores": os.cpu_count(),
              "postgres": "embedded 16 (pgserver wheel), default durability",
              "mariadb": "Debian mariadbd 10.11, temp datadir, innodb_flush_log_at_trx_commit=1"}
    figures = [
        Figure("PostgreSQL index (PostgresSink) inserts", pg_rates.rate(pg_rates.index_s), "rows/s",
               pg_rates.rate(pg_rates.baselines["COPY"]), "COPY rows/s"),
        Figure("PostgreSQL index updates (newer version)", pg_rates.rate(pg_rates.update_s), "rows/s",
               pg_rates.rate(pg_rates.baselines["COPY"]), "COPY rows/s"),
        Figure("MariaDB index (MySQLIndex) inserts", my_rates.rate(my_rates.index_s), "rows/s",
               my_rates.rate(my_rates.baselines["LOAD DATA INFILE"]), "LOAD DATA INFILE rows/s"),
        Figure("MariaDB index (MySQLIndex) inserts", my_rates.rate(my_rates.index_s), "rows/s",
               my_rates.rate(my_rates.baselines["multi-row INSERT"]), "plain multi-row INSERT rows/s"),
        Figure("MariaDB index updates (newer version)", my_rates.rate(my_rates.update_s), "rows/s",
               my_rates.rate(my_rates.baselines["LOAD DATA INFILE"]), "LOAD DATA INFILE rows/s"),
    ]
    result = IndexRatesResult(params, [pg_rates, my_rates], figures)
    result.path = write_result("index_rates", {"params": params,
                                               "servers": [dataclasses.asdict(s) for s in result.servers],
                                               "figures": [f.as_dict() for f in figures]})
    return result


def report(r: IndexRatesResult) -> str:
    rows = []
    for s in r.servers:
        rows.append([s.server, "series index inserts", statistics.median(s.index_s),
                     " ".join(f"{x:.2f}" for x in s.index_s)])
        rows.append([s.server, "series index updates", statistics.median(s.update_s),
                     " ".join(f"{x:.2f}" for x in s.update_s)])
        for name, seconds in s.baselines.items():
            rows.append([s.server, name, statistics.median(seconds), " ".join(f"{x:.2f}" for x in seconds)])
    return "\n".join([
        f"index_rates: {r.params['rows']:,} rows, batches of {r.params['batch']}, {r.params['repeat']} rounds",
        table(["server", "writer", "median s", "rounds (s)"], rows),
        "",
        figures_table(r.figures),
        f"\nresults: {r.path}" if r.path else "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    print(report(run_index_rates(rows=args.rows, repeat=args.repeat, workdir=args.workdir)))


if __name__ == "__main__":
    main()
