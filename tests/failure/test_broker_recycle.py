"""A long-running `up` recycles its embedded broker at drained points and loses nothing (issue #13).

The embedded broker never frees what it stores, so `up` replaces it with an empty one once its
memory passes DICOMFLOW_BROKER_RECYCLE_MB. Here the cap is 1 MB: the stack recycles at every
drained point it finds, while instances keep arriving through a real SCU and a backfill brings
a dead letter. Afterwards every acknowledged instance is in PostgreSQL with exact counts and in
the Stream Load emulator exactly once, and the dead letter is still on its topic.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pydicom
import pytest

from dicomflow.tools.scu import send_paths
from tests.doris_emulator import DorisEmulator
from tests.harness import REPO, clone_series
from tests.support.up import UpProcess

pytestmark = pytest.mark.integration


async def _send(files: list[Path], up: UpProcess) -> None:
    summary = await asyncio.to_thread(send_paths, files, "127.0.0.1", up.scp_port, "DICOMFLOW")
    assert summary.succeeded == len(files), summary


def _status(up: UpProcess) -> dict:  # type: ignore[type-arg]
    out = subprocess.run([sys.executable, "-m", "dicomflow.cli", "status", "--json"], env=up.env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return orjson.loads(out.stdout)  # type: ignore[no-any-return]


async def test_the_broker_is_recycled_at_drained_points_without_loss(tmp_path: Path, ct_small: Path,
                                                                     doris_emulator: DorisEmulator) -> None:
    up = UpProcess(tmp_path, DICOMFLOW_BROKER_RECYCLE_MB="1", DICOMFLOW_RELAY_DRAIN_SECONDS="30",
                   DICOMFLOW_DORIS_FE_URL=doris_emulator.fe_url, DICOMFLOW_DORIS_USER=doris_emulator.user,
                   DICOMFLOW_DORIS_PASSWORD=doris_emulator.password, DICOMFLOW_DORIS_MAX_INTERVAL="1")
    try:
        await up.start()
        first_broker = up.stack()["broker"]
        batches = [clone_series(ct_small, tmp_path / f"send{i}", series=2, instances=5) for i in range(3)]
        await _send(batches[0], up)
        # A file the pipeline refuses (no SeriesInstanceUID): its dead letter must outlive the broker.
        bad = up.home / "storage" / "bad" / "no-series.dcm"
        bad.parent.mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(batches[0][0])
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        del ds.SeriesInstanceUID
        ds.save_as(bad)
        backfill = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "dicomflow.cli", "backfill", str(bad.parent), "--tenant", "t-up",
                             "--no-progress"],
            env=up.env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert backfill.returncode == 0, backfill.stderr
        await up.wait_for(lambda: up.stack().get("broker_recycles", 0) >= 1, 120)
        # instances keep arriving while the stack recycles again and again
        await _send(batches[1], up)
        # (at most one recycle a minute, whatever the memory)
        await up.wait_for(lambda: up.stack().get("broker_recycles", 0) >= 2, 180)
        await _send(batches[2], up)
        await up.wait_counts([5] * 6, 180)

        def doris_exact() -> bool:
            images = {r["sop_uid"] for r in doris_emulator.rows("dicom_image_meta")}
            logs = collections.Counter(r["trace_id"] for r in doris_emulator.rows("dicom_object_meta")
                                       if r["transfer_status"] == "SUCCESS")
            return len(images) == 30 and len(logs) == 30 and max(logs.values()) == 1

        await up.wait_for(doris_exact, 120)
        deadline = time.monotonic() + 60
        letters: dict = {}  # type: ignore[type-arg]
        while time.monotonic() < deadline:
            letters = _status(up)["dead_letters"]["storage_queue_dlq"]
            if letters:
                break
            await asyncio.sleep(1)
        assert sum(letters.values()) == 1, letters
        assert "recycled" in up.text() and up.stack()["broker"] == first_broker
        assert (up.home / "deadletters" / "archive.jsonl").read_bytes().count(b"\n") == 1
    finally:
        code, _took = await asyncio.to_thread(up.terminate, 120)
    assert code == 0, up.text()[-3000:]
    assert doris_exact(), "rows loaded again while the stack stopped"
