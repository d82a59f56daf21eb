"""`dicomflow up`, the README's first command: the whole embedded stack, end to end, then a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from dicomflow.embedded.ports import free_port, wait_for_port
from dicomflow.tools.scu import send_paths
from tests.harness import REPO, clone_series

pytestmark = pytest.mark.integration


async def test_up_receives_indexes_and_stops_cleanly(tmp_path: Path, ct_small: Path) -> None:
    home = tmp_path / "home"
    scp_port, broker_port, web_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW_")}
    env.update({"DICOMFLOW_HOME": str(home), "DICOMFLOW_SCP_PORT": str(scp_port),
                "DICOMFLOW_EMBEDDED_BROKER_PORT": str(broker_port), "DICOMFLOW_WEB_PORT": str(web_port),
                "DICOMFLOW_DEFAULT_TENANT": "t-up", "DICOMFLOW_SERIES_WINDOW_SECONDS": "1",
                "DICOMFLOW_APP_ID": f"dicomflow-up-{scp_port}", "PYTHONPATH": str(REPO)})
    out = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "dicomflow.cli", "up"], env=env, cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "dicomflow is up" not in (tmp_path / "up.log").read_text(errors="replace"):
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            await asyncio.sleep(0.3)
        printed = (tmp_path / "up.log").read_text()
        assert f":{scp_port}" in printed and f":{broker_port}" in printed and "/metrics" in printed

        files = clone_series(ct_small, tmp_path / "send", series=2, instances=3, patient_name="\u674e^\u534e")
        summary = await asyncio.to_thread(send_paths, files, "127.0.0.1", scp_port, "DICOMFLOW")
        assert summary.ok and summary.succeeded == 6, summary

        dsn = (home / "postgres.dsn").read_text()
        rows: list[asyncpg.Record] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            conn = await asyncpg.connect(dsn)
            try:
                rows = await conn.fetch("SELECT patient_name, series_related_instances, tenant_id "
                                        "FROM dicom_state_meta")
            except asyncpg.UndefinedTableError:
                rows = []
            finally:
                await conn.close()
            if sorted(r["series_related_instances"] for r in rows) == [3, 3]:
                break
            await asyncio.sleep(0.5)
        assert sorted(r["series_related_instances"] for r in rows) == [3, 3], rows
        assert {r["patient_name"] for r in rows} == {"\u674e^\u534e"} and {r["tenant_id"] for r in rows} == {"t-up"}

        status = subprocess.run([sys.executable, "-m", "dicomflow.cli", "status", "--json"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        report = orjson.loads(status.stdout)
        assert report["postgres_dsn"].startswith("postgresql://") and "****" in report["postgres_dsn"]
        assert sum(p["end_offset"] for p in report["topics"]["storage_queue"]) == 6
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=90)
        out.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert not wait_for_port("127.0.0.1", scp_port, 0.5), "SCP still listening after stop"
    assert not wait_for_port("127.0.0.1", broker_port, 0.5), "broker still listening after stop"
