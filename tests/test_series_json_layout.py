"""Series JSON for a series backfilled from any folder layout: the stage finds its instance files
through the paths the index records, on PostgreSQL and on MariaDB, through a real worker; the
document's BulkDataURIs resolve on the worker's web port to the bytes pydicom reads.

The files are named by hand in nested folders inside the storage root (not the C-STORE SCP's
``{tenant}/{date}/{study}/{series}`` layout), one of them twice (a copy of an instance under
another name), and fed by ``dicomflow backfill``.
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
from pathlib import Path
from typing import TypeVar

import pydicom
import pytest

from core.settings import Settings
from dicomflow.embedded.broker import EmbeddedBroker
from schemas.records import DicomJsonMeta, DicomStateMeta
from sinks.index import open_index
from sinks.json_documents import document_path
from tests.fixtures_mysql import IndexDb
from tests.harness import REPO, WorkerProcess, clone_series, worker_env

pytestmark = pytest.mark.integration

TENANT = "t-layout"
T = TypeVar("T")


async def _until(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 90.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _backfill(env: dict[str, str], directory: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(directory), "--tenant", TENANT,
                           "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _http(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - the test's own worker
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_a_series_backfilled_from_any_layout_gets_its_json(fresh_broker: EmbeddedBroker, home: Path,
                                                                 index_db: IndexDb, ct_small: Path,
                                                                 tmp_path: Path) -> None:
    files = clone_series(ct_small, tmp_path / "src", series=1, instances=4)
    storage = home / "storage"
    # Hand-named files in nested folders: nothing of the SCP's layout.
    places = [storage / "archive" / "2019" / "scanner a" / "img-001.dcm",
              storage / "archive" / "2019" / "scanner a" / "deep" / "x.bin",
              storage / "archive" / "misc" / "IM0002",
              storage / "archive" / "misc" / "nested" / "again" / "last one"]
    for src, dest in zip(files, places, strict=True):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    shutil.copy(files[1], storage / "archive" / "misc" / "copy of x")  # the same instance, another file
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    date, study, series = str(ds.StudyDate), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    sops = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)

    index_env = ({"DICOMFLOW_INDEX_DSN": index_db.dsn} if index_db.kind == "mysql"
                 else {"DICOMFLOW_POSTGRES_DSN": index_db.dsn})
    env = worker_env(fresh_broker.url, home, DICOMFLOW_JSON_QUIET_SECONDS="1", DICOMFLOW_JSON_RETRY_SECONDS="0.3",
                     DICOMFLOW_JSON_MAX_RETRIES="1", **index_env)
    index = open_index(Settings.from_env(env))
    assert index is not None
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        _backfill(env, storage / "archive")

        async def covered() -> tuple[DicomJsonMeta, DicomStateMeta] | None:
            meta = await index.json_meta(TENANT, study, series)
            state = next((r for r in await index.series_of_study(TENANT, study) if r.series_uid == series), None)
            if meta is None or state is None or meta.flag_time != state.updated_time:
                return None
            return meta, state

        meta, state = await _until(covered, "dicom_json_meta covering the series' state")
        assert (meta.json_status, meta.retry_times) == (1, 0), worker.log_tail(40)
        assert state.series_related_instances == 4
        document = json.loads(document_path(storage, TENANT, date, study, series).read_bytes())
        assert sorted(o["00080018"]["Value"][0] for o in document) == sops
        assert [o["00200013"]["Value"][0] for o in document] == [1, 2, 3, 4]

        # Its BulkDataURIs resolve on the worker's web port: the element's bytes, as pydicom reads them.
        web = f"http://127.0.0.1:{env['DICOMFLOW_WEB_PORT']}"
        by_sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
        for obj in (document[0], document[-1]):
            uri = obj["7FE00010"]["BulkDataURI"]
            assert uri.startswith(f"/studies/{study}/series/{series}/instances/")
            assert uri.endswith(f"/bulkdata/7FE00010?tenant={TENANT}")  # resolves as written
            status, headers, body = _http(f"{web}{uri}")
            assert status == 200 and headers["Content-Type"] == "application/octet-stream"
            assert body == pydicom.dcmread(by_sop[obj["00080018"]["Value"][0]]).PixelData
            assert int(headers["Content-Length"]) == len(body)
        uri = document[0]["7FE00010"]["BulkDataURI"].split("?", 1)[0]
        for bad, (code, error) in {uri.replace("7FE00010", "7FE00011"): (404, "NOT_FOUND"),
                                   uri.replace("/instances/1.", "/instances/9."): (404, "NOT_FOUND"),
                                   uri.replace("7FE00010", "7FE0001X"): (400, "BAD_REQUEST"),
                                   uri + "/0": (400, "BAD_REQUEST")}.items():
            status, _, body = _http(f"{web}{bad}", {"X-Tenant-Id": TENANT})
            assert (status, json.loads(body)["error"]["code"]) == (code, error), bad
        assert _http(f"{web}{uri}?tenant=other")[0] == 404  # another tenant's instance
        assert _http(f"{web}{uri}")[0] == 400  # no tenant
    finally:
        worker.stop()
        await index.stop()
        print(worker.log_tail(40))  # noqa: T201 - shown when the test fails
