"""DorisTableSink + StreamLoadClient against the Stream Load emulator: what ends up in Doris."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pydicom
import pytest

from core.errors import Code, ConfigError, SinkDataError, SinkRetryableError
from core.settings import Settings
from dicom.extract import Extracted, extract
from schemas import ddl
from schemas.codec import to_row
from sinks.base import Backoff, Rejected, RetryAborted, SinkBatch, SinkItem, flush_with_retry
from sinks.doris import LABEL_RE, DorisTableSink, StreamLoadClient, make_label
from tests.doris_emulator import DorisEmulator

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
DB = "dicomflow"
OBJECT, STATE, IMAGE = "dicom_object_meta", "dicom_state_meta", "dicom_image_meta"
TOPIC = "dicomflow.doris.object"  # dots: the label must sanitise and disambiguate
BACKOFF = Backoff(initial=0.01, maximum=0.05)


def records(n: int, *, now: datetime | None = None) -> list[Extracted]:
    """``n`` extractions of CT_small with distinct instances, series and traces."""
    out = []
    base = extract(CT_SMALL, "tenant-a", trace_id="t", worker_node_id="w1", now=now)
    assert isinstance(base, Extracted)
    for i in range(n):
        e = extract(CT_SMALL, "tenant-a", trace_id=f"trace-{i:04d}", worker_node_id="w1", now=now)
        assert isinstance(e, Extracted)
        e.image.sop_uid = e.object.sop_uid = f"{base.image.sop_uid}.{i}"
        e.state.series_uid = f"{base.state.series_uid}.{i}"
        out.append(e)
    return out


def batch(rows: Sequence[dict[str, Any]], *, topic: str = TOPIC, partition: int = 0,
          first_offset: int = 100) -> SinkBatch[dict[str, Any]]:
    b: SinkBatch[dict[str, Any]] = SinkBatch(topic, partition)
    for i, row in enumerate(rows):
        b.items.append(SinkItem(row, None, topic, partition, first_offset + i))
    return b


class DeadLetters:
    def __init__(self) -> None:
        self.items: list[Rejected[dict[str, Any]]] = []

    async def __call__(self, rejected: Sequence[Rejected[dict[str, Any]]]) -> None:
        self.items.extend(rejected)


async def flush(sink: DorisTableSink, b: SinkBatch[dict[str, Any]]) -> DeadLetters:
    dead = DeadLetters()
    for item in b.items:
        sink.add(item)
    await flush_with_retry(sink, on_rejected=dead, backoff=BACKOFF)
    return dead


@pytest.fixture
async def client(doris_emulator: DorisEmulator) -> AsyncIterator[StreamLoadClient]:
    c = StreamLoadClient(doris_emulator.fe_url, doris_emulator.user, doris_emulator.password)
    await c.start()
    yield c
    await c.stop()


def sink_for(client: StreamLoadClient, table: str) -> DorisTableSink:
    return DorisTableSink(client, db=DB, table=table)


# --- happy path ------------------------------------------------------------------------------


async def test_all_three_tables_load_real_records(doris_emulator: DorisEmulator,
                                                  client: StreamLoadClient) -> None:
    recs = records(3)
    for table, attr in ((OBJECT, "object"), (STATE, "state"), (IMAGE, "image")):
        sink = sink_for(client, table)
        dead = await flush(sink, batch([to_row(getattr(r, attr)) for r in recs]))
        assert dead.items == []
        assert sink.counters["loads"] == 1 and sink.counters["rows"] == 3
    objects = doris_emulator.rows(OBJECT)
    assert sorted(r["trace_id"] for r in objects) == ["trace-0000", "trace-0001", "trace-0002"]
    assert objects[0]["study_date"] == date(2004, 1, 19) and objects[0]["file_size"] == CT_SMALL.stat().st_size
    images = doris_emulator.rows(IMAGE)
    assert len(images) == 3
    assert images[0]["columns"] == 128 and images[0]["width"] == 128  # `columns` is a reserved word
    assert images[0]["slice_thickness"] == 5.0
    states = doris_emulator.rows(STATE)
    assert len(states) == 3 and states[0]["study_time"] == "07:27:30" and states[0]["modality"] == "CT"
    # Every load went FE -> 307 -> BE with credentials on the second hop.
    assert [r.outcome for r in doris_emulator.fe_requests] == ["redirect"] * 3
    assert [(x.status, x.user) for x in doris_emulator.loads] == [("Success", doris_emulator.user)] * 3


async def test_label_is_deterministic_and_valid() -> None:
    label = make_label(DB, OBJECT, "dicomflow_object", 3, 100, 199)
    assert label == "dicomflow:dicomflow:dicom_object_meta:dicomflow_object:3:100:199"
    dotted = make_label(DB, OBJECT, "a.b", 0, 1, 2)
    assert dotted == make_label(DB, OBJECT, "a.b", 0, 1, 2)
    assert dotted != make_label(DB, OBJECT, "a_b", 0, 1, 2)  # sanitising must not merge topics
    assert dotted.endswith(":0:1:2")
    long = make_label("d" * 100, "t" * 100, "x" * 249, 7, 10**15, 10**15 + 5)
    assert len(long) <= 128 and long.endswith(f":7:{10**15}:{10**15 + 5}")
    assert long != make_label("d" * 100, "t" * 100, "x" * 248, 7, 10**15, 10**15 + 5)
    for lab in (label, dotted, long):
        assert LABEL_RE.match(lab)


async def test_replaying_a_batch_adds_no_duplicates(doris_emulator: DorisEmulator,
                                                    client: StreamLoadClient) -> None:
    rows = [to_row(r.object) for r in records(4)]
    sink = sink_for(client, OBJECT)
    await flush(sink, batch(rows))
    await flush(sink, batch(rows))  # redelivered after a crash before the offset commit
    assert len(doris_emulator.rows(OBJECT)) == 4
    assert sink.counters["label_already_finished"] == 1
    assert [x.status for x in doris_emulator.loads] == ["Success", "Label Already Exists"]
    # A different partition or offset range is a different batch: loaded, not deduplicated.
    await flush(sink, batch(rows, partition=1))
    assert len(doris_emulator.rows(OBJECT)) == 8


# --- auth and configuration errors -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["body401", "http401"])
async def test_bad_password_is_loud_and_retried(doris_emulator: DorisEmulator, mode: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    doris_emulator.auth_mode = mode  # type: ignore[assignment]
    bad = StreamLoadClient(doris_emulator.fe_url, doris_emulator.user, "not-the-password")
    sink = sink_for(bad, OBJECT)
    row = to_row(records(1)[0].object)
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(SinkRetryableError, match="authentication failed"):
            await sink.write(batch([row]))
        # flush_with_retry keeps retrying (no data loss) until told to stop.
        sink.add(batch([row]).items[0])
        attempts = 0

        def stop() -> bool:
            nonlocal attempts
            attempts += 1
            return attempts >= 3

        with pytest.raises(RetryAborted):
            await flush_with_retry(sink, on_rejected=DeadLetters(), should_stop=stop, backoff=BACKOFF)
    finally:
        await bad.stop()
    assert doris_emulator.rows(OBJECT) == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "sinks.doris"]
    assert errors and "DICOMFLOW_DORIS_PASSWORD" in errors[0].getMessage()
    assert all("not-the-password" not in r.getMessage() for r in caplog.records)


async def test_password_never_logged(doris_emulator: DorisEmulator, client: StreamLoadClient,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    doris_emulator.inject("fail")
    await flush(sink_for(client, OBJECT), batch([to_row(records(1)[0].object)]))
    assert len(doris_emulator.rows(OBJECT)) == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "label=" in text  # the load was logged ...
    assert doris_emulator.password not in text and "%40p%2F" not in text  # ... its Location was not
    assert doris_emulator.password not in repr(client)


async def test_unknown_table_is_retried_loudly(client: StreamLoadClient,
                                               caplog: pytest.LogCaptureFixture) -> None:
    sink = DorisTableSink(client, db=DB, table="no_such_table", spec=ddl.table_spec(OBJECT))
    with pytest.raises(SinkRetryableError, match="unknown table"):
        await sink.write(batch([to_row(records(1)[0].object)]))
    assert any(r.levelno == logging.ERROR for r in caplog.records)


# --- faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "count"),
    [("fail", 2), ("publish_timeout", 1), ("http500", 2), ("reset", 3), ("reset_after_commit", 1)],
)
async def test_every_fault_ends_with_each_row_once(doris_emulator: DorisEmulator, client: StreamLoadClient,
                                                   fault: str, count: int) -> None:
    rows = [to_row(r.object) for r in records(5)]
    doris_emulator.inject(fault, count=count)  # type: ignore[arg-type]
    sink = sink_for(client, OBJECT)
    dead = await flush(sink, batch(rows))
    assert dead.items == []
    traces = sorted(r["trace_id"] for r in doris_emulator.rows(OBJECT))
    assert traces == sorted(r["trace_id"] for r in rows)
    assert not doris_emulator.faults  # every injected fault was actually hit
    if fault in ("fail", "http500", "reset"):
        assert sink.counters["retries"] >= 1


async def test_slow_load_and_client_timeout(doris_emulator: DorisEmulator) -> None:
    # The docs' classic: the client gives up before the load finishes and retries the same
    # label; it must see RUNNING, wait, then FINISHED -- never load twice.
    impatient = StreamLoadClient(doris_emulator.fe_url, doris_emulator.user, doris_emulator.password,
                                 load_timeout_s=1, client_timeout_s=0.2)
    sink = sink_for(impatient, OBJECT)
    rows = [to_row(r.object) for r in records(3)]
    doris_emulator.inject("slow", seconds=0.6)
    try:
        dead = await flush(sink, batch(rows))
    finally:
        await impatient.stop()
    assert dead.items == []
    assert len(doris_emulator.rows(OBJECT)) == 3
    assert any(x.existing_job_status == "RUNNING" for x in doris_emulator.loads)
    assert doris_emulator.loads[-1].existing_job_status == "FINISHED"
    assert sink.counters["label_already_finished"] == 1


async def test_concurrent_writer_sees_running(doris_emulator: DorisEmulator, client: StreamLoadClient) -> None:
    rows = [to_row(r.object) for r in records(2)]
    sink = sink_for(client, OBJECT)
    doris_emulator.inject("slow", seconds=0.5)
    first = asyncio.create_task(sink.write(batch(rows)))
    await doris_emulator.wait_until(lambda: any(t.state == "RUNNING" for t in doris_emulator.labels[DB].values()))
    with pytest.raises(SinkRetryableError, match="RUNNING"):
        await sink.write(batch(rows))
    assert await first == []
    assert len(doris_emulator.rows(OBJECT)) == 2


async def test_fail_messages_are_classified(doris_emulator: DorisEmulator, client: StreamLoadClient) -> None:
    row = to_row(records(1)[0].object)
    sink = sink_for(client, OBJECT)
    doris_emulator.inject("fail", message="[CANCELLED]cancelled: memory limit exceeded")
    with pytest.raises(SinkRetryableError):
        await sink.write(batch([row]))
    doris_emulator.inject("fail", message="[CANCELLED]cancelled: [DATA_QUALITY_ERROR]Encountered "
                                          "unqualified data, stop processing")
    rejected = await sink.write(batch([row]))
    assert len(rejected) == 1 and "Encountered unqualified data" in rejected[0].error.message
    assert doris_emulator.rows(OBJECT) == []


# --- data errors -----------------------------------------------------------------------------------


async def test_invalid_rows_are_rejected_by_column_and_the_rest_loads(doris_emulator: DorisEmulator,
                                                                      client: StreamLoadClient) -> None:
    rows = [to_row(r.object) for r in records(5)]
    rows[1]["patient_id"] = None
    rows[2]["study_uid"] = "1." + "2" * 68  # 70 bytes
    rows[3]["study_date"] = "2024-13-01"
    sink = sink_for(client, OBJECT)
    dead = await flush(sink, batch(rows))
    got = {(d.item.offset, d.error.field, d.error.code) for d in dead.items}
    assert got == {(101, "patient_id", Code.MISSING_REQUIRED_FIELD), (102, "study_uid", Code.VALUE_TOO_LONG),
                   (103, "study_date", Code.INVALID_DATE)}
    messages = sorted(d.error.message for d in dead.items)
    assert messages == [f"{OBJECT}.patient_id: NOT NULL column is null",
                        f"{OBJECT}.study_date: not a DATE: '2024-13-01'",
                        f"{OBJECT}.study_uid: 70 bytes exceeds VARCHAR(64)"]
    assert sorted(r["trace_id"] for r in doris_emulator.rows(OBJECT)) == ["trace-0000", "trace-0004"]
    assert sink.counters["rejected"] == 3 and sink.counters["rows"] == 2
    # The load covered the batch's offsets, invalid rows included.
    assert doris_emulator.loads[0].label == make_label(DB, OBJECT, TOPIC, 0, 100, 104)


async def test_all_invalid_means_no_load(doris_emulator: DorisEmulator, client: StreamLoadClient) -> None:
    rows = [to_row(r.object) for r in records(2)]
    for row in rows:
        del row["trace_id"]
    dead = await flush(sink_for(client, OBJECT), batch(rows))
    assert [d.error.message for d in dead.items] == [f"{OBJECT}.trace_id: NOT NULL column is missing"] * 2
    assert doris_emulator.loads == [] and doris_emulator.fe_requests == []


def test_validate_row_reasons() -> None:
    spec = ddl.table_spec(STATE)
    row = to_row(records(1)[0].state)
    assert ddl.validate_row(spec, row) is None
    assert ddl.validate_row(spec, {**row, "patient_name": "é" * 33}) == "patient_name: 66 bytes exceeds VARCHAR(64)"
    assert ddl.validate_row(spec, {**row, "series_number": "x1"}) == "series_number: not an INT: 'x1'"
    assert ddl.validate_row(spec, {**row, "series_number": 2**31}) == "series_number: 2147483648 is out of INT range"
    assert ddl.validate_row(spec, {**row, "updated_time": "2024-01-01T25:00:00"}) == (
        "updated_time: not a DATETIME: '2024-01-01T25:00:00'")
    assert ddl.validate_row(spec, {k: v for k, v in row.items() if k != "updated_time"}) == (
        "updated_time: NOT NULL column is missing")
    assert ddl.validate_row(spec, {**row, "patient_weight": "heavy"}) == "patient_weight: not a DOUBLE: 'heavy'"


async def test_bisection_isolates_a_row_only_doris_rejects(client: StreamLoadClient) -> None:
    # The server's schema drifted: source_ae is VARCHAR(4) there, VARCHAR(64) in the repo.
    sql = resources.files("schemas").joinpath("sql/doris.sql").read_text()
    narrowed = sql.replace("source_ae           VARCHAR(64)", "source_ae           VARCHAR(4)")
    assert narrowed != sql
    emulator = DorisEmulator(user=client.user, password="pw", ddl=narrowed)
    async with emulator:
        c = StreamLoadClient(emulator.fe_url, emulator.user, "pw")
        sink = sink_for(c, OBJECT)
        rows = [to_row(r.object) for r in records(6)]
        rows[4]["source_ae"] = "MODALITY_AE"  # valid for the repo's DDL, too long for the server
        try:
            dead = await flush(sink, batch(rows))
            assert [(d.item.offset, d.error.field) for d in dead.items] == [(104, "source_ae")]
            assert "too many filtered rows" in dead.items[0].error.message
            assert "the length of input is too long than schema" in dead.items[0].error.message
            assert sorted(r["trace_id"] for r in emulator.rows(OBJECT)) == [
                f"trace-{i:04d}" for i in (0, 1, 2, 3, 5)]
            assert sink.counters["bisections"] >= 2
            # Replaying bisects to the same labels: nothing is loaded twice.
            loads_before = len([x for x in emulator.loads if x.status == "Success"])
            dead = await flush(sink, batch(rows))
            assert len(dead.items) == 1 and len(emulator.rows(OBJECT)) == 5
            assert len([x for x in emulator.loads if x.status == "Success"]) == loads_before
        finally:
            await c.stop()


async def test_body_over_the_server_limit_is_split_not_retried_forever(client: StreamLoadClient) -> None:
    """EXCEEDED_LIMIT is not transient: the batch is halved until each part fits, all rows land."""
    emulator = DorisEmulator(user=client.user, password="pw", json_max_bytes=2500)
    async with emulator:
        c = StreamLoadClient(emulator.fe_url, emulator.user, "pw")
        sink = sink_for(c, OBJECT)
        rows = [to_row(r.object) for r in records(8)]
        try:
            dead = await flush(sink, batch(rows))
            assert dead.items == []
            assert len(emulator.rows(OBJECT)) == 8
            assert any("EXCEEDED_LIMIT" in x.message for x in emulator.loads)
            assert sink.counters["bisections"] >= 1
        finally:
            await c.stop()


async def test_state_sequence_column_keeps_the_newest(doris_emulator: DorisEmulator,
                                                      client: StreamLoadClient) -> None:
    # The sequence column is the per-series version (#14 item 3), not the wall clock.
    t0 = datetime(2024, 5, 6, 10, 0, 0)
    newer = {**to_row(records(1, now=t0)[0].state), "version": 7}
    older = {**to_row(records(1, now=t0 + timedelta(minutes=5))[0].state), "patient_name": "STALE^NAME",
             "version": 6}
    sink = sink_for(client, STATE)
    await flush(sink, batch([newer]))
    await flush(sink, batch([older], first_offset=500))  # an out-of-order replay
    states = doris_emulator.rows(STATE)
    assert len(states) == 1 and states[0]["version"] == 7 and states[0]["updated_time"] == t0
    assert states[0]["patient_name"] != "STALE^NAME"


async def test_client_raises_data_error_on_data_quality_fail(client: StreamLoadClient,
                                                                        doris_emulator: DorisEmulator) -> None:
    doris_emulator.inject("fail", message="[DATA_QUALITY_ERROR]too many filtered rows")
    with pytest.raises(SinkDataError):
        await client.load(DB, OBJECT, [to_row(records(1)[0].object)], "single-1",
                          ddl.table_spec(OBJECT).column_names)


def test_ddl_parses_the_schema() -> None:
    specs = ddl.tables()
    assert sorted(specs) == [IMAGE, OBJECT, STATE]
    assert (len(specs[OBJECT].columns), len(specs[STATE].columns), len(specs[IMAGE].columns)) == (20, 31, 38)
    assert specs[OBJECT].key_model == "DUPLICATE" and specs[OBJECT].key_columns == ("created_time", "tenant_id")
    assert specs[STATE].key_columns == ("tenant_id", "study_uid", "series_uid")
    assert specs[STATE].sequence_column == "version"
    assert specs[IMAGE].key_model == "UNIQUE" and specs[IMAGE].sequence_column == "updated_time"
    assert specs[IMAGE].column("columns") == ddl.ColumnSpec("columns", "INT", None, True)
    assert specs[OBJECT].column("trace_id") == ddl.ColumnSpec("trace_id", "VARCHAR", 36, False)
    # The repo's records and the DDL agree on every column name.
    assert set(specs[IMAGE].column_names) == set(to_row(records(1)[0].image))
    assert set(specs[STATE].column_names) == set(to_row(records(1)[0].state))
    assert set(specs[OBJECT].column_names) == set(to_row(records(1)[0].object))


def test_ddl_parser_edges() -> None:
    sql = """
    -- CREATE TABLE ignored (a INT);
    CREATE TABLE IF NOT EXISTS db1.`t` (
        `k` BIGINT NOT NULL COMMENT 'key -- not a comment; NOT NULL inside text',
        v VARCHAR(10) COMMENT "NOT NULL",
        d DATETIME(3) NOT NULL,
        INDEX i (v) USING INVERTED
    ) UNIQUE KEY(`k`) PROPERTIES ("function_column.sequence_col" = "d");
    CREATE ROUTINE LOAD x ON t COLUMNS (k);
    """
    spec = ddl.parse_ddl(sql)["t"]
    assert [(c.name, c.sql_type, c.nullable) for c in spec.columns] == [
        ("k", "BIGINT", False), ("v", "VARCHAR(10)", True), ("d", "DATETIME", False)]
    assert spec.key_columns == ("k",) and spec.sequence_column == "d"
    with pytest.raises(ValueError, match="unsupported column type DECIMAL"):
        ddl.parse_ddl("CREATE TABLE t (a DECIMAL(10, 2)) DUPLICATE KEY(a);")
    with pytest.raises(ConfigError, match="not in schemas/sql/doris.sql"):
        ddl.table_spec("nope")


async def test_from_settings(doris_emulator: DorisEmulator) -> None:
    settings = Settings.from_env({"DICOMFLOW_DORIS_FE_URL": doris_emulator.fe_url + "/",
                                  "DICOMFLOW_DORIS_USER": doris_emulator.user,
                                  "DICOMFLOW_DORIS_PASSWORD": doris_emulator.password})
    client = StreamLoadClient.from_settings(settings)
    sink = DorisTableSink.from_settings(settings, "image", client)
    sink.incarnation = INC_A  # read from the broker at worker start
    try:
        await sink.start()
        dead = await flush(sink, batch([to_row(records(1)[0].image)]))
    finally:
        await sink.stop()
    assert dead.items == [] and len(doris_emulator.rows(IMAGE)) == 1
    assert (sink.db, sink.table, sink.name) == (DB, IMAGE, "doris:dicom_image_meta")


# --- incarnations: a label names one content forever (issue 13 item 4) ------------------------


INC_A, INC_B = "0a1b2c3d4e5f6071", "f0e1d2c3b4a59687"


def incarnated(client: StreamLoadClient, incarnation: str, table: str = OBJECT) -> DorisTableSink:
    sink = DorisTableSink(client, db=DB, table=table)
    sink.incarnation = incarnation  # what agents/doris_sink.py sets at worker start
    return sink


async def test_a_second_incarnation_with_the_same_offsets_loads_its_rows(doris_emulator: DorisEmulator,
                                                                         client: StreamLoadClient) -> None:
    """After a broker reset offsets start again at 0: the new rows must land, not meet an old label."""
    recs = records(6)
    before = [to_row(r.object) for r in recs[:3]]
    after = [to_row(r.object) for r in recs[3:]]
    assert (await flush(incarnated(client, INC_A), batch(before, first_offset=0))).items == []
    second = incarnated(client, INC_B)
    dead = await flush(second, batch(after, first_offset=0))  # same topic, partition and offsets
    assert dead.items == []
    assert sorted(r["trace_id"] for r in doris_emulator.rows(OBJECT)) == [f"trace-{i:04d}" for i in range(6)]
    assert [x.status for x in doris_emulator.loads] == ["Success", "Success"]
    assert second.counters["label_already_finished"] == 0
    labels = [x.label for x in doris_emulator.loads]
    assert labels[0] != labels[1] and INC_A in str(labels[0]) and INC_B in str(labels[1])


async def test_label_exists_without_an_intent_is_an_error_not_a_success(
        doris_emulator: DorisEmulator, client: StreamLoadClient, caplog: pytest.LogCaptureFixture) -> None:
    recs = records(4)
    await flush(incarnated(client, INC_A), batch([to_row(r.object) for r in recs[:2]], first_offset=0))
    # Another process of the same incarnation (an intents topic lost, a bug): same offsets, other rows.
    stranger = incarnated(client, INC_A)
    other = batch([to_row(r.object) for r in recs[2:]], first_offset=0)
    caplog.set_level(logging.INFO)
    with pytest.raises(SinkRetryableError, match="no intent"):
        await stranger.write(other)
    assert stranger.counters["label_conflicts"] == 1
    assert stranger.counters["loads"] == 0 and stranger.counters["label_already_finished"] == 0
    assert any(r.levelno == logging.ERROR and "Label Already Exists" in r.getMessage() for r in caplog.records)
    # Through the retry loop: never counted as written, never acked (the flush gives up only when told to stop).
    for item in other.items:
        stranger.add(item)
    attempts = 0

    def stop() -> bool:
        nonlocal attempts
        attempts += 1
        return attempts >= 2

    with pytest.raises(RetryAborted):
        await flush_with_retry(stranger, on_rejected=DeadLetters(), should_stop=stop, backoff=BACKOFF)
    assert stranger.counters["rows"] == 0 and stranger.counters["batches"] == 0
    assert sorted(r["trace_id"] for r in doris_emulator.rows(OBJECT)) == ["trace-0000", "trace-0001"]


async def test_label_exists_for_a_batch_rebuilt_from_its_intent_is_success(doris_emulator: DorisEmulator,
                                                                           client: StreamLoadClient) -> None:
    rows = [to_row(r.object) for r in records(3)]
    await flush(incarnated(client, INC_A), batch(rows, first_offset=0))
    restarted = incarnated(client, INC_A)  # a restarted worker: it rebuilt the batch from its intent
    replay = batch(rows, first_offset=0)
    replay.replay = True
    assert await restarted.write(replay) == []
    assert restarted.counters["label_already_finished"] == 1 and restarted.counters["label_conflicts"] == 0
    assert len(doris_emulator.rows(OBJECT)) == 3


def test_incarnation_labels_stay_valid_and_distinct() -> None:
    a = make_label(DB, OBJECT, "log_queue", 3, 0, 4999, incarnation=INC_A)
    assert a == f"dicomflow:{INC_A}:{DB}:{OBJECT}:log_queue:3:0:4999"
    assert a != make_label(DB, OBJECT, "log_queue", 3, 0, 4999, incarnation=INC_B)
    assert a != make_label(DB, OBJECT, "log_queue", 3, 0, 4999)
    long = make_label("d" * 100, "t" * 100, "x" * 249, 7, 10**15, 10**15 + 5, incarnation=INC_A)
    assert len(long) <= 128 and LABEL_RE.match(long) and INC_A in long
    assert long != make_label("d" * 100, "t" * 100, "x" * 249, 7, 10**15, 10**15 + 5, incarnation=INC_B)
    with pytest.raises(ValueError, match="incarnation"):
        make_label(DB, OBJECT, "log_queue", 0, 0, 1, incarnation="not:hex")


async def test_a_sink_built_from_settings_refuses_to_load_without_its_incarnation(
        doris_emulator: DorisEmulator) -> None:
    settings = Settings.from_env({"DICOMFLOW_DORIS_FE_URL": doris_emulator.fe_url,
                                  "DICOMFLOW_DORIS_USER": doris_emulator.user,
                                  "DICOMFLOW_DORIS_PASSWORD": doris_emulator.password})
    client = StreamLoadClient.from_settings(settings)
    sink = DorisTableSink.from_settings(settings, "object", client)
    try:
        with pytest.raises(SinkRetryableError, match="incarnation"):
            await sink.write(batch([to_row(records(1)[0].object)]))
        assert doris_emulator.fe_requests == []
    finally:
        await client.stop()


# --- Fail classification (issue 14 item 5) -------------------------------------------------------

MEM_LIMIT = ("[MEM_LIMIT_EXCEEDED]PreCatch error code:11, [E11] Allocator sys memory check failed: "
             "Cannot alloc:4194304, consuming tracker:<Load#Id=...>, peak used 2147483648")
TOO_MANY_VERSIONS = ("[E-235]failed to init rowset builder. version count: 2001, exceed limit: 2000, "
                     "tablet: 10095. Please reduce the frequency of loading data or adjust the "
                     "max_tablet_version_num or time_series_max_tablet_version_num in be.conf")


@pytest.mark.parametrize(("message", "kind", "min_wait"), [
    (MEM_LIMIT, "mem_limit", 1.0),
    (TOO_MANY_VERSIONS, "too_many_versions", 5.0),
    ("[TOO_MANY_VERSION]failed to init rowset builder. version count: 2001", "too_many_versions", 5.0),
    ("[INTERNAL_ERROR]cancelled: injected fault: tablet writer write failed", "transient", 0.0),
])
async def test_transient_fails_are_retried_and_counted_by_kind(doris_emulator: DorisEmulator,
                                                               client: StreamLoadClient, message: str,
                                                               kind: str, min_wait: float) -> None:
    sink = sink_for(client, OBJECT)
    row = to_row(records(1)[0].object)
    doris_emulator.inject("fail", message=message)
    with pytest.raises(SinkRetryableError) as info:
        await sink.write(batch([row]))
    assert (info.value.retry_after or 0.0) >= min_wait
    assert sink.counters[f"fail_{kind}"] == 1
    assert sink.counters["bisections"] == 0  # a transient refusal is retried whole, never split
    assert sum(v for k, v in sink.counters.items() if k.startswith("fail_")) == 1
    # The same label then loads, once.
    assert await sink.write(batch([row])) == []
    assert len(doris_emulator.rows(OBJECT)) == 1


async def test_data_fails_are_counted_as_data(doris_emulator: DorisEmulator, client: StreamLoadClient) -> None:
    sink = sink_for(client, OBJECT)
    doris_emulator.inject("fail", message="[DATA_QUALITY_ERROR]too many filtered rows")
    rejected = await sink.write(batch([to_row(records(1)[0].object)]))
    assert len(rejected) == 1
    assert sink.counters["fail_data"] == 1 and sink.counters["fail_transient"] == 0


# --- credentials go to allowed BEs only (issue 14 item 10) ----------------------------------------


async def test_auth_is_not_sent_to_a_redirect_on_another_host(caplog: pytest.LogCaptureFixture) -> None:
    emulator = DorisEmulator(user="u", password="pw", redirect_host="localhost")  # FE is 127.0.0.1
    async with emulator:
        c = StreamLoadClient(emulator.fe_url, "u", "pw")
        sink = sink_for(c, OBJECT)
        caplog.set_level(logging.INFO)
        try:
            with pytest.raises(SinkRetryableError) as info:
                await sink.write(batch([to_row(records(1)[0].object)]))
        finally:
            await c.stop()
        assert "localhost" in info.value.message and "DICOMFLOW_DORIS_BE_ALLOWLIST" in info.value.message
        assert [r.outcome for r in emulator.fe_requests] == ["redirect"]
        assert emulator.loads == []  # the BE never saw the request, so never the credentials
        assert sink.counters["fail_redirect_refused"] == 1
        assert any(r.levelno == logging.ERROR and "DICOMFLOW_DORIS_BE_ALLOWLIST" in r.getMessage()
                   for r in caplog.records)


@pytest.mark.parametrize("allow", ["localhost", "LOCALHOST:{port}", "other:1, localhost:{port}"])
async def test_an_allowlisted_be_gets_the_load(allow: str) -> None:
    emulator = DorisEmulator(user="u", password="pw", redirect_host="localhost")
    async with emulator:
        settings = Settings.from_env({"DICOMFLOW_DORIS_FE_URL": emulator.fe_url, "DICOMFLOW_DORIS_USER": "u",
                                      "DICOMFLOW_DORIS_PASSWORD": "pw",
                                      "DICOMFLOW_DORIS_BE_ALLOWLIST": allow.format(port=emulator.be_port)})
        c = StreamLoadClient.from_settings(settings)
        try:
            assert await sink_for(c, OBJECT).write(batch([to_row(records(1)[0].object)])) == []
        finally:
            await c.stop()
        assert len(emulator.rows(OBJECT)) == 1 and [x.user for x in emulator.loads] == ["u"]


async def test_an_allowlist_entry_with_another_port_does_not_allow() -> None:
    emulator = DorisEmulator(user="u", password="pw", redirect_host="localhost")
    async with emulator:
        c = StreamLoadClient(emulator.fe_url, "u", "pw", be_allowlist=[f"localhost:{emulator.be_port + 1}"])
        try:
            with pytest.raises(SinkRetryableError, match="localhost"):
                await sink_for(c, OBJECT).write(batch([to_row(records(1)[0].object)]))
        finally:
            await c.stop()
        assert emulator.loads == []


def test_be_allowlist_setting_is_parsed_and_checked() -> None:
    env = {"DICOMFLOW_DORIS_FE_URL": "http://fe:8030"}
    assert Settings.from_env(env).doris_be_allowlist == ()
    got = Settings.from_env({**env, "DICOMFLOW_DORIS_BE_ALLOWLIST": " be1:8040, BE2 ,,"}).doris_be_allowlist
    assert got == ("be1:8040", "be2")
    with pytest.raises(ConfigError, match="DICOMFLOW_DORIS_BE_ALLOWLIST"):
        Settings.from_env({**env, "DICOMFLOW_DORIS_BE_ALLOWLIST": "http://be1:8040"})
