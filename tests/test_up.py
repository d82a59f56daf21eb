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
from tests.support.up import UpProcess

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


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie no one reaps yet is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


async def test_up_restarts_a_killed_worker_and_keeps_serving(tmp_path: Path, ct_small: Path) -> None:
    up = UpProcess(tmp_path)
    try:
        await up.start()
        first = clone_series(ct_small, tmp_path / "a", series=1, instances=2)
        assert (await asyncio.to_thread(send_paths, first, "127.0.0.1", up.scp_port, "DICOMFLOW")).succeeded == 2
        await up.wait_counts([2])
        worker = up.stack()["children"]["worker-0"]
        os.killpg(worker["pid"], signal.SIGKILL)
        await up.wait_for(lambda: up.stack().get("children", {}).get("worker-0", {}).get("restarts") == 1
                          and up.stack()["children"]["worker-0"]["running"]
                          and up.stack()["children"]["worker-0"]["pid"] != worker["pid"], 60)
        assert "worker-0 exited" in up.text() and "restarted" in up.text()
        # the SCP kept serving all along, and the new worker indexes what arrives now
        more = clone_series(ct_small, tmp_path / "b", series=1, instances=3)
        assert (await asyncio.to_thread(send_paths, more, "127.0.0.1", up.scp_port, "DICOMFLOW")).succeeded == 3
        await up.wait_counts([2, 3])
        status = subprocess.run([sys.executable, "-m", "dicomflow.cli", "status", "--json"], env=up.env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert orjson.loads(status.stdout)["children"]["worker-0"]["restarts"] == 1, status.stdout
    finally:
        code, took = up.terminate()
    assert code == 0, up.text()[-3000:]
    assert took < 20, f"an idle stack took {took:.1f} s to stop"


async def test_children_die_with_a_killed_up_and_the_next_up_starts(tmp_path: Path) -> None:
    up = UpProcess(tmp_path)
    await up.start()
    pids = [c["pid"] for c in up.stack()["children"].values()]
    assert up.proc is not None
    os.kill(up.proc.pid, signal.SIGKILL)  # what the OOM killer or a service manager's timeout does
    up.proc.wait(timeout=10)
    deadline = time.monotonic() + 60
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    deadline = time.monotonic() + 30
    while wait_for_port("127.0.0.1", up.broker_port, 0.2) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not wait_for_port("127.0.0.1", up.web_port, 0.2), "the orphaned worker kept its web port"
    # the next `up` on the same home starts (the stale stack.json names a dead pid)
    again = UpProcess(tmp_path)
    again.home, again.env = up.home, up.env
    again.log = tmp_path / "up2.log"
    try:
        await again.start()
    finally:
        code, _ = again.terminate()
    assert code == 0, again.text()[-3000:]


async def test_a_second_up_on_a_live_home_is_refused(tmp_path: Path) -> None:
    up = UpProcess(tmp_path)
    try:
        await up.start()
        second = subprocess.run([sys.executable, "-m", "dicomflow.cli", "up"], env=up.env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "already running" in second.stderr and str(up.proc.pid if up.proc else "") in second.stderr
    finally:
        code, _ = up.terminate()
    assert code == 0


def _start_up(up: UpProcess) -> None:
    with open(up.log, "ab") as out:
        up.proc = subprocess.Popen([sys.executable, "-m", "dicomflow.cli", "up"], env=up.env, cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def test_a_stop_asked_while_up_is_still_starting_drains_instead_of_killing_it(tmp_path: Path) -> None:
    """SIGTERM (a service manager, the tests' own stop) can come before the stack is supervised:
    while the children start, or while the banner is printed. It used to kill `up` outright
    (exit -15, children half up); it is now honoured as a stop once the stack is started:
    exit 0, every child gone, the ports closed."""
    up = UpProcess(tmp_path)
    _start_up(up)
    # Mid-start: the children are spawned (stack.json lists them), the SCP is not accepting yet.
    await up.wait_for(lambda: bool(up.stack().get("children")), 120)
    children = [c["pid"] for c in up.stack()["children"].values()]
    assert len(children) == 3 and up.processes(), up.stack()  # worker, relay, scp; and the servers
    os.kill(up.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]  # to `up` alone, as a service manager does
    code = up.proc.wait(timeout=120)  # type: ignore[union-attr]
    assert code == 0, up.text()[-3000:]
    assert "stop asked while starting" in up.text() and "dicomflow is up" not in up.text(), up.text()[-3000:]
    await up.wait_no_processes()
    assert all(_gone(p) for p in children)
    assert not wait_for_port("127.0.0.1", up.scp_port, 0.2)
    assert not wait_for_port("127.0.0.1", up.broker_port, 0.2)


async def test_a_stop_asked_before_the_children_start_starts_none_of_them(tmp_path: Path) -> None:
    """Asked while the broker and PostgreSQL are still starting (PostgreSQL's first start takes
    seconds), `up` starts no child at all, stops the servers and exits 0; a second stop signal
    is not needed, but it is accepted."""
    up = UpProcess(tmp_path)
    _start_up(up)
    await up.wait_for(lambda: "embedded broker listening" in up.text(), 120)
    os.kill(up.proc.pid, signal.SIGINT)  # type: ignore[union-attr]  # Ctrl-C
    code = up.proc.wait(timeout=120)  # type: ignore[union-attr]
    assert code == 0, up.text()[-3000:]
    assert "stop asked while starting" in up.text(), up.text()[-3000:]
    assert not (up.home / "logs" / "scp.log").exists() and not (up.home / "logs" / "worker-0.log").exists()
    await up.wait_no_processes()
    assert not wait_for_port("127.0.0.1", up.broker_port, 0.2)


async def test_a_second_stop_signal_kills_instead_of_draining(tmp_path: Path) -> None:
    """Ctrl-C twice: the drain (up to a minute with a stuck destination) is cut short; every
    child is killed, which loses nothing acknowledged (the journal keeps it), and `up` exits 0."""
    up = UpProcess(tmp_path)
    await up.start()
    os.kill(up.proc.pid, signal.SIGINT)  # type: ignore[union-attr]
    await up.wait_for(lambda: "dicomflow: stopping" in up.text(), 30)
    os.kill(up.proc.pid, signal.SIGINT)  # type: ignore[union-attr]
    code = up.proc.wait(timeout=60)  # type: ignore[union-attr]
    assert code == 0, up.text()[-3000:]
    assert "stop asked again" in up.text(), up.text()[-3000:]
    await up.wait_no_processes()
