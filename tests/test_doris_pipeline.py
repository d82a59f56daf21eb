"""The Doris sink stage end to end: real worker process, real Tansu broker, the Stream Load emulator."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicomflow.embedded.broker import EmbeddedBroker
from tests.conftest import PYDICOM_TEST_FILES
from tests.doris_emulator import DorisEmulator
from tests.fixtures_doris import DORIS_DB, DORIS_PASSWORD, DORIS_USER
from tests.harness import REPO, WorkerProcess, clone_series, fresh_web_port, worker_env

pytestmark = pytest.mark.integration



def _env(broker: EmbeddedBroker, home: Path, emulator: DorisEmulator, **extra: str) -> dict[str, str]:
    return worker_env(broker.url, home, DICOMFLOW_DORIS_FE_URL=emulator.fe_url, DICOMFLOW_DORIS_USER=DORIS_USER,
                      DICOMFLOW_DORIS_PASSWORD=DORIS_PASSWORD, DICOMFLOW_DORIS_DATABASE=DORIS_DB,
                      DICOMFLOW_DORIS_MAX_INTERVAL="0.5", **extra)


def _backfill(env: dict[str, str], directory: Path, tenant: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(directory), "--tenant", tenant,
                           "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def _until(pred: Callable[[], bool], timeout: float, what: Callable[[], Any]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"deadline: {what()}")


def _state(emulator: DorisEmulator) -> dict[str, Any]:
    return {t: len(emulator.rows(t)) for t in ("dicom_state_meta", "dicom_image_meta", "dicom_object_meta")}


async def test_happy_path_three_tables(fresh_broker: EmbeddedBroker, tmp_path: Path,
                                       doris_emulator: DorisEmulator, ct_small: Path) -> None:
    home = tmp_path / "home"
    files = clone_series(ct_small, home / "storage" / "ok", series=2, instances=20)
    shutil.copy(PYDICOM_TEST_FILES / "rtstruct.dcm", home / "storage" / "ok" / "zz_nodate.dcm")
    env = _env(fresh_broker, home, doris_emulator)
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        _backfill(env, home / "storage" / "ok", "t-doris")
        want = {"dicom_state_meta": 2, "dicom_image_meta": len(files), "dicom_object_meta": len(files) + 1}

        def done() -> bool:
            counts = sorted(r["series_related_instances"] for r in doris_emulator.rows("dicom_state_meta"))
            return _state(doris_emulator) == want and counts == [20, 20]

        await _until(done, 120, lambda: (_state(doris_emulator), worker.log_tail(20)))
    finally:
        worker.stop()
    objects = doris_emulator.rows("dicom_object_meta")
    assert Counter(r["transfer_status"] for r in objects) == {"SUCCESS": len(files), "MISSING_REQUIRED_FIELD": 1}
    assert len({r["trace_id"] for r in objects}) == len(objects)
    assert all(load.status in ("Success", "Label Already Exists") for load in doris_emulator.loads)


async def test_sigkill_mid_batch_no_duplicate_trace_ids(fresh_broker: EmbeddedBroker, tmp_path: Path,
                                                        doris_emulator: DorisEmulator, ct_small: Path) -> None:
    home = tmp_path / "home"
    files = clone_series(ct_small, home / "storage" / "kill", series=4, instances=60)
    env = _env(fresh_broker, home, doris_emulator, DICOMFLOW_DORIS_MAX_ROWS="50")
    _backfill(env, home / "storage" / "kill", "t-kill")
    w1 = WorkerProcess(env, home / "w1.log").start()
    try:
        await _until(lambda: len(doris_emulator.rows("dicom_object_meta")) >= 50, 120,
                     lambda: _state(doris_emulator))
    finally:
        w1.kill()
    assert len(doris_emulator.rows("dicom_object_meta")) < len(files), "killed too late to prove anything"
    env2 = fresh_web_port(env)
    w2 = WorkerProcess(env2, home / "w2.log").start()
    try:
        # Both tables load independently (own batches, own flush timers): wait for each.
        await _until(lambda: len({r["trace_id"] for r in doris_emulator.rows("dicom_object_meta")}) >= len(files)
                     and len({r["sop_uid"] for r in doris_emulator.rows("dicom_image_meta")}) >= len(files),
                     180, lambda: (_state(doris_emulator), w2.log_tail(20)))
        await asyncio.sleep(2.0)  # give any (wrong) duplicate load the chance to show up
    finally:
        w2.stop()
    objects = doris_emulator.rows("dicom_object_meta")
    traces = Counter(r["trace_id"] for r in objects)
    assert len(objects) == len(files), f"duplicates: {[t for t, n in traces.items() if n > 1][:5]}"
    assert len(doris_emulator.rows("dicom_image_meta")) == len(files)


@pytest.mark.parametrize("fault", ["fail", "publish_timeout", "http500", "reset", "reset_after_commit", "slow"])
async def test_each_fault_nothing_lost_nothing_duplicated(fresh_broker: EmbeddedBroker, tmp_path: Path,
                                                          doris_emulator: DorisEmulator, ct_small: Path,
                                                          fault: str) -> None:
    home = tmp_path / "home"
    files = clone_series(ct_small, home / "storage" / "f", series=2, instances=15)
    doris_emulator.inject(fault, seconds=2.0, count=3)  # type: ignore[arg-type]
    env = _env(fresh_broker, home, doris_emulator)
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        _backfill(env, home / "storage" / "f", "t-fault")
        await _until(lambda: len(doris_emulator.rows("dicom_object_meta")) >= len(files)
                     and len(doris_emulator.rows("dicom_image_meta")) >= len(files)
                     and len(doris_emulator.rows("dicom_state_meta")) == 2, 120,
                     lambda: (_state(doris_emulator), worker.log_tail(20)))
        await asyncio.sleep(1.0)
    finally:
        worker.stop()
    objects = doris_emulator.rows("dicom_object_meta")
    assert len(objects) == len({r["trace_id"] for r in objects}) == len(files)
    assert len(doris_emulator.rows("dicom_image_meta")) == len(files)


async def test_replayed_dead_letter_adds_its_success_row(fresh_broker: EmbeddedBroker, tmp_path: Path,
                                                         doris_emulator: DorisEmulator, ct_small: Path) -> None:
    """A file that was missing, then restored and replayed, ends with both outcomes logged once each."""
    from core.settings import EMBEDDED_PROFILE
    from feeders.publisher import EventPublisher

    home = tmp_path / "home"
    (home / "storage").mkdir(parents=True)
    env = _env(fresh_broker, home, doris_emulator)
    worker = WorkerProcess(env, home / "worker.log").start()
    publisher = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=4)
    await publisher.start()
    try:
        await publisher.publish({"tenant_id": "t-replay", "file_path": "late/ct.dcm", "trace_id": "trace-replay-1"},
                                None)
        await _until(lambda: len(doris_emulator.rows("dicom_object_meta")) == 1, 90, lambda: worker.log_tail(20))
        assert doris_emulator.rows("dicom_object_meta")[0]["transfer_status"] == "FILE_MISSING"
        (home / "storage" / "late").mkdir()
        shutil.copy(ct_small, home / "storage" / "late" / "ct.dcm")
        proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "replay-dlq", "--code", "FILE_MISSING"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "replayed=1" in proc.stdout, proc.stdout + proc.stderr
        await _until(lambda: len(doris_emulator.rows("dicom_image_meta")) == 1
                     and len(doris_emulator.rows("dicom_object_meta")) == 2, 90, lambda: worker.log_tail(20))
        # --resume replays a letter once: the first run takes it, the next finds nothing new.
        resumed = [subprocess.run([sys.executable, "-m", "dicomflow.cli", "replay-dlq", "--code", "FILE_MISSING",
                                   "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
                   for _ in range(2)]
        assert [r.returncode for r in resumed] == [0, 0], [r.stdout + r.stderr for r in resumed]
        assert "replayed=1 " in resumed[0].stdout and "already_done=0" in resumed[0].stdout, resumed[0].stdout
        assert "replayed=0 " in resumed[1].stdout and "already_done=1" in resumed[1].stdout, resumed[1].stdout
    finally:
        await publisher.stop()
        worker.stop()
    statuses = sorted((r["trace_id"], r["transfer_status"]) for r in doris_emulator.rows("dicom_object_meta"))
    assert statuses == [("trace-replay-1", "FILE_MISSING"), ("trace-replay-1", "SUCCESS")]
