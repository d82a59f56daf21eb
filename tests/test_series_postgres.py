"""Series window + series-index sink on real Tansu and a real index server, with real worker processes.

The outage test runs with PostgreSQL and with MariaDB as the index
(DICOMFLOW_INDEX_DSN=mysql://…, facts in MariaDB too): counts must stay exact on both.
The index server is down for 30 s (issue #17; ``DICOMFLOW_TEST_INDEX_OUTAGE_S`` changes it),
three times the worker's retry backoff cap.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncmy
import asyncpg
import pytest

from dicomflow.embedded.broker import EmbeddedBroker
from dicomflow.embedded.postgres import EmbeddedPostgres
from sinks.postgres import get_json_metaes, row_writes
from streams.topology import SERIES_INSTANCES, STORAGE
from tests.fixtures_mysql import MariaDB, state_rows
from tests.harness import REPO, WorkerProcess, clone_series, fresh_web_port, read_all, worker_env

pytestmark = pytest.mark.integration

WINDOW_S = 1.0
OUTAGE_S = float(os.environ.get("DICOMFLOW_TEST_INDEX_OUTAGE_S") or 30)




def _env(broker: EmbeddedBroker, home: Path, dsn: str) -> dict[str, str]:
    index = {"DICOMFLOW_INDEX_DSN": dsn} if dsn.startswith("mysql://") else {"DICOMFLOW_POSTGRES_DSN": dsn}
    return worker_env(broker.url, home, DICOMFLOW_SERIES_WINDOW_SECONDS=str(WINDOW_S), **index)


def _backfill(env: dict[str, str], directory: Path, tenant: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(directory), "--tenant", tenant,
                           "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def _rows(dsn: str) -> list[dict[str, Any]]:
    """dicom_state_meta of either server, by series UID."""
    rows = await state_rows(dsn)
    return [rows[k] for k in sorted(rows)]


async def _wait_rows(dsn: str, want: dict[str, int], timeout: float = 120.0) -> list[dict[str, Any]]:
    """Poll until every series has exactly its wanted instance count (and no other rows exist)."""
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            rows = await _rows(dsn)
        except (OSError, asyncpg.PostgresError, asyncmy.errors.Error):
            rows = []
        if {r["series_uid"]: r["series_related_instances"] for r in rows} == want:
            return rows
        await asyncio.sleep(0.3)
    got = {r["series_uid"]: r["series_related_instances"] for r in rows}
    raise AssertionError(f"rows never matched: want {want}, got {got}")


def _expected(files: list[Path]) -> dict[str, int]:
    import pydicom

    counts: dict[str, set[str]] = defaultdict(set)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        counts[str(ds.SeriesInstanceUID)].add(str(ds.SOPInstanceUID))
    return {k: len(v) for k, v in counts.items()}


async def _windows_spanned(broker: EmbeddedBroker) -> int:
    """Distinct (series, window) pairs among the instances, from their storage events' broker
    timestamps (with an index, ingest hands the instances to the windows in-process)."""
    spans: set[tuple[bytes | None, float]] = set()
    for m in await read_all(broker.url, STORAGE):
        spans.add((m.key, (m.timestamp_ms / 1000.0) // WINDOW_S))
    return len(spans)


async def _writes_within_windows(dsn: str, broker: EmbeddedBroker, want: dict[str, int]) -> int:
    """One write per series per window: PostgreSQL's own counters against the windows the
    instances actually spanned (from their broker timestamps). Statistics of another session are
    published when it ends, so stop the worker first. The number of writes."""
    async with _connect(dsn) as conn:
        writes = await row_writes(conn)
    windows = await _windows_spanned(broker)
    assert writes >= len(want), "statistics not visible: the check below would prove nothing"
    assert writes <= windows, f"{writes} row writes for {windows} series-windows"
    return writes


async def _stable(dsn: str, want: dict[str, int], quiet: float) -> list[dict[str, Any]]:
    """Rows match now and still match after `quiet` seconds (no late double count)."""
    await _wait_rows(dsn, want)
    await asyncio.sleep(quiet)
    return await _wait_rows(dsn, want, timeout=5)


async def test_burst_one_row_per_series_and_bounded_writes(fresh_broker: EmbeddedBroker, home: Path, pg_dsn: str,
                                                          ct_small: Path) -> None:
    files = clone_series(ct_small, home / "storage" / "burst", series=4, instances=25)
    env = _env(fresh_broker, home, pg_dsn)
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        _backfill(env, home / "storage" / "burst", "t-burst")
        want = _expected(files)
        rows = await _stable(pg_dsn, want, quiet=3 * WINDOW_S)
        for r in rows:
            assert r["tenant_id"] == "t-burst" and r["patient_id"] == "1CT1" and r["modality"] == "CT"
            assert r["study_date"].isoformat() == "2004-01-19" and r["accession_number"].startswith("X32CRC")
            assert r["created_time"] <= r["updated_time"]
        # One write per series per window: PostgreSQL's own counters against the windows
        # the instances actually spanned (from their broker timestamps). Statistics of
        # another session are published when it ends, so stop the worker first.
        worker.stop()
        writes = await _writes_within_windows(pg_dsn, fresh_broker, want)
        assert writes < len(files), "debounce did not debounce"
        # With the facts in the index, the window is not kept in the broker (issue #15): no
        # changelog record per instance.
        topics = await _topics(fresh_broker)
        assert not [t for t in topics if "changelog" in t], topics
        # ... and ingest hands the instances to the windows in-process: the internal topic stays empty.
        assert not await read_all(fresh_broker.url, SERIES_INSTANCES)

        worker = WorkerProcess(fresh_web_port(env),
                               home / "worker2.log").start()
        # A redelivered instance is not counted twice: backfill the same files again.
        _backfill(env, home / "storage" / "burst", "t-burst")
        await _stable(pg_dsn, want, quiet=3 * WINDOW_S)
        async with _connect(pg_dsn) as conn:
            metaes = await get_json_metaes(conn, _far_future())
        assert {m.series_uid for m in metaes} <= set(want) and len(metaes) == min(10, len(want))
    finally:
        worker.stop()


async def test_a_backlog_is_written_once_per_series_window(fresh_broker: EmbeddedBroker, home: Path, pg_dsn: str,
                                                          ct_small: Path) -> None:
    """A worker that starts behind (the instances were published before it ran) finds every
    window's time already over: it still writes each series once per window it spanned, not
    once per timer tick while it catches up (the CI failure of 2026-12-03: 6 writes for 4)."""
    files = clone_series(ct_small, home / "storage" / "backlog", series=4, instances=150)
    env = _env(fresh_broker, home, pg_dsn)
    _backfill(env, home / "storage" / "backlog", "t-backlog")
    # Past the window's end by wall clock before the worker reads a single event.
    await asyncio.sleep(2 * WINDOW_S)
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        want = _expected(files)
        await _stable(pg_dsn, want, quiet=3 * WINDOW_S)
    finally:
        worker.stop()
    await _writes_within_windows(pg_dsn, fresh_broker, want)


async def _topics(broker: EmbeddedBroker) -> set[str]:
    from streams.broker import bootstrap_of, new_admin

    admin = new_admin(bootstrap_of(broker.url), 10.0)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


class _connect:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn = await asyncpg.connect(self.dsn)
        return self.conn

    async def __aexit__(self, *exc: Any) -> None:
        await self.conn.close()


def _far_future() -> Any:
    from datetime import datetime

    return datetime(2999, 1, 1)


async def test_sigkill_mid_burst_same_rows(fresh_broker: EmbeddedBroker, home: Path, pg_dsn: str,
                                           ct_small: Path) -> None:
    # PostgreSQL only (CI time): exact counts with the facts in MariaDB are shown by the outage
    # test below, where the worker replays what it could not write.
    files = clone_series(ct_small, home / "storage" / "kill", series=5, instances=60)
    env = _env(fresh_broker, home, pg_dsn)
    _backfill(env, home / "storage" / "kill", "t-kill")
    w1 = WorkerProcess(env, home / "w1.log").start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not await _rows(pg_dsn):
            await asyncio.sleep(0.2)
    finally:
        w1.kill()
    env2 = fresh_web_port(env)
    w2 = WorkerProcess(env2, home / "w2.log").start()
    try:
        await _stable(pg_dsn, _expected(files), quiet=3 * WINDOW_S)
    finally:
        w2.stop()


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
async def test_index_down_mid_stream_same_rows(fresh_broker: EmbeddedBroker, home: Path, kind: str,
                                               request: pytest.FixtureRequest, ct_small: Path) -> None:
    """The index server goes away during a backfill (PostgreSQL stopped; MariaDB SIGKILLed) and
    comes back after OUTAGE_S: every instance is counted exactly once, nothing is lost."""
    pg_dsn: str = request.getfixturevalue("pg_dsn" if kind == "postgres" else "mysql_dsn")
    pg_server: EmbeddedPostgres | MariaDB = request.getfixturevalue(
        "pg_server" if kind == "postgres" else "mysql_server")
    files = clone_series(ct_small, home / "storage" / "down", series=3, instances=40)
    env = _env(fresh_broker, home, pg_dsn)
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        _backfill(env, home / "storage" / "down", "t-down")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not await _rows(pg_dsn):
            await asyncio.sleep(0.1)
        pg_server.kill() if isinstance(pg_server, MariaDB) else pg_server.stop()
        down_until = time.monotonic() + OUTAGE_S
        # more work arrives while PostgreSQL is down
        more = clone_series(ct_small, home / "storage" / "down2", series=2, instances=10)
        _backfill(env, home / "storage" / "down2", "t-down")
        await asyncio.sleep(max(0.0, down_until - time.monotonic()))
        assert worker.proc is not None and worker.proc.poll() is None, "worker died while the index was down"
        pg_server.start()
        await _stable(pg_dsn, _expected(files + more), quiet=3 * WINDOW_S)
    finally:
        worker.stop()
    # The outage was felt, and waited out: the index sink or the facts retried.
    log = (home / "worker.log").read_text(errors="replace")
    assert f"sink={kind} " in log and ("retry_in_s=" in log or "series facts unavailable" in log), worker.log_tail()


async def test_a_worker_with_open_windows_stops_at_once_and_its_successor_flushes_them(
        fresh_broker: EmbeddedBroker, home: Path, pg_dsn: str, ct_small: Path) -> None:
    """Open windows hold their storage events unacked; Faust's stop waits for every event it handed
    out, so the stage gives them back as the worker stops: no hang, and they are read again."""
    files = clone_series(ct_small, home / "storage" / "open", series=2, instances=5)
    env = {**_env(fresh_broker, home, pg_dsn), "DICOMFLOW_SERIES_WINDOW_SECONDS": "120",
           "DICOMFLOW_SERIES_QUIET_SECONDS": "0"}  # the windows stay open: no early close once quiet
    worker = WorkerProcess(env, home / "w1.log").start()
    try:
        _backfill(env, home / "storage" / "open", "t-open")
        log = home / "w1.log"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "ingest batch" not in log.read_text(errors="replace"):
            await asyncio.sleep(0.2)
        assert "ingest batch" in log.read_text(errors="replace"), worker.log_tail(20)
        assert not await _rows(pg_dsn)  # the 120 s windows are open
        assert worker.proc is not None
        started = time.monotonic()
        os.killpg(worker.proc.pid, signal.SIGTERM)
        worker.proc.wait(timeout=20)  # raises if the stop hangs (it waited for the held events)
        assert time.monotonic() - started < 20
    finally:
        worker.stop()
    successor = WorkerProcess(fresh_web_port(env, DICOMFLOW_SERIES_WINDOW_SECONDS=str(WINDOW_S)),
                              home / "w2.log").start()
    try:
        await _stable(pg_dsn, _expected(files), quiet=2 * WINDOW_S)
    finally:
        successor.stop()


async def test_a_series_sent_in_one_go_is_indexed_once_quiet_not_at_its_window_end(
        fresh_broker: EmbeddedBroker, home: Path, pg_dsn: str, ct_small: Path) -> None:
    """Issue #15: the series row waited for its window's end (up to DICOMFLOW_SERIES_WINDOW_SECONDS
    after the last instance). A window whose series has gone quiet, with its source partition read
    to the end, is flushed then: one write per series, seconds before the window would end."""
    files = clone_series(ct_small, home / "storage" / "quiet", series=3, instances=20)
    # Windows are aligned to multiples of their length: pick one whose end is minutes away.
    window = next(w for w in (3600, 5400, 7200) if (time.time() // w + 1) * w - time.time() > 300)
    env = {**_env(fresh_broker, home, pg_dsn), "DICOMFLOW_SERIES_WINDOW_SECONDS": str(window),
           "DICOMFLOW_SERIES_QUIET_SECONDS": "0.5"}
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        _backfill(env, home / "storage" / "quiet", "t-quiet")
        # Seconds, where the windows' end is minutes away.
        await _wait_rows(pg_dsn, _expected(files), timeout=30)
    finally:
        worker.stop()
    async with _connect(pg_dsn) as conn:
        writes = await row_writes(conn)
    assert writes == 3, f"{writes} row writes for 3 series sent in one go"
