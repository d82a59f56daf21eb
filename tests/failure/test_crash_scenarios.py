"""The guarantees under failure: SIGKILLs, PostgreSQL down, a worker lost from a pair.

Each scenario ends with PostgreSQL and the Doris emulator exactly as the dataset
demands, and no trace id twice in dicom_object_meta.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dicomflow.embedded.broker import EmbeddedBroker
from dicomflow.embedded.postgres import EmbeddedPostgres
from tests.doris_emulator import DorisEmulator
from tests.failure.scenario import (
    assert_final,
    backfill,
    explain_missing,
    make_dataset,
    pg_series,
    progress,
    stack_env,
    wait_for,
)
from tests.harness import WorkerProcess, fresh_web_port

pytestmark = pytest.mark.integration



@pytest.mark.timeout(900)
async def test_three_sigkills_during_5k_backfill(fresh_broker: EmbeddedBroker, tmp_path: Path, ct_small: Path,
                                                 pg_dsn: str, doris_emulator: DorisEmulator) -> None:
    home = tmp_path / "home"
    expected = make_dataset(ct_small, home / "storage", series=50, instances=100, tenant="t-k3")
    env = stack_env(fresh_broker, home, pg_dsn, doris_emulator)
    backfill(env, home / "storage", "t-k3")
    total = len(expected.traces)
    for i, fraction in enumerate((0.15, 0.45, 0.75)):
        worker = WorkerProcess(fresh_web_port(env), home / f"w{i}.log").start()

        async def reached(f: float = fraction) -> bool:
            return progress(doris_emulator) >= f * total

        try:
            await wait_for(reached, 240, lambda w=worker: w.log_tail())
        finally:
            worker.kill()
        assert progress(doris_emulator) < total, "killed after the end: the scenario proves nothing"
    worker = WorkerProcess(fresh_web_port(env), home / "w3.log").start()
    try:
        await assert_final(expected, pg_dsn, doris_emulator, 300, worker.log_tail)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await explain_missing(fresh_broker, doris_emulator, expected)}") from None
    finally:
        worker.stop()


async def test_postgres_down_30s_mid_stream(fresh_broker: EmbeddedBroker, tmp_path: Path, ct_small: Path,
                                            pg_dsn: str, pg_server: EmbeddedPostgres,
                                            doris_emulator: DorisEmulator) -> None:
    home = tmp_path / "home"
    expected = make_dataset(ct_small, home / "storage", series=10, instances=50, tenant="t-pg")
    env = stack_env(fresh_broker, home, pg_dsn, doris_emulator)
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        backfill(env, home / "storage", "t-pg")

        async def some_rows() -> bool:
            return bool(await pg_series(pg_dsn))

        await wait_for(some_rows, 120, worker.log_tail)
        pg_server.stop()
        await asyncio.sleep(30)
        assert worker.proc is not None and worker.proc.poll() is None, "worker died while PostgreSQL was down"
        pg_server.start()
        await assert_final(expected, pg_dsn, doris_emulator, 180, worker.log_tail)
    finally:
        worker.stop()


async def test_two_workers_one_killed_mid_stream(fresh_broker: EmbeddedBroker, tmp_path: Path, ct_small: Path,
                                                 pg_dsn: str, doris_emulator: DorisEmulator) -> None:
    home = tmp_path / "home"
    expected = make_dataset(ct_small, home / "storage", series=20, instances=50, tenant="t-two")
    env = stack_env(fresh_broker, home, pg_dsn, doris_emulator)
    backfill(env, home / "storage", "t-two")
    a = WorkerProcess(fresh_web_port(env, DICOMFLOW_WORKER_ID="worker-a"), home / "a.log").start()
    b = WorkerProcess(fresh_web_port(env, DICOMFLOW_WORKER_ID="worker-b"), home / "b.log").start()
    try:
        async def a_third() -> bool:
            return progress(doris_emulator) >= len(expected.traces) // 3

        await wait_for(a_third, 240, a.log_tail)
        a.kill()
        assert progress(doris_emulator) < len(expected.traces), "killed after the end: proves nothing"
        await assert_final(expected, pg_dsn, doris_emulator, 300, b.log_tail)
    finally:
        a.stop()
        b.stop()
