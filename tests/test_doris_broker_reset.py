"""A broker reset must not reuse Doris labels (issue 13 item 4): real workers, two brokers, one Doris."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomflow.embedded.broker import EmbeddedBroker
from tests.doris_emulator import DorisEmulator
from tests.fixtures_doris import DORIS_DB, DORIS_PASSWORD, DORIS_USER
from tests.harness import REPO, WorkerProcess, clone_series, worker_env

pytestmark = pytest.mark.integration

OBJECT = "dicom_object_meta"


def _env(broker: EmbeddedBroker, home: Path, emulator: DorisEmulator) -> dict[str, str]:
    # One partition, batches of 5: both runs cut log_queue into the same offset ranges.
    return worker_env(broker.url, home, DICOMFLOW_DORIS_FE_URL=emulator.fe_url, DICOMFLOW_DORIS_USER=DORIS_USER,
                      DICOMFLOW_DORIS_PASSWORD=DORIS_PASSWORD, DICOMFLOW_DORIS_DATABASE=DORIS_DB,
                      DICOMFLOW_DORIS_MAX_ROWS="5", DICOMFLOW_DORIS_MAX_INTERVAL="2", DICOMFLOW_PARTITIONS="1")


async def _run(broker: EmbeddedBroker, home: Path, emulator: DorisEmulator, ct_small: Path, want: int) -> None:
    clone_series(ct_small, home / "storage" / "s", series=1, instances=10)
    env = _env(broker, home, emulator)
    proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(home / "storage" / "s"),
                           "--tenant", "t-reset", "--no-progress"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        deadline = time.monotonic() + 90
        while len(emulator.rows(OBJECT)) < want and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)  # let every batch of this run reach Doris (or be refused)
    finally:
        worker.stop()
    assert len(emulator.rows(OBJECT)) >= want, (
        [(x.label, x.status) for x in emulator.loads if x.table == OBJECT], worker.log_tail(30))


async def test_a_reset_broker_loads_its_rows_under_new_labels(fresh_broker: EmbeddedBroker, tmp_path: Path,
                                                              doris_emulator: DorisEmulator,
                                                              ct_small: Path) -> None:
    await _run(fresh_broker, tmp_path / "home1", doris_emulator, ct_small, 10)
    first = {x.label for x in doris_emulator.loads if x.table == OBJECT and x.status == "Success"}
    # The broker is reset (the embedded one keeps nothing): offsets start at 0 again.
    with EmbeddedBroker(log_path=tmp_path / "tansu2.log") as reset:
        await _run(reset, tmp_path / "home2", doris_emulator, ct_small, 20)
    objects = doris_emulator.rows(OBJECT)
    assert len(objects) == len({r["trace_id"] for r in objects}) == 20
    second = {x.label for x in doris_emulator.loads if x.table == OBJECT and x.status == "Success"} - first
    assert second and not any(x.status == "Label Already Exists" for x in doris_emulator.loads)
