"""The embedded default keeps every acknowledged instance (issue #13).

Real processes: `dicomflow up` (embedded Tansu, embedded PostgreSQL, worker, relay, SCP), a
real SCU (pynetdicom), and the Stream Load emulator as Doris. For each kind of stop, the
stack is stopped while events are in flight, started again on the same home, one series
grows by an instance, and then every acknowledged instance must be in PostgreSQL with exact
counts and in each Doris table.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from pathlib import Path

import asyncpg
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomflow.tools.scu import send_paths
from tests.doris_emulator import DorisEmulator
from tests.harness import clone_series
from tests.support.up import UpProcess

pytestmark = pytest.mark.integration

SERIES, PER_SERIES = 6, 10


def _tree_pids(root: int) -> list[int]:
    """``root`` and every process below it (children run in sessions of their own)."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _postmaster(home: Path) -> int | None:
    try:
        return int((home / "postgres" / "pgdata" / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


async def _pg_counts(up: UpProcess) -> dict[str, int]:
    try:
        conn = await asyncpg.connect((up.home / "postgres.dsn").read_text())
    except (OSError, asyncpg.CannotConnectNowError):  # PostgreSQL is being brought back by up
        return {}
    try:
        rows = await conn.fetch("SELECT series_uid, series_related_instances FROM dicom_state_meta")
    except asyncpg.UndefinedTableError:
        rows = []
    finally:
        await conn.close()
    return {r["series_uid"]: r["series_related_instances"] for r in rows}


async def _eventually(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last is True:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: {last}")


@pytest.mark.parametrize("stop", ["sigterm", "sigkill_all", "sigkill_worker", "sigkill_broker", "sigkill_scp",
                                  "sigkill_postgres"])
async def test_acknowledged_instances_survive_every_stop(stop: str, tmp_path: Path, ct_small: Path,
                                                         doris_emulator: DorisEmulator) -> None:
    doris = {"DICOMFLOW_DORIS_FE_URL": doris_emulator.fe_url, "DICOMFLOW_DORIS_USER": doris_emulator.user,
             "DICOMFLOW_DORIS_PASSWORD": doris_emulator.password, "DICOMFLOW_DORIS_MAX_INTERVAL": "1"}
    up = UpProcess(tmp_path, **doris)
    files = clone_series(ct_small, tmp_path / "send", series=SERIES, instances=PER_SERIES)
    # after the restart: a new instance of an existing series, and an instance sent again
    grow = [_another_instance_of(files[0], tmp_path / "grow"), files[1]]
    try:
        await up.start()
        summary = await asyncio.to_thread(send_paths, files, "127.0.0.1", up.scp_port, "DICOMFLOW")
        assert summary.succeeded == len(files), summary  # every one acknowledged: a promise
        assert up.proc is not None
        if stop == "sigterm":
            started = time.monotonic()
            # in a thread: the Stream Load emulator runs on this test's event loop and must keep serving
            code, _ = await asyncio.to_thread(up.terminate, 120)
            assert code == 0, up.text()[-3000:]
            # a drained stop: the relay checkpointed everything, nothing is published again
            assert "not drained" not in (up.home / "logs" / "relay.log").read_text()
            assert time.monotonic() - started < 60, up.text()[-2000:]
        elif stop == "sigkill_all":  # a power loss: everything at once, PostgreSQL included
            pids = _tree_pids(up.proc.pid) + [p for p in [_postmaster(up.home)] if p]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            up.proc.wait(timeout=10)
        else:
            child = {"sigkill_worker": "worker-0", "sigkill_scp": "scp"}.get(stop)
            if child is not None:
                os.killpg(up.stack()["children"][child]["pid"], signal.SIGKILL)
            elif stop == "sigkill_postgres":
                postmaster = _postmaster(up.home)
                assert postmaster, "no postmaster"
                os.kill(postmaster, signal.SIGKILL)
            else:
                broker = [p for p in _tree_pids(up.proc.pid) if "tansu" in open(f"/proc/{p}/cmdline").read()]
                assert broker, "no broker process"
                os.kill(broker[0], signal.SIGKILL)
        if stop in ("sigterm", "sigkill_all"):
            again = UpProcess(tmp_path, **doris)
            again.home, again.env, again.scp_port = up.home, up.env, up.scp_port
            again.log = tmp_path / "up2.log"
            up = again
            await up.start()
        else:
            # up noticed and brought the dead part back (its own log line for each)
            await up.wait_for(lambda: any(line in up.text() for line in (
                "restarted (pid", "starting a new one", "starting it again")), 60)
        # the stack serves: one series grows after the stop, one instance comes again
        await _eventually(lambda: _send(grow, up), 60, "the SCP took the new instances")

        instances = len(files) + 1
        transfers = len(files) + 2
        want_counts = sorted([PER_SERIES] * (SERIES - 1) + [PER_SERIES + 1])

        async def exact() -> bool | list[int]:
            counts = sorted((await _pg_counts(up)).values())
            return True if counts == want_counts else counts

        await _eventually(exact, 180, f"PostgreSQL counts, want {want_counts}")

        def doris_exact() -> bool | str:
            images = doris_emulator.rows("dicom_image_meta")
            logs = [r for r in doris_emulator.rows("dicom_object_meta") if r["transfer_status"] == "SUCCESS"]
            per_trace = collections.Counter(r["trace_id"] for r in logs)
            states = doris_emulator.rows("dicom_state_meta")
            if len({r["sop_uid"] for r in images}) != instances or len(per_trace) != transfers:
                return f"images={len(images)} traces={len(per_trace)}"
            dups = {t: n for t, n in per_trace.items() if n > 1}
            if dups:
                return f"transfer-log rows loaded twice: {dups}"
            if sorted(r["series_related_instances"] for r in states) != want_counts:
                return f"state counts {sorted(r['series_related_instances'] for r in states)}"
            return True

        async def doris_check() -> bool | str:
            return doris_exact()

        await _eventually(doris_check, 120, "Doris rows")
    finally:
        if up.proc is not None and up.proc.poll() is None:
            await asyncio.to_thread(up.terminate, 120)


def _another_instance_of(src: Path, folder: Path) -> Path:
    """A new SOP instance in the same study and series as ``src``."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "grown.dcm"
    ds.save_as(out)
    return out


async def _send(files: list[Path], up: UpProcess) -> bool | str:
    summary = await asyncio.to_thread(send_paths, files, "127.0.0.1", up.scp_port, "DICOMFLOW")
    return True if summary.succeeded == len(files) else str(summary)
