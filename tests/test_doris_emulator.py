"""The Stream Load emulator against the reference contract (raw HTTP, no dicomflow client)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import date, datetime
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.doris_emulator import DorisEmulator

TABLE = "dicom_object_meta"
RESPONSE_FIELDS = [
    "TxnId", "Label", "Comment", "TwoPhaseCommit", "Status", "Message", "NumberTotalRows",
    "NumberLoadedRows", "NumberFilteredRows", "NumberUnselectedRows", "LoadBytes", "LoadTimeMs",
    "BeginTxnTimeMs", "StreamLoadPutTimeMs", "ReadDataTimeMs", "WriteDataTimeMs", "ReceiveDataTimeMs",
    "CommitAndPublishTimeMs",
]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def obj_row(i: int = 0, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "created_time": "2024-05-06 07:08:09.123456",
        "tenant_id": "t1",
        "patient_id": f"p{i}",
        "trace_id": f"trace-{i}",
        "worker_node_id": "w1",
        "sop_uid": f"1.2.3.{i}",
        "number_of_frames": 1,
        "study_date": "2024-05-06",
    }
    row.update(over)
    return row


def state_row(updated: str, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "tenant_id": "t1", "study_uid": "1.2", "series_uid": "1.2.3", "patient_id": "p",
        "study_uid_hash": "h1", "series_uid_hash": "h2", "study_date_origin": "20240506",
        "study_date": "2024-05-06", "accession_number": "A1", "updated_time": updated,
        # the sequence column: the per-series version (later hours, later versions here)
        "version": int(updated[11:13]),
    }
    row.update(over)
    return row


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


class Raw:
    """A protocol-correct two-hop client written out longhand (the reference's flow)."""

    def __init__(self, emu: DorisEmulator, http: aiohttp.ClientSession) -> None:
        self.emu, self.http = emu, http

    def headers(self, label: str | None, **extra: str) -> dict[str, str]:
        h = {"format": "json", "strip_outer_array": "true", "Expect": "100-continue",
             "Authorization": basic(self.emu.user, self.emu.password)}
        if label is not None:
            h["label"] = label
        h.update(extra)
        # An empty value means "do not send this header".
        return {k: v for k, v in h.items() if v != ""}

    async def load(self, rows: list[dict[str, Any]] | bytes, label: str | None = "l1", *, db: str = "dicomflow",
                   table: str = TABLE, **extra: str) -> tuple[str, dict[str, Any]]:
        body = rows if isinstance(rows, bytes) else json.dumps(rows).encode()
        headers = self.headers(label, **extra)
        url = f"{self.emu.fe_url}/api/{db}/{table}/_stream_load"
        async with self.http.put(url, data=body, headers=headers, allow_redirects=False) as fe:
            assert fe.status == 307, await fe.text()
            location = URL(fe.headers["Location"])
        async with self.http.put(location.with_user(None), data=body, headers=headers) as be:
            assert be.status == 200
            text = await be.text()
        return text, json.loads(text)


@pytest.fixture
def raw(doris_emulator: DorisEmulator, http: aiohttp.ClientSession) -> Raw:
    return Raw(doris_emulator, http)


# --- FE ----------------------------------------------------------------------------------


async def test_fe_redirects_to_be_with_credentials_in_location(doris_emulator: DorisEmulator,
                                                               http: aiohttp.ClientSession) -> None:
    url = f"{doris_emulator.fe_url}/api/dicomflow/{TABLE}/_stream_load"
    headers = {"Expect": "100-continue", "Authorization": basic(doris_emulator.user, doris_emulator.password)}
    async with http.put(url, data=b"[]", headers=headers, allow_redirects=False) as resp:
        assert resp.status == 307
        location = URL(resp.headers["Location"])
    assert location.port == doris_emulator.be_port != doris_emulator.fe_port
    assert location.path == f"/api/dicomflow/{TABLE}/_stream_load"
    # java.net.URI-style quoting: the decoded userinfo is exactly the credentials.
    assert (location.user, location.password) == (doris_emulator.user, doris_emulator.password)
    assert "%40" in str(location) and "%2F" in str(location)


async def test_fe_never_sends_100_continue(doris_emulator: DorisEmulator) -> None:
    # The FE answers on the headers alone: a raw socket sees the 307 first, no interim 100.
    reader, writer = await asyncio.open_connection("127.0.0.1", doris_emulator.fe_port)
    auth = basic(doris_emulator.user, doris_emulator.password)
    writer.write((f"PUT /api/dicomflow/{TABLE}/_stream_load HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: {auth}\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 307")


async def test_fe_requires_expect(doris_emulator: DorisEmulator, http: aiohttp.ClientSession) -> None:
    url = f"{doris_emulator.fe_url}/api/dicomflow/{TABLE}/_stream_load"
    headers = {"Authorization": basic(doris_emulator.user, doris_emulator.password)}
    async with http.put(url, data=b"[]", headers=headers, allow_redirects=False) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "FAILED", "msg": "There is no 100-continue header"}
    assert doris_emulator.fe_requests[-1].outcome == "no_expect"


async def test_fe_bad_password_is_http_200_with_code_401(doris_emulator: DorisEmulator,
                                                         http: aiohttp.ClientSession) -> None:
    url = f"{doris_emulator.fe_url}/api/dicomflow/{TABLE}/_stream_load"
    headers = {"Expect": "100-continue", "Authorization": basic(doris_emulator.user, "wrong")}
    async with http.put(url, data=b"[]", headers=headers, allow_redirects=False) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["msg"] == "Unauthorized" and body["code"] == 401 and body["count"] == 0
    assert body["data"].startswith(f"Access denied for user '{doris_emulator.user}'")
    doris_emulator.auth_mode = "http401"
    async with http.put(url, data=b"[]", headers=headers, allow_redirects=False) as resp:
        assert resp.status == 401


async def test_naive_clients_fail(doris_emulator: DorisEmulator, http: aiohttp.ClientSession) -> None:
    body = json.dumps([obj_row()]).encode()
    url = f"{doris_emulator.fe_url}/api/dicomflow/{TABLE}/_stream_load"
    auth = basic(doris_emulator.user, doris_emulator.password)
    # aiohttp defaults (redirects followed, no Expect): the FE refuses before redirecting.
    async with http.put(url, data=body, headers={"label": "n1", "format": "json",
                                                 "strip_outer_array": "true", "Authorization": auth}) as resp:
        assert resp.status == 200 and not resp.history
        assert (await resp.json())["msg"] == "There is no 100-continue header"
    # The `requests` behaviour (reference §1): Authorization dropped on the port change and
    # the Location userinfo ignored, so the BE gets no credentials.
    headers = {"label": "n2", "format": "json", "strip_outer_array": "true", "Expect": "100-continue",
               "Authorization": auth}
    async with http.put(url, data=body, headers=headers, allow_redirects=False) as fe:
        location = URL(fe.headers["Location"]).with_user(None)
    headers.pop("Authorization")
    async with http.put(location, data=body, headers=headers) as be:
        assert be.status == 200
        reply = await be.json(content_type=None)
    assert reply["Status"] == "Fail"
    assert "no valid Basic authorization" in reply["Message"]
    assert doris_emulator.rows(TABLE) == []


async def test_aiohttp_redirect_uses_location_userinfo(doris_emulator: DorisEmulator,
                                                       http: aiohttp.ClientSession) -> None:
    # aiohttp drops Authorization across origins but adopts the credentials of Location:
    # this works only because the emulator quotes the userinfo as the FE does.
    url = f"{doris_emulator.fe_url}/api/dicomflow/{TABLE}/_stream_load"
    headers = {"label": "a1", "format": "json", "strip_outer_array": "true", "Expect": "100-continue",
               "Authorization": basic(doris_emulator.user, doris_emulator.password)}
    async with http.put(url, data=json.dumps([obj_row()]).encode(), headers=headers) as resp:
        assert [h.status for h in resp.history] == [307]
        assert (await resp.json(content_type=None))["Status"] == "Success"
    assert doris_emulator.loads[-1].user == doris_emulator.user


# --- BE response shape and labels -----------------------------------------------------------


async def test_success_response_field_order_and_newline(raw: Raw, doris_emulator: DorisEmulator) -> None:
    text, reply = await raw.load([obj_row(1), obj_row(2)], "ok-1")
    assert text.endswith("}\n") and "\n    \"TxnId\"" in text  # pretty-printed
    assert list(reply) == RESPONSE_FIELDS
    assert reply["Status"] == "Success" and reply["Message"] == "OK" and reply["TwoPhaseCommit"] == "false"
    assert (reply["NumberTotalRows"], reply["NumberLoadedRows"], reply["NumberFilteredRows"]) == (2, 2, 0)
    rows = doris_emulator.rows(TABLE)
    assert [r["trace_id"] for r in rows] == ["trace-1", "trace-2"]
    assert rows[0]["created_time"] == datetime(2024, 5, 6, 7, 8, 9)
    assert rows[0]["study_date"] == date(2024, 5, 6) and rows[0]["number_of_frames"] == 1


async def test_label_already_exists_finished_and_running(raw: Raw, doris_emulator: DorisEmulator) -> None:
    _, first = await raw.load([obj_row(1)], "dup-1")
    text, again = await raw.load([obj_row(1)], "dup-1")
    keys = list(again)
    assert keys[:6] == ["TxnId", "Label", "Comment", "TwoPhaseCommit", "Status", "ExistingJobStatus"]
    assert again["Status"] == "Label Already Exists" and again["ExistingJobStatus"] == "FINISHED"
    assert f"Label [dup-1] has already been used, relate to txn [{first['TxnId']}]" in again["Message"]
    assert len(doris_emulator.rows(TABLE)) == 1
    # RUNNING: a slow load holds the label while a second request arrives.
    doris_emulator.inject("slow", seconds=0.5)
    slow = asyncio.create_task(raw.load([obj_row(2)], "run-1"))
    await doris_emulator.wait_until(lambda: doris_emulator.label_state("run-1") == "RUNNING")
    _, running = await raw.load([obj_row(2)], "run-1")
    assert running["Status"] == "Label Already Exists" and running["ExistingJobStatus"] == "RUNNING"
    _, done = await slow
    assert done["Status"] == "Success"
    assert doris_emulator.label_state("run-1") == "VISIBLE"
    assert len(doris_emulator.rows(TABLE)) == 2


@pytest.mark.parametrize("label", ["has.dot", "x" * 129, "sp ace"])
async def test_label_regex(raw: Raw, doris_emulator: DorisEmulator, label: str) -> None:
    _, reply = await raw.load([obj_row()], label)
    assert reply["Status"] == "Fail" and "Label format error" in reply["Message"]
    assert doris_emulator.rows(TABLE) == []


async def test_missing_label_gets_a_generated_one(raw: Raw, doris_emulator: DorisEmulator) -> None:
    _, reply = await raw.load([obj_row()], None)
    assert reply["Status"] == "Success" and len(reply["Label"]) == 36


async def test_unknown_db_and_table(raw: Raw) -> None:
    _, reply = await raw.load([obj_row()], "u1", db="nodb")
    assert reply["Status"] == "Fail" and "unknown database, database=nodb" in reply["Message"]
    _, reply = await raw.load([obj_row()], "u2", table="notable")
    assert reply["Status"] == "Fail" and "unknown table, tableName=notable" in reply["Message"]


async def test_be_checks_the_password_itself(doris_emulator: DorisEmulator, http: aiohttp.ClientSession) -> None:
    url = f"{doris_emulator.be_url}/api/dicomflow/{TABLE}/_stream_load"
    headers = {"Expect": "100-continue", "Authorization": basic(doris_emulator.user, "nope"), "label": "b1",
               "format": "json", "strip_outer_array": "true"}
    async with http.put(url, data=json.dumps([obj_row()]).encode(), headers=headers) as resp:
        assert resp.status == 200
        reply = await resp.json(content_type=None)
    assert reply["Status"] == "Fail" and reply["TxnId"] == -1 and "Access denied" in reply["Message"]


# --- rows ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (obj_row(9, patient_id=None), "column(patient_id) values is null"),
        ({k: v for k, v in obj_row(9).items() if k != "trace_id"}, "The column `trace_id` is not nullable"),
        # 19 characters, 38 bytes: VARCHAR(36) counts bytes.
        (obj_row(9, trace_id="é" * 19), "column_name[trace_id], the length of input is too long"),
        (obj_row(9, study_date="2024-13-01"), "column(study_date) value is incorrect"),
        (obj_row(9, created_time="yesterday"), "column(created_time) value is incorrect"),
        (obj_row(9, number_of_frames="many"), "column(number_of_frames) value is incorrect"),
        (obj_row(9, file_size=2**63), "column(file_size) value is incorrect"),
    ],
)
async def test_bad_row_fails_the_load_and_frees_the_label(raw: Raw, doris_emulator: DorisEmulator,
                                                          bad: dict[str, Any], needle: str) -> None:
    text, reply = await raw.load([obj_row(1), bad], "dq-1", strict_mode="true")
    assert reply["Status"] == "Fail" and reply["Message"] == "[DATA_QUALITY_ERROR]too many filtered rows"
    assert (reply["NumberTotalRows"], reply["NumberLoadedRows"], reply["NumberFilteredRows"]) == (2, 0, 1)
    assert list(reply)[-2:] == ["ErrorURL", "FirstErrorMsg"]
    assert needle in reply["FirstErrorMsg"]
    assert doris_emulator.rows(TABLE) == []
    assert doris_emulator.label_state("dq-1") == "ABORTED"
    async with raw.http.get(reply["ErrorURL"]) as resp:
        assert needle in await resp.text()
    # Rolled back: the same label loads the corrected batch.
    _, retry = await raw.load([obj_row(1)], "dq-1")
    assert retry["Status"] == "Success" and len(doris_emulator.rows(TABLE)) == 1


async def test_max_filter_ratio_allows_partial_load(raw: Raw, doris_emulator: DorisEmulator) -> None:
    rows = [obj_row(1), obj_row(2, study_date="bad"), obj_row(3)]
    _, reply = await raw.load(rows, "r-1", max_filter_ratio="0.5", strict_mode="true")
    assert reply["Status"] == "Success"
    assert (reply["NumberLoadedRows"], reply["NumberFilteredRows"]) == (2, 1) and "ErrorURL" in reply
    assert [r["trace_id"] for r in doris_emulator.rows(TABLE)] == ["trace-1", "trace-3"]


async def test_non_strict_mode_loads_null_for_a_failed_cast(raw: Raw, doris_emulator: DorisEmulator) -> None:
    _, reply = await raw.load([obj_row(1, study_date="2024-02-30")], "ns-1")
    assert reply["Status"] == "Success"
    assert doris_emulator.rows(TABLE)[0]["study_date"] is None


async def test_columns_header_and_json_lines(raw: Raw, doris_emulator: DorisEmulator) -> None:
    cols = "`created_time`, `tenant_id`, `patient_id`, `trace_id`, `worker_node_id`, `sop_uid`"
    lines = b"\n".join(json.dumps(obj_row(i)).encode() for i in range(3)) + b"\n"
    # Neither strip_outer_array nor read_json_by_line: line mode (master default).
    _, reply = await raw.load(lines, "jl-1", columns=cols, strip_outer_array="")
    assert reply["NumberLoadedRows"] == 3
    assert all(r["study_date"] is None for r in doris_emulator.rows(TABLE))  # not in `columns`
    _, reply = await raw.load([obj_row()], "jl-2", columns="`tenant_id`, `nope`")
    assert reply["Status"] == "Fail" and "Unknown column 'nope'" in reply["Message"]
    _, reply = await raw.load([obj_row()], "jl-3", columns="`tenant_id`, `trace_id`")
    assert reply["Status"] == "Fail" and "Column has no default value" in reply["Message"]


async def test_unique_key_upsert_and_sequence_column(raw: Raw, doris_emulator: DorisEmulator) -> None:
    new, old = "2024-05-06 10:00:00", "2024-05-06 09:00:00"
    await raw.load([state_row(new, patient_id="newer")], "s-1", table="dicom_state_meta")
    await raw.load([state_row(old, patient_id="older")], "s-2", table="dicom_state_meta")
    rows = doris_emulator.rows("dicom_state_meta")
    assert len(rows) == 1 and rows[0]["patient_id"] == "newer"  # a smaller sequence never wins
    await raw.load([state_row(new, patient_id="same-seq")], "s-3", table="dicom_state_meta")
    assert doris_emulator.rows("dicom_state_meta")[0]["patient_id"] == "same-seq"  # equal replaces
    await raw.load([state_row(old, series_uid="1.2.4")], "s-4", table="dicom_state_meta")
    assert len(doris_emulator.rows("dicom_state_meta")) == 2
    # DUPLICATE KEY keeps identical rows loaded under different labels.
    await raw.load([obj_row(1)], "d-1")
    await raw.load([obj_row(1)], "d-2")
    assert len(doris_emulator.rows(TABLE)) == 2


# --- faults --------------------------------------------------------------------------------------


async def test_fault_fail_and_publish_timeout(raw: Raw, doris_emulator: DorisEmulator) -> None:
    doris_emulator.inject("fail")
    _, reply = await raw.load([obj_row(1)], "f-1")
    assert reply["Status"] == "Fail" and doris_emulator.rows(TABLE) == []
    doris_emulator.inject("publish_timeout")
    _, reply = await raw.load([obj_row(1)], "f-1")
    assert reply["Status"] == "Publish Timeout" and len(doris_emulator.rows(TABLE)) == 1


async def test_fault_http500_and_resets(doris_emulator: DorisEmulator, http: aiohttp.ClientSession) -> None:
    url = f"{doris_emulator.be_url}/api/dicomflow/{TABLE}/_stream_load"
    headers = {"Expect": "100-continue", "Authorization": basic(doris_emulator.user, doris_emulator.password),
               "format": "json", "strip_outer_array": "true"}
    body = json.dumps([obj_row(1)]).encode()
    doris_emulator.inject("http500")
    async with http.put(url, data=body, headers={**headers, "label": "h-1"}) as resp:
        assert resp.status == 500
    # aiohttp (3.14) silently re-sends an idempotent PUT once after a disconnect: two resets.
    doris_emulator.inject("reset", count=2)
    with pytest.raises(aiohttp.ClientError):
        async with http.put(url, data=body, headers={**headers, "label": "h-2"}) as resp:
            await resp.read()
    assert doris_emulator.rows(TABLE) == []
    assert doris_emulator.label_state("h-2") is None
    # The nasty one: committed, then the connection dies. aiohttp's silent re-send finds the
    # label taken, which is exactly what a client retrying with the same label must see.
    doris_emulator.inject("reset_after_commit")
    async with http.put(url, data=body, headers={**headers, "label": "h-3"}) as resp:
        reply = await resp.json(content_type=None)
    assert reply["Status"] == "Label Already Exists" and reply["ExistingJobStatus"] == "FINISHED"
    assert len(doris_emulator.rows(TABLE)) == 1
    assert [x.fault for x in doris_emulator.loads] == ["http500", "reset", "reset", "reset_after_commit", None]


async def test_a_client_gone_mid_body_aborts_its_load_and_frees_the_label(raw: Raw, doris_emulator: DorisEmulator,
                                                                        http: aiohttp.ClientSession) -> None:
    """A worker killed while its Stream Load body is on the wire: Doris cancels that load, so the
    retry with the same label (its successor's) is not refused for ever as RUNNING."""
    body = json.dumps([obj_row(7)]).encode()
    headers = raw.headers("cut-1")
    async with http.put(f"{doris_emulator.fe_url}/api/dicomflow/{TABLE}/_stream_load", data=body, headers=headers,
                        allow_redirects=False) as fe:
        location = URL(fe.headers["Location"])
    reader, writer = await asyncio.open_connection(location.host, location.port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != "Expect")
    writer.write(f"PUT {location.raw_path_qs} HTTP/1.1\r\nHost: {location.host}:{location.port}\r\n{head}"
                 f"Content-Length: {len(body) + 1000}\r\n\r\n".encode() + body[:10])
    await writer.drain()
    await doris_emulator.wait_until(lambda: doris_emulator.label_state("cut-1") == "RUNNING")
    writer.close()  # the client dies before the rest of the body
    await doris_emulator.wait_until(lambda: doris_emulator.label_state("cut-1") == "ABORTED")
    _, retry = await raw.load([obj_row(7)], "cut-1")
    assert retry["Status"] == "Success"
    assert len(doris_emulator.rows(TABLE)) == 1
