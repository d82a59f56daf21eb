"""Ingest on a real Tansu broker with a real worker process: fan-out, dead letters, SIGKILL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.settings import EMBEDDED_PROFILE
from dicomflow.embedded.broker import EmbeddedBroker
from feeders.publisher import EventPublisher
from schemas.records import series_key
from streams.topology import DLQ, IMAGE, LOG, SERIES_INSTANCES
from tests.conftest import PYDICOM_TEST_FILES, bundled_dicom_files
from tests.harness import (
    REPO,
    Msg,
    WorkerProcess,
    clone_series,
    fresh_web_port,
    read_all,
    read_topic,
    worker_env,
)
from tests.test_extract import EXPECTED, Accepted, Rejected

pytestmark = pytest.mark.integration




@pytest.fixture
def worker(fresh_broker: EmbeddedBroker, home: Path) -> Iterator[WorkerProcess]:
    w = WorkerProcess(worker_env(fresh_broker.url, home), home / "worker.log").start()
    yield w
    w.stop()


@pytest.fixture
async def publisher(fresh_broker: EmbeddedBroker) -> AsyncIterator[EventPublisher]:
    p = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=4)
    await p.start()
    yield p
    await p.stop()


def _backfill(broker_url: str, home: Path, directory: Path, tenant: str) -> subprocess.CompletedProcess[str]:
    env = worker_env(broker_url, home)
    return subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(directory), "--tenant", tenant,
                           "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def _by_tenant(messages: list[Msg], tenant: str) -> list[Msg]:
    return [m for m in messages if (m.json() or {}).get("tenant_id") == tenant]


async def test_backfill_bundled_files_fan_out(fresh_broker: EmbeddedBroker, home: Path,
                                              worker: WorkerProcess) -> None:
    bundled = home / "storage" / "bundled"
    for path in bundled_dicom_files():
        dest = bundled / path.relative_to(PYDICOM_TEST_FILES)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    proc = _backfill(fresh_broker.url, home, bundled, "t-bundled")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"published={len(EXPECTED)}" in proc.stdout

    accepted = {n for n, v in EXPECTED.items() if isinstance(v, Accepted)}
    rejected = {n: v for n, v in EXPECTED.items() if isinstance(v, Rejected)}
    images = await read_topic(fresh_broker.url, IMAGE, until=lambda m: len(m) >= len(accepted), timeout=90)
    logs = await read_topic(fresh_broker.url, LOG, until=lambda m: len(m) >= len(EXPECTED), timeout=30)
    dlq = await read_topic(fresh_broker.url, DLQ, until=lambda m: len(m) >= len(rejected), timeout=30)
    def instance_messages(messages: list[Msg]) -> list[Msg]:
        # the series stage sends its window flushes through the same topic ({"flush": …})
        return [m for m in messages if "flush" not in (m.json() or {})]

    instances = instance_messages(await read_topic(fresh_broker.url, SERIES_INSTANCES,
                                                   until=lambda m: len(instance_messages(m)) >= len(accepted)))

    assert len(images) == len(accepted) and len(instances) == len(accepted)
    for m in images:
        row = m.json()
        assert m.key == series_key(row["tenant_id"], row["study_uid"], row["series_uid"]).encode()
        assert row["tenant_id"] == "t-bundled" and row["image_status"] == "ACTIVE"
    statuses = Counter(m.json()["transfer_status"] for m in logs)
    assert statuses["SUCCESS"] == len(accepted)
    assert sum(statuses.values()) == len(EXPECTED)
    by_path = {m.json()["file_path"]: m.json() for m in logs}
    for name, want in EXPECTED.items():
        row = by_path[f"bundled/{name}"]
        if isinstance(want, Rejected):
            assert row["transfer_status"] == want.code, name
        else:
            assert row["transfer_status"] == "SUCCESS" and row["patient_id"] == want.patient_id, name
            assert row["source_ae"] == "BACKFILL" and row["trace_id"]
    letters = {m.json()["original"]["file_path"]: m.json() for m in dlq}
    for name, want in rejected.items():
        letter = letters[f"bundled/{name}"]
        assert (letter["error"]["code"], letter["error"]["field"]) == (want.code, want.field), name
        assert letter["stage"] == "ingest" and letter["worker"] == "worker-test" and letter["time"]


async def test_every_bad_input_class_dead_letters(fresh_broker: EmbeddedBroker, home: Path, worker: WorkerProcess,
                                                  publisher: EventPublisher, ct_small: Path, tmp_path: Path) -> None:
    storage = home / "storage"
    (storage / "ok").mkdir()
    shutil.copy(ct_small, storage / "ok" / "ct.dcm")
    (storage / "notdicom.dcm").write_text("plain text, not DICOM")
    shutil.copy(PYDICOM_TEST_FILES / "rtstruct.dcm", storage / "nodate.dcm")
    outside = tmp_path / "outside.dcm"
    shutil.copy(ct_small, outside)
    os.symlink(outside, storage / "escape.dcm")
    (storage / "unreadable_dir.dcm").mkdir()

    def ev(path: str, **extra: object) -> dict[str, object]:
        return {"tenant_id": "t-bad", "file_path": path, "trace_id": str(uuid.uuid4()), **extra}

    cases: list[tuple[bytes | dict[str, object], str]] = [
        (b"\xff\xfe not json at all", "INVALID_JSON"),
        ({"tenant_id": "t-bad", "file_path": "ok/ct.dcm"}, "INVALID_EVENT"),           # no trace_id
        (ev("ok/ct.dcm", file_size="big"), "INVALID_EVENT"),                           # wrong type
        (ev("../outside.dcm"), "PATH_ESCAPE"),
        (ev(str(outside)), "PATH_ESCAPE"),
        (ev("escape.dcm"), "PATH_ESCAPE"),
        (ev("missing/none.dcm"), "FILE_MISSING"),
        (ev("unreadable_dir.dcm"), "FILE_UNREADABLE"),
        (ev("notdicom.dcm"), "NOT_DICOM"),
        (ev("nodate.dcm"), "MISSING_REQUIRED_FIELD"),
        (ev("ok/ct.dcm"), "SUCCESS"),                                                   # the pipeline keeps going
    ]
    for value, _ in cases:
        if isinstance(value, bytes):
            await publisher.publish_raw(value, None)
        else:
            await publisher.publish(value, None)

    expected_dlq = Counter(code for _, code in cases if code != "SUCCESS")
    dlq = await read_topic(fresh_broker.url, DLQ, until=lambda m: len(m) >= sum(expected_dlq.values()), timeout=90)
    assert Counter(m.json()["error"]["code"] for m in dlq) == expected_dlq
    raw_letter = next(m.json() for m in dlq if m.json()["error"]["code"] == "INVALID_JSON")
    assert raw_letter["original"] is None and raw_letter["original_raw_base64"]
    missing_trace = next(m.json() for m in dlq if m.json()["error"]["field"] == "trace_id")
    assert "trace_id" in missing_trace["error"]["message"]
    wrong_type = next(m.json() for m in dlq if m.json()["error"]["field"] == "file_size")
    assert wrong_type["error"]["code"] == "INVALID_EVENT"

    want_logs = Counter(code for _, code in cases if code != "INVALID_JSON")
    logs = await read_topic(fresh_broker.url, LOG, until=lambda m: len(m) >= sum(want_logs.values()), timeout=30)
    assert Counter(m.json()["transfer_status"] for m in logs) == want_logs
    assert all(m.json()["tenant_id"] == "t-bad" and m.json()["trace_id"] for m in logs)


async def test_sigkill_mid_stream_loses_nothing(fresh_broker: EmbeddedBroker, home: Path, ct_small: Path) -> None:
    files = clone_series(ct_small, home / "storage" / "kill", series=6, instances=50)
    proc = _backfill(fresh_broker.url, home, home / "storage" / "kill", "t-kill")
    assert proc.returncode == 0, proc.stderr
    env = worker_env(fresh_broker.url, home)
    w1 = WorkerProcess(env, home / "worker1.log").start()
    try:
        await read_topic(fresh_broker.url, IMAGE, until=lambda m: len(m) >= 20, timeout=90)
    finally:
        w1.kill()
    mid = len({m.json()["sop_uid"] for m in await read_all(fresh_broker.url, IMAGE)})
    assert mid < len(files), "the worker finished before the kill: the test would prove nothing"
    env = fresh_web_port(env)
    w2 = WorkerProcess(env, home / "worker2.log").start()
    try:
        want = len(files)
        images = await read_topic(
            fresh_broker.url, IMAGE, until=lambda m: len({x.json()["sop_uid"] for x in m}) >= want, timeout=180)
    finally:
        w2.stop()
    # judged on content: at-least-once allows duplicates on the topic, never a missing instance
    assert {m.json()["sop_uid"] for m in images} == {_sop(p) for p in files}


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


async def test_plain_faust_cli_runs_the_app(fresh_broker: EmbeddedBroker, home: Path, ct_small: Path,
                                            publisher: EventPublisher) -> None:
    """`faust -A streams.app worker` is the same app as `dicomflow worker`."""
    shutil.copy(ct_small, home / "storage" / "ct.dcm")
    env = worker_env(fresh_broker.url, home)
    faust_bin = Path(sys.executable).with_name("faust")
    log = open(home / "faust.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(faust_bin), "-A", "streams.app", "worker", "-l", "info", "--web-port",
                             env["DICOMFLOW_WEB_PORT"]], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        await publisher.publish({"tenant_id": "t-faust", "file_path": "ct.dcm", "trace_id": "faust-cli-1"}, None)
        images = await read_topic(fresh_broker.url, IMAGE, until=lambda m: len(m) >= 1, timeout=90)
        assert images[0].json()["tenant_id"] == "t-faust"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
