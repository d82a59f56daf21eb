"""No exception leaves an agent body with its batch acked (issue #14, item 1), in real workers.

faust 0.15's ``take_events`` acks the buffered events in a ``finally`` around its ``yield``:
an exception that escapes the body acks (and soon commits) the whole batch, and the
supervisor restarts the agent past it. Each test makes a stage hit such an exception and
then checks the events it was holding still reach their destination.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from dicomflow.embedded.broker import EmbeddedBroker
from streams.broker import bootstrap_of, ensure_topics
from streams.topology import DLQ, LOG, STORAGE
from tests.harness import WorkerProcess, clone_series, read_topic
from tests.test_series_postgres import _backfill, _env, _expected, _rows, _wait_rows

pytestmark = pytest.mark.integration


async def _log_shows(worker: WorkerProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in worker.log_tail(400):
            return
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
        await asyncio.sleep(0.2)
    raise AssertionError(f"the worker never logged {text!r}:\n{worker.log_tail()}")


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_postgres_error_that_is_neither_transient_nor_data_loses_no_series(
        fresh_broker: EmbeddedBroker, home: Path, pg_dsn: str, ct_small: Path) -> None:
    """A renamed table (like a REVOKE or a rotated password) is retried, not acked past."""
    first = clone_series(ct_small, home / "storage" / "a", series=1, instances=3)
    env = _env(fresh_broker, home, pg_dsn)
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        _backfill(env, home / "storage" / "a", "t-a")
        await _wait_rows(pg_dsn, _expected(first), timeout=120)
        await _admin(pg_dsn, "ALTER TABLE dicom_state_meta RENAME TO dicom_state_meta_moved")
        second = clone_series(ct_small, home / "storage" / "b", series=2, instances=3)
        _backfill(env, home / "storage" / "b", "t-a")
        # The sink has met the missing table at least once (and kept retrying since).
        await _log_shows(worker, 'relation "dicom_state_meta" does not exist', timeout=60)
        await _admin(pg_dsn, "ALTER TABLE dicom_state_meta_moved RENAME TO dicom_state_meta")
        await _wait_rows(pg_dsn, _expected(first + second), timeout=60)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
    assert await _rows(pg_dsn)


async def test_dead_letter_of_a_huge_event_is_capped_and_its_batch_lands(
        fresh_broker: EmbeddedBroker, home: Path, ct_small: Path) -> None:
    """A ~750 KB non-JSON event (base64'd, over the producer's request size) is dead-lettered capped."""
    files = clone_series(ct_small, home / "storage" / "h", series=1, instances=2)
    env = _env(fresh_broker, home, "")
    env.pop("DICOMFLOW_POSTGRES_DSN")
    worker = WorkerProcess(env, home / "worker.log").start()
    huge = b"\xff" + os.urandom(750 * 1024)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_of(fresh_broker.url), max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        # The worker creates the topics; wait for them, then put the huge event first in a batch.
        await ensure_topics(fresh_broker.bootstrap, [STORAGE], 4)
        await producer.send_and_wait(STORAGE, huge, partition=0)
        _backfill(env, home / "storage" / "h", "t-h")
        letters = await read_topic(fresh_broker.url, DLQ, until=lambda m: any(
            "original_sha256" in (x.json() or {}) for x in m), timeout=90)
        letter = next(x.json() for x in letters if "original_sha256" in (x.json() or {}))
        assert letter["error"]["code"] == "INVALID_JSON"
        assert letter["original_size"] == len(huge)
        assert letter["original_sha256"] == hashlib.sha256(huge).hexdigest()
        assert letter["original_truncated"] is True
        assert len(orjson.dumps(letter)) < 128 * 1024
        # The valid events of the batch (and after it) still produce their transfer-log rows.
        await read_topic(fresh_broker.url, LOG, until=lambda m: len(m) >= len(files), timeout=90)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        await producer.stop()
        worker.stop()
