"""The series-index sink against real servers: rows are asserted in the database.

Every test about semantics (upsert, newest wins, created_time, bad rows, outage and
retry) runs on both providers, embedded PostgreSQL 16 and MariaDB (``index_db``,
tests/fixtures_mysql.py); the rest is about PostgreSQL itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

from core.errors import SinkDataError, SinkError, SinkRetryableError
from dicom.extract import Extracted, extract
from dicomflow.embedded.postgres import EmbeddedPostgres, StopMode
from schemas.records import DicomStateMeta
from sinks.base import Backoff, BatchingSink, Rejected, SinkBatch, SinkItem, flush_with_retry
from sinks.index import index_for_dsn
from sinks.mysql import apply_mysql_schema, connect_args
from sinks.postgres import (
    PostgresSink,
    UnexpectedPostgresError,
    _translate,
    apply_schema,
    get_json_metaes,
    row_writes,
)
from tests.fixtures_mysql import IndexDb, MariaDB, state_rows
from tests.fixtures_postgres import run_sync

pytestmark = pytest.mark.integration

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456)
TOPIC = "dicom_state_meta"


@pytest.fixture
def base_state(ct_small: Path) -> DicomStateMeta:
    result = extract(ct_small, "tenant-a", now=T0)
    assert isinstance(result, Extracted)
    return result.state


def series(base: DicomStateMeta, i: int, *, updated: datetime = T0, created: datetime | None = None,
           **changes: Any) -> DicomStateMeta:
    """Series ``i`` of the CT_small study, stamped ``updated``."""
    return dataclasses.replace(base, series_uid=f"{base.series_uid}.{i}", updated_time=updated,
                               created_time=created or updated, **changes)


def batch_of(records: Sequence[DicomStateMeta], first_offset: int = 0) -> SinkBatch[DicomStateMeta]:
    items = [SinkItem(value=r, key=r.key, topic=TOPIC, partition=0, offset=first_offset + i)
             for i, r in enumerate(records)]
    return SinkBatch(TOPIC, 0, items)


async def fetch_rows(dsn: str) -> dict[str, dict[str, Any]]:
    """Every dicom_state_meta row (of either server), keyed by series_uid."""
    return await state_rows(dsn)


async def poll(check: Any, *, timeout: float, interval: float = 0.05) -> Any:
    """Await ``check()`` until it returns something truthy, or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


IndexSink = BatchingSink[DicomStateMeta]


@pytest.fixture
def dsn(index_db: IndexDb) -> str:
    """The test's empty database, on PostgreSQL and on MariaDB (the test runs once per server)."""
    return index_db.dsn


@pytest.fixture
async def sink(dsn: str) -> AsyncIterator[Any]:
    s = index_for_dsn(dsn)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def pg_sink(pg_dsn: str) -> AsyncIterator[PostgresSink]:
    s = PostgresSink(pg_dsn)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def test_upsert_n_series_gives_n_rows_with_all_fields(
        sink: Any, dsn: str, base_state: DicomStateMeta, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    n = 40
    records = [series(base_state, i, updated=T0 + timedelta(seconds=i)) for i in range(n)]
    # Every column type filled, and text that CSV must carry intact: quotes, commas,
    # newlines, backslashes, a literal \N (not NULL), non-ASCII, an empty string.
    records[0] = dataclasses.replace(
        records[0], patient_name='O\'Brien, "Jo"\nline2 \\N', series_description="\\N",
        study_description="Thorax – Übersicht 胸部", protocol_name="", patient_birth_date=date(1970, 1, 2),
        patient_birth_time=time(1, 2, 3, 456000), patient_size=1.8, patient_weight=72.25,
        pregnancy_status=4, series_related_instances=2**31 - 1, body_part_examined="CHEST")

    assert await sink.write(batch_of(records)) == []

    rows = await fetch_rows(dsn)
    assert len(rows) == n
    for record in records:
        assert rows[record.series_uid] == dataclasses.asdict(record)
    assert rows[records[0].series_uid]["series_description"] == "\\N"
    assert rows[records[0].series_uid]["protocol_name"] == ""
    assert rows[records[1].series_uid]["patient_birth_date"] is None
    password = dsn.split(":")[2].split("@")[0]
    assert password and all(password not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("order", ["older_first", "newer_first"])
async def test_the_version_orders_states_even_when_the_clock_went_back(
        sink: Any, dsn: str, base_state: DicomStateMeta, order: str) -> None:
    # After a DST fall-back hour, or a worker with a slower clock after a rebalance, the newer
    # state carries an earlier wall-clock time: its per-series version still makes it win.
    older = series(base_state, 1, updated=T0, patient_name="OLD", version=1, series_related_instances=10)
    newer = series(base_state, 1, updated=T0 - timedelta(hours=1), patient_name="NEW", version=2,
                   series_related_instances=11)
    first, second = (older, newer) if order == "older_first" else (newer, older)
    assert await sink.write(batch_of([first], 0)) == []
    assert await sink.write(batch_of([second], 1)) == []
    row = (await fetch_rows(dsn))[newer.series_uid]
    assert (row["patient_name"], row["series_related_instances"], row["version"]) == ("NEW", 11, 2)
    # and within one batch
    again = series(base_state, 2, updated=T0, patient_name="OLD", version=1)
    latest = series(base_state, 2, updated=T0 - timedelta(hours=1), patient_name="NEW", version=2)
    assert await sink.write(batch_of([latest, again] if order == "newer_first" else [again, latest], 2)) == []
    assert (await fetch_rows(dsn))[latest.series_uid]["patient_name"] == "NEW"


@pytest.mark.parametrize("order", ["older_first", "newer_first"])
async def test_older_update_never_overwrites_newer_across_batches(
        sink: Any, dsn: str, base_state: DicomStateMeta, order: str) -> None:
    older = series(base_state, 1, updated=T0, patient_name="OLD")
    newer = series(base_state, 1, updated=T0 + timedelta(microseconds=1), patient_name="NEW")
    first, second = (older, newer) if order == "older_first" else (newer, older)

    assert await sink.write(batch_of([first], 0)) == []
    assert await sink.write(batch_of([second], 1)) == []

    row = (await fetch_rows(dsn))[newer.series_uid]
    assert (row["patient_name"], row["updated_time"]) == ("NEW", newer.updated_time)


@pytest.mark.parametrize("order", ["older_first", "newer_first"])
async def test_older_update_never_overwrites_newer_in_one_batch(
        sink: Any, dsn: str, base_state: DicomStateMeta, order: str) -> None:
    older = series(base_state, 1, updated=T0, patient_name="OLD")
    newer = series(base_state, 1, updated=T0 + timedelta(seconds=5), patient_name="NEW")
    other = series(base_state, 2, updated=T0, patient_name="OTHER")
    pair = [older, newer] if order == "older_first" else [newer, older]

    assert await sink.write(batch_of([pair[0], other, pair[1]])) == []

    rows = await fetch_rows(dsn)
    assert len(rows) == 2
    assert rows[newer.series_uid]["patient_name"] == "NEW"
    assert rows[other.series_uid]["patient_name"] == "OTHER"


async def test_replay_of_an_older_batch_after_newer_changes_nothing(
        sink: Any, dsn: str, base_state: DicomStateMeta) -> None:
    old_batch = [series(base_state, i, updated=T0, patient_name="OLD") for i in range(5)]
    new_batch = [series(base_state, i, updated=T0 + timedelta(hours=1), patient_name="NEW") for i in range(5)]
    await sink.write(batch_of(old_batch))
    await sink.write(batch_of(new_batch, 5))

    await sink.write(batch_of(old_batch))  # e.g. a consumer rewound past committed offsets

    rows = await fetch_rows(dsn)
    assert {r["patient_name"] for r in rows.values()} == {"NEW"}
    assert sink.counters["stale_skipped"] == 5


async def test_created_time_keeps_the_first_insert(
        sink: Any, dsn: str, base_state: DicomStateMeta) -> None:
    first = series(base_state, 1, updated=T0, created=T0, modality="CT")
    later = series(base_state, 1, updated=T0 + timedelta(days=1), created=T0 + timedelta(days=1),
                   modality="MR", series_related_instances=12)

    await sink.write(batch_of([first]))
    await sink.write(batch_of([later], 1))

    row = (await fetch_rows(dsn))[first.series_uid]
    assert row["created_time"] == T0
    assert row["updated_time"] == later.updated_time
    assert (row["modality"], row["series_related_instances"]) == ("MR", 12)


async def test_missing_timestamps_are_stamped_not_null(
        sink: Any, dsn: str, base_state: DicomStateMeta) -> None:
    record = dataclasses.replace(series(base_state, 1), created_time=None, updated_time=None)
    before = datetime.now()
    assert await sink.write(batch_of([record])) == []
    row = (await fetch_rows(dsn))[record.series_uid]
    assert row["created_time"] == row["updated_time"] >= before


async def _apply_twice_and_count_tables(dsn: str) -> int:
    """Apply the schema twice more, directly; how many of the two index tables exist."""
    if dsn.startswith("mysql://"):
        import asyncmy

        my = await asyncmy.connect(**connect_args(dsn), autocommit=True)
        try:
            await apply_mysql_schema(my)
            await apply_mysql_schema(my)
            async with my.cursor() as cur:
                await cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = DATABASE() "
                                  "AND table_name IN ('dicom_state_meta', 'dicom_json_meta')")
                return int((await cur.fetchone())[0])
        finally:
            my.close()
    conn = await asyncpg.connect(dsn)
    try:
        await apply_schema(conn)
        await apply_schema(conn)
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('dicom_state_meta', 'dicom_json_meta')"))
    finally:
        await conn.close()


async def test_schema_application_is_idempotent_and_concurrency_safe(
        dsn: str, base_state: DicomStateMeta) -> None:
    sinks = [index_for_dsn(dsn) for _ in range(4)]
    # Four workers starting at once on an empty database: the advisory lock (GET_LOCK) serialises them.
    await asyncio.gather(*(s.start() for s in sinks))
    try:
        await sinks[0].write(batch_of([series(base_state, 1)]))
        tables = await _apply_twice_and_count_tables(dsn)
        await sinks[1].stop()
        await sinks[1].start()
    finally:
        for s in sinks:
            await s.stop()
    assert tables == 2
    assert len(await fetch_rows(dsn)) == 1  # re-applying never drops data


async def test_changed_series_shows_in_get_json_metaes_until_flagged(
        pg_sink: PostgresSink, pg_dsn: str, base_state: DicomStateMeta) -> None:
    sink = pg_sink  # the same on MariaDB, through the provider interface: tests/test_mysql_index.py
    a = series(base_state, 1, updated=T0)
    b = series(base_state, 2, updated=T0 + timedelta(seconds=1))
    await sink.write(batch_of([b, a]))
    end = T0 + timedelta(minutes=1)

    async def pending() -> list[str]:
        return [s.series_uid for s in await get_json_metaes(sink.pool, end)]

    assert await pending() == [a.series_uid, b.series_uid]  # oldest first
    assert await get_json_metaes(sink.pool, T0) == []  # updated_time < end_time is strict
    got = (await get_json_metaes(sink.pool, end))[0]
    assert dataclasses.asdict(got) == dataclasses.asdict(a)

    # The JSON generator records what it generated, as the seeds' save_json_list does.
    async with sink.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO dicom_json_meta (tenant_id, study_uid, series_uid, study_uid_hash, series_uid_hash,"
            " study_date_origin, flag_time) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            a.tenant_id, a.study_uid, a.series_uid, a.study_uid_hash, a.series_uid_hash,
            a.study_date_origin, a.updated_time)
    assert await pending() == [b.series_uid]

    # A newer event for series a changes updated_time: it needs new JSON again.
    a2 = series(base_state, 1, updated=T0 + timedelta(seconds=30), series_related_instances=3)
    await sink.write(batch_of([a2], 2))
    assert await pending() == [b.series_uid, a.series_uid]

    # A stale replay of a does not: flag_time still matches after the guard skipped it.
    async with sink.pool.acquire() as conn:
        await conn.execute("UPDATE dicom_json_meta SET flag_time = $1 WHERE series_uid = $2",
                           a2.updated_time, a.series_uid)
    await sink.write(batch_of([a], 3))
    assert await pending() == [b.series_uid]


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"patient_sex": "MF"}, "patient_sex"),                      # varchar(1)
        ({"patient_id": None}, "patient_id"),                        # NOT NULL
        ({"series_number": 2**31}, "series_number"),                 # integer range
        ({"study_date_origin": "2024010199"}, "study_date_origin"),  # varchar(8)
        ({"patient_name": "A\x00B"}, "patient_name"),               # text cannot hold NUL
        ({"study_id": "\udcff"}, "study_id"),                       # lone surrogate
    ],
)
async def test_row_refused_by_the_server_is_rejected_naming_column_others_land(
        sink: Any, dsn: str, base_state: DicomStateMeta, change: dict[str, Any],
        column: str) -> None:
    records = [series(base_state, i) for i in range(7)]
    records[3] = dataclasses.replace(records[3], **change)
    batch = batch_of(records, 100)

    rejected = await sink.write(batch)

    assert [r.item.offset for r in rejected] == [103]
    error = rejected[0].error
    assert isinstance(error, SinkDataError)
    assert error.field == column
    assert column in error.message
    rows = await fetch_rows(dsn)
    assert set(rows) == {r.series_uid for i, r in enumerate(records) if i != 3}


async def test_many_bad_rows_and_fallback_to_older_version_of_same_series(
        sink: Any, dsn: str, base_state: DicomStateMeta) -> None:
    good = [series(base_state, i) for i in range(20)]
    bad = [series(base_state, 100 + i, patient_sex="XX") for i in range(5)]
    # Series 7's newest version is refused; the older one from the same batch must land.
    refused_newest = series(base_state, 7, updated=T0 + timedelta(seconds=1), patient_sex="XX")
    records = good[:10] + bad + [refused_newest] + good[10:]

    rejected = await sink.write(batch_of(records))

    assert sorted(r.item.offset for r in rejected) == [10, 11, 12, 13, 14, 15]
    assert {r.error.field for r in rejected} == {"patient_sex"}
    rows = await fetch_rows(dsn)
    assert set(rows) == {r.series_uid for r in good}
    assert rows[good[7].series_uid]["updated_time"] == T0


async def test_whole_batch_refused_is_fully_rejected(
        sink: Any, dsn: str, base_state: DicomStateMeta) -> None:
    records = [series(base_state, i, accession_number="A" * 17) for i in range(9)]
    rejected = await sink.write(batch_of(records))
    assert len(rejected) == 9
    assert all(r.error.field == "accession_number" for r in rejected)
    assert await fetch_rows(dsn) == {}


async def test_row_writes_counts_inserts_and_updates_not_stale(
        pg_dsn: str, base_state: DicomStateMeta) -> None:
    # One connection: row_writes then reads the stats of the very session that wrote.
    sink = PostgresSink(pg_dsn, min_size=1, max_size=1)
    await sink.start()
    try:
        async with sink.pool.acquire() as conn:
            before = await row_writes(conn)
        await sink.write(batch_of([series(base_state, i) for i in range(10)]))          # 10 inserts
        await sink.write(batch_of([series(base_state, i, updated=T0 + timedelta(1))
                                   for i in range(4)]))                                  # 4 updates
        await sink.write(batch_of([series(base_state, i, updated=T0 - timedelta(1))
                                   for i in range(10)]))                                 # all stale
        async with sink.pool.acquire() as conn:
            after = await row_writes(conn)
    finally:
        await sink.stop()
    assert after - before == 14
    assert sink.counters["stale_skipped"] == 10


def test_errors_are_classified_for_the_sink_contract() -> None:
    retryable = [OSError("refused"), ConnectionResetError(), TimeoutError(),
                 asyncpg.exceptions.AdminShutdownError("terminating connection"),
                 asyncpg.exceptions.CannotConnectNowError("starting up"),
                 asyncpg.exceptions.ConnectionDoesNotExistError("closed"),
                 asyncpg.exceptions.SerializationError("x"), asyncpg.exceptions.DeadlockDetectedError("x"),
                 asyncpg.exceptions.TooManyConnectionsError("x"), asyncpg.exceptions.InterfaceError("closed")]
    for exc in retryable:
        assert isinstance(_translate(exc, "write"), SinkRetryableError), exc
    # Issue #14: a renamed table, a REVOKE or a rotated password is retried with an alert;
    # giving up would let the agent's batch be acked.
    unexpected = [asyncpg.exceptions.UndefinedTableError("x"), asyncpg.exceptions.InvalidPasswordError("x"),
                  asyncpg.exceptions.InsufficientPrivilegeError("x")]
    for exc in unexpected:
        assert isinstance(_translate(exc, "write"), UnexpectedPostgresError), exc
    fatal = [asyncpg.exceptions.ClientConfigurationError("x")]
    for exc in fatal:
        translated = _translate(exc, "write")
        assert isinstance(translated, SinkError) and not isinstance(translated, SinkRetryableError), exc


async def test_wrong_password_is_retried_with_an_alert_without_the_password(pg_server: EmbeddedPostgres) -> None:
    dsn = pg_server.dsn_for("postgres").replace("postgres:", "postgres:Wr0ngSecret", 1)
    sink = PostgresSink(dsn)
    with pytest.raises(SinkError) as info:
        await sink.start()
    assert isinstance(info.value, UnexpectedPostgresError)  # a password rotation in progress
    assert sink.counters["unexpected_errors"] == 1
    assert "Wr0ngSecret" not in str(info.value) and "Wr0ngSecret" not in repr(sink)


# -- PostgreSQL down --------------------------------------------------------------------


@pytest.fixture
def own_server(pg_datadir: Path) -> Iterator[EmbeddedPostgres]:
    """A server this test may stop and start without disturbing the shared one."""
    # synchronous_commit stays on: the crash (immediate stop) test must not lose acknowledged
    # commits; fsync=off is safe as long as the OS itself does not crash.
    # The log_line_prefix (spaces, brackets) checks that settings survive pg_ctl's shell.
    server = EmbeddedPostgres(pg_datadir, settings={"fsync": "off", "log_line_prefix": "%m [%p] "}).start()
    try:
        yield server
    finally:
        server.stop()


class OwnIndexServer:
    """A server of either kind that a test may stop (cleanly, or as a crash) and start again."""

    def __init__(self, kind: str, server: EmbeddedPostgres | MariaDB) -> None:
        self.kind = kind
        self.server = server

    @property
    def dsn(self) -> str:
        return self.server.dsn

    def stop(self, *, crash: bool = False) -> None:
        if isinstance(self.server, MariaDB):
            self.server.kill() if crash else self.server.stop()
        else:
            self.server.stop(mode=cast(StopMode, "immediate" if crash else "fast"))

    def start(self) -> None:
        self.server.start()


@pytest.fixture(params=["postgres", "mysql"])
def own_index(request: pytest.FixtureRequest) -> OwnIndexServer:
    """A series-index server of its own (PostgreSQL, then MariaDB) for outage tests."""
    if request.param == "postgres":
        return OwnIndexServer("postgres", request.getfixturevalue("own_server"))
    return OwnIndexServer("mysql", request.getfixturevalue("own_mysql"))


async def restart_after(server: OwnIndexServer | EmbeddedPostgres, sink: Any, *, min_retries: int,
                        down_for: float) -> None:
    """Start ``server`` again once ``sink`` has visibly retried and ``down_for`` has passed."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def retried() -> bool:
        return sink.counters["retries"] >= min_retries

    await poll(retried, timeout=30)
    await asyncio.sleep(max(0.0, down_for - (loop.time() - started)))
    await asyncio.to_thread(server.start)


@pytest.mark.parametrize("mode", ["clean", "crash"])
async def test_flush_retries_while_the_index_is_down_and_completes_after_restart(
        own_index: OwnIndexServer, base_state: DicomStateMeta, mode: str) -> None:
    own_server = own_index
    sink = index_for_dsn(own_server.dsn, max_size=2)
    await sink.start()
    rejected_seen: list[Rejected[DicomStateMeta]] = []

    async def on_rejected(items: Sequence[Rejected[DicomStateMeta]]) -> None:
        rejected_seen.extend(items)

    try:
        for offset, r in enumerate(series(base_state, i) for i in range(10)):
            sink.add(SinkItem(value=r, key=r.key, topic=TOPIC, partition=0, offset=offset))
        assert await flush_with_retry(sink, on_rejected=on_rejected) == 10  # pool connections are warm

        await asyncio.to_thread(own_server.stop, crash=mode == "crash")
        more = [series(base_state, i, updated=T0 + timedelta(hours=1), patient_name="AFTER")
                for i in range(5, 30)]
        for offset, r in enumerate(more, 10):
            sink.add(SinkItem(value=r, key=r.key, topic=TOPIC, partition=0, offset=offset))
        restarter = asyncio.create_task(restart_after(own_server, sink, min_retries=3, down_for=2.0))
        written = await asyncio.wait_for(
            flush_with_retry(sink, on_rejected=on_rejected, backoff=Backoff(initial=0.05, maximum=0.5)),
            timeout=60)
        await restarter
    finally:
        await sink.stop()

    assert written == 25 and rejected_seen == []
    assert sink.counters["retries"] >= 3
    rows = await fetch_rows(own_server.dsn)
    assert len(rows) == 30
    assert sum(r["patient_name"] == "AFTER" for r in rows.values()) == 25


async def test_sink_started_while_the_index_is_down_recovers_on_write(
        own_index: OwnIndexServer, base_state: DicomStateMeta) -> None:
    own_server = own_index
    await asyncio.to_thread(own_server.stop)
    sink = index_for_dsn(own_server.dsn, connect_timeout=2)
    with pytest.raises(SinkRetryableError):
        await sink.start()

    async def on_rejected(items: Sequence[Rejected[DicomStateMeta]]) -> None:
        raise AssertionError(f"unexpected rejection {items}")

    r = series(base_state, 1)
    sink.add(SinkItem(value=r, key=r.key, topic=TOPIC, partition=0, offset=0))
    restarter = asyncio.create_task(restart_after(own_server, sink, min_retries=2, down_for=0.5))
    try:
        written = await asyncio.wait_for(
            flush_with_retry(sink, on_rejected=on_rejected, backoff=Backoff(initial=0.05, maximum=0.5)),
            timeout=60)
        await restarter
    finally:
        await sink.stop()
    assert written == 1
    assert len(await fetch_rows(own_server.dsn)) == 1


# -- the embedded server itself ---------------------------------------------------------


def test_pg_dsn_is_an_empty_database_usable_from_sync_tests(pg_dsn: str) -> None:
    async def tables() -> int:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return int(await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"))
        finally:
            await conn.close()

    assert run_sync(tables) == 0


def test_embedded_postgres_keeps_data_and_dsn_across_restarts(own_server: EmbeddedPostgres) -> None:
    async def query(dsn: str, sql: str) -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    dsn = own_server.dsn
    run_sync(lambda: query(dsn, "CREATE TABLE kept AS SELECT 42 AS answer"))
    own_server.stop()
    assert not own_server.running()

    # A new handle on the same directory (as after a process restart): same port, same data.
    again = EmbeddedPostgres(own_server.datadir)
    again.start()
    assert again.dsn == dsn
    assert run_sync(lambda: query(dsn, "SELECT answer FROM kept")) == 42
    # A third handle adopts the running server instead of failing on its lock file.
    adopted = EmbeddedPostgres(own_server.datadir).start()
    assert adopted.dsn == dsn and adopted.running()
    assert run_sync(lambda: query(dsn, "SELECT current_setting('listen_addresses')")) == "127.0.0.1"
    own_server.stop()
    own_server.start()  # the first handle is still usable, with its settings
    assert run_sync(lambda: query(dsn, "SELECT current_setting('log_line_prefix')")) == "%m [%p] "
