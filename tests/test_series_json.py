"""The series JSON stage on real Tansu and real PostgreSQL, with a real worker process.

Files are placed where the C-STORE SCP stores them and fed by ``dicomflow backfill``; the
document, ``dicom_json_meta``, the web views, ``dicomflow metadata`` and ``/metrics`` are
checked as a client sees them. Plus the stage's debounce and its measured load gate, on a real
app and a real broker.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.series_json import SeriesJsonStage
from core.settings import Settings
from dicomflow.embedded.broker import EmbeddedBroker
from dicomflow.status import sink_counters
from schemas.records import DicomStateMeta
from sinks.index import open_index
from sinks.json_documents import document_path
from sinks.postgres import get_json_metaes
from streams.app import create_app
from streams.broker import bootstrap_of, ensure_topics
from streams.topology import ALL_TOPICS, STORAGE
from tests.harness import REPO, WorkerProcess, clone_series, worker_env

pytestmark = pytest.mark.integration

TENANT = "t-json"
QUIET_S = 2.0
T = TypeVar("T")


async def _until(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 90.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = await check()
        except (OSError, asyncpg.PostgresError):
            got = None
        if got:
            return got
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _place(files: list[Path], root: Path) -> tuple[str, str, str]:
    """Copy files where the SCP would have stored them; returns (study date, study, series)."""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        dest = root / TENANT / ds.StudyDate / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    return str(ds.StudyDate), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _backfill(env: dict[str, str], directory: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(directory), "--tenant", TENANT,
                           "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def _meta_and_state(dsn: str, series: str) -> tuple[asyncpg.Record | None, asyncpg.Record | None]:
    conn = await asyncpg.connect(dsn)
    try:
        meta = await conn.fetchrow("SELECT * FROM dicom_json_meta WHERE series_uid = $1", series)
        state = await conn.fetchrow("SELECT * FROM dicom_state_meta WHERE series_uid = $1", series)
        return meta, state
    finally:
        await conn.close()


def _http(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - the test's own worker
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _metric(web: str, name: str, labels: dict[str, str] | None = None) -> float:
    _, _, body = _http(f"{web}/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in /metrics")


async def test_series_json_generated_served_and_regenerated_once(fresh_broker: EmbeddedBroker, home: Path,
                                                                 pg_dsn: str, ct_small: Path, tmp_path: Path) -> None:
    files = clone_series(ct_small, tmp_path / "src", series=1, instances=8)
    storage = home / "storage"
    date, study, series = _place(files[:5], storage)
    env = worker_env(fresh_broker.url, home, DICOMFLOW_POSTGRES_DSN=pg_dsn,
                     DICOMFLOW_JSON_QUIET_SECONDS=str(QUIET_S), DICOMFLOW_JSON_RETRY_SECONDS="0.3",
                     DICOMFLOW_JSON_MAX_RETRIES="1")
    web = f"http://127.0.0.1:{env['DICOMFLOW_WEB_PORT']}"
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        _backfill(env, storage / TENANT)

        async def written() -> tuple[asyncpg.Record, asyncpg.Record] | None:
            meta, state = await _meta_and_state(pg_dsn, series)
            if meta is None or state is None or meta["flag_time"] != state["updated_time"]:
                return None
            return meta, state

        meta, state = await _until(written, "the series JSON and its dicom_json_meta row")
        assert meta["json_status"] == 1 and meta["retry_times"] == 0
        assert meta["study_date_origin"] == date and meta["study_uid_hash"] == state["study_uid_hash"]
        path = document_path(storage, TENANT, date, study, series)
        assert path == storage / TENANT / "metadata" / date / study / f"{series}.json"
        document = json.loads(path.read_bytes())
        assert [o["00200013"]["Value"][0] for o in document] == [1, 2, 3, 4, 5]
        assert all(o["7FE00010"]["vr"] == "OW" and "BulkDataURI" in o["7FE00010"] for o in document)
        async with _connect(pg_dsn) as conn:  # current: not in the seeds' query any more
            assert series not in {s.series_uid for s in await get_json_metaes(conn, datetime.now() + timedelta(1))}

        # Served by the worker, streamed from the file: header or query parameter for the tenant.
        url = f"{web}/studies/{study}/series/{series}/metadata"
        status, headers, body = _http(url, {"X-Tenant-Id": TENANT})
        assert status == 200 and headers["Content-Type"].startswith("application/dicom+json")
        assert body == path.read_bytes()
        assert _http(f"{url}?tenant={TENANT}")[2] == body
        status, headers, body = _http(f"{web}/studies/{study}/series/1.2.3.4/metadata", {"X-Tenant-Id": TENANT})
        assert status == 404 and json.loads(body)["error"]["code"] == "NOT_FOUND"
        assert _http(url, {"X-Tenant-Id": "other"})[0] == 404  # another tenant's series does not exist
        assert _http(url)[0] == 400  # no tenant
        status, _, body = _http(f"{web}/studies/{study}/series?tenant={TENANT}")
        assert status == 200 and [r["series_uid"] for r in json.loads(body)] == [series]
        assert json.loads(body)[0]["series_related_instances"] == 5
        assert _http(f"{web}/studies/9.9.9/series?tenant={TENANT}")[0] == 404

        cli = subprocess.run([sys.executable, "-m", "dicomflow.cli", "metadata", study, series, "--tenant", TENANT],
                             env=env, cwd=REPO, capture_output=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout == path.read_bytes() + b"\n"
        cli = subprocess.run([sys.executable, "-m", "dicomflow.cli", "metadata", study, "1.2.3", "--tenant", TENANT],
                             env=env, cwd=REPO, capture_output=True, timeout=60)
        assert cli.returncode == 1 and json.loads(cli.stderr)["error"]["code"] == "NOT_FOUND"
        assert _metric(web, "dicomflow_json_documents_total", {"result": "ok"}) == 1
        assert _metric(web, "dicomflow_json_bytes_total") == path.stat().st_size
        assert _metric(web, "dicomflow_json_generation_seconds_count") == 1

        # The series grows: it is stale again, then regenerated once, with every instance.
        first_flag = meta["flag_time"]
        _place(files[5:], storage)
        _backfill(env, storage / TENANT)

        async def stale_again() -> bool:
            async with _connect(pg_dsn) as conn:
                return series in {s.series_uid for s in await get_json_metaes(conn, datetime.now() + timedelta(1))}

        await _until(stale_again, "the grown series in get_json_metaes", timeout=60)

        async def status_shows_stale() -> bool:  # what `dicomflow status` prints, scraped from the worker
            return sink_counters([f"{web}/metrics"])["json"]["stale_series"] == 1

        await _until(status_shows_stale, "status showing the stale series", timeout=30)

        async def rewritten() -> asyncpg.Record | None:
            got = await written()
            return got[0] if got and got[0]["flag_time"] != first_flag else None

        await _until(rewritten, "the regenerated JSON")
        assert len(json.loads(path.read_bytes())) == 8
        # Once: nothing more after several quiet periods (the series' flushes are all covered).
        await asyncio.sleep(2 * QUIET_S + 1)
        assert _metric(web, "dicomflow_json_documents_total", {"result": "ok"}) == 2
        assert _metric(web, "dicomflow_json_stale_series") == 0
        assert _metric(web, "dicomflow_json_oldest_stale_seconds") == 0
        assert sink_counters([f"{web}/metrics"])["json"] == {"stale_series": 0, "oldest_stale_seconds": 0}

        # A series whose document cannot be written (a file stands where its study's directory
        # must go: deterministic, whatever the timing) fails, is retried once
        # (DICOMFLOW_JSON_MAX_RETRIES=1), then reported and left.
        other = clone_series(ct_small, storage / "old", series=1, instances=2)
        other_ds = pydicom.dcmread(other[0])
        other_series = str(other_ds.SeriesInstanceUID)
        blocker = document_path(storage, TENANT, str(other_ds.StudyDate), str(other_ds.StudyInstanceUID),
                                other_series).parent
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_bytes(b"not a directory")
        _backfill(env, storage / "old")

        async def reported() -> asyncpg.Record | None:
            meta, _ = await _meta_and_state(pg_dsn, other_series)
            return meta if meta is not None and meta["retry_times"] == 2 else None

        failed = await _until(reported, "the failed series reported")
        assert failed["json_status"] == 2
        assert _metric(web, "dicomflow_json_documents_total", {"result": "failed"}) == 2
        async with _connect(pg_dsn) as conn:  # reported, not retried forever: out of the stale list
            assert other_series not in {s.series_uid for s in await get_json_metaes(conn, datetime.now()
                                                                                   + timedelta(1))}
    finally:
        worker.stop()
        print(worker.log_tail(40))  # noqa: T201 - shown when the test fails


class _connect:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn = await asyncpg.connect(self.dsn)
        return self.conn

    async def __aexit__(self, *exc: Any) -> None:
        await self.conn.close()


def _settings(broker: EmbeddedBroker, home: Path, dsn: str = "postgresql://u@127.0.0.1:1/none",
              **extra: str) -> Settings:
    return Settings.from_env(worker_env(broker.url, home, DICOMFLOW_POSTGRES_DSN=dsn, **extra))


def _state(series: str, version: int, updated: datetime) -> DicomStateMeta:
    return DicomStateMeta(tenant_id=TENANT, patient_id="p", study_uid="1.2", series_uid=series, study_uid_hash="1",
                          series_uid_hash="2", study_date_origin="20240101", study_date=updated.date(),
                          accession_number="A", updated_time=updated, version=version)


def test_debounce_waits_for_quiet_and_ignores_replayed_states(broker: EmbeddedBroker, home: Path) -> None:
    settings = _settings(broker, home, DICOMFLOW_JSON_QUIET_SECONDS="300")
    app = create_app(settings)
    index = open_index(settings)
    assert index is not None
    stage = SeriesJsonStage(app, settings, index)
    t0 = datetime(2026, 1, 1, 12, 0, 0)
    first = stage.schedule(_state("1.2.3", 1, t0))
    assert first.due == pytest.approx(first.stale_since + 300)
    later = stage.schedule(_state("1.2.3", 2, t0 + timedelta(seconds=100)))
    assert later.due == pytest.approx(first.due + 100)  # quiet counts from the newest flush
    assert later.stale_since == first.stale_since  # stale since the first uncovered state
    replay = stage.schedule(_state("1.2.3", 1, t0))  # an old flush read again after a restart
    assert replay is later and stage.pending[later.key].version == 2
    stage.update_gauges(now=first.stale_since + 42)
    assert app.metrics.json_stale_series._value.get() == 1  # noqa: SLF001
    assert app.metrics.json_oldest_stale_seconds._value.get() == pytest.approx(42)  # noqa: SLF001


async def test_load_gate_measures_the_consumer_lag(fresh_broker: EmbeddedBroker, home: Path) -> None:
    """The gate reads end and committed offsets from the broker: 30 unconsumed events are a lag of 30."""
    from aiokafka import AIOKafkaProducer

    broker = fresh_broker
    settings = _settings(broker, home, DICOMFLOW_JSON_MAX_LAG="29")
    await ensure_topics(bootstrap_of(broker.url), ALL_TOPICS, settings.partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_of(broker.url), max_batch_size=1, linger_ms=0)
    await producer.start()
    try:
        for i in range(30):
            await producer.send_and_wait(STORAGE, value=b"{}", partition=i % settings.partitions)
    finally:
        await producer.stop()
    app = create_app(settings)
    index = open_index(settings)
    assert index is not None
    stage = SeriesJsonStage(app, settings, index)
    assert await stage.load_ok() is False
    assert stage.counters["lag"] == 30
    open_gate = SeriesJsonStage(app, settings.replace(json_max_lag=30), index)
    assert await open_gate.load_ok() is True


async def test_stale_series_found_after_a_restart_written_once_then_covered(broker: EmbeddedBroker, home: Path,
                                                                           pg_dsn: str, ct_small: Path,
                                                                           tmp_path: Path) -> None:
    """What a crash between ack and generation leaves: a state in the index that no JSON covers.
    The start-up reconcile finds it in the index; it is written once; the same flush read again
    (a replay) finds it covered and writes nothing."""
    files = clone_series(ct_small, tmp_path / "src", series=1, instances=3)
    date, study, series = _place(files, home / "storage")
    settings = _settings(broker, home, pg_dsn, DICOMFLOW_JSON_QUIET_SECONDS="0")
    app = create_app(settings)
    index = open_index(settings)
    assert index is not None
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        state = _state(series, 1, datetime.now(UTC).replace(tzinfo=None, microsecond=0))
        state.study_uid, state.study_date_origin = study, date
        state.study_uid_hash, state.series_uid_hash = "11", "22"
        state.patient_id = str(ds.PatientID)
        assert not await index.save_states([state])

        stage = SeriesJsonStage(app, settings, index)
        await stage.reconcile(owned=set(range(settings.partitions)))
        assert list(stage.pending) == [state.key] and stage.counters["reconciled"] == 1
        await stage.run_one(stage.pending[state.key])
        meta = await index.json_meta(TENANT, study, series)
        assert meta is not None and meta.json_status == 1 and meta.flag_time == state.updated_time
        path = document_path(home / "storage", TENANT, date, study, series)
        written = path.stat().st_mtime_ns
        assert len(json.loads(path.read_bytes())) == 3 and not stage.pending
        assert series not in {s.series_uid for s in await index.stale_json(datetime.now() + timedelta(1))}

        stage.schedule(state)  # the same flush again: covered
        await stage.run_one(stage.pending[state.key])
        assert stage.counters["already_covered"] == 1 and stage.counters["generated"] == 1
        assert path.stat().st_mtime_ns == written and not stage.pending
        await stage.reconcile(owned=set(range(settings.partitions)))  # nothing stale any more
        assert not stage.pending
    finally:
        await index.stop()
