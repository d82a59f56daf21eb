"""The peer: Orthanc with its PostgreSQL index, fed the same files by the same sender.

Debian's ``orthanc`` and ``orthanc-postgresql`` (benchmark-only; not installed by CI). Orthanc
answers a C-STORE once the file is stored (``SyncStorageArea``: fsynced) and the instance
is in its index, so "every row visible" is the last response; the run still polls
``/statistics`` until Orthanc counts every instance. PostgreSQL is a fresh embedded cluster
(the same pgserver build dicomflow uses). CPU is read from /proc for Orthanc and the
PostgreSQL server with its backends, the sender excluded.

When Orthanc or its plugin is missing, :func:`run_peer` returns None and callers state
:data:`LAST_MEASURED` instead.

    python -m bench.peer_orthanc --instances 5000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bench.clones import build_fast
from bench.procstat import tree_cpu_seconds
from bench.senders import send_files
from dicomflow.embedded.ports import free_port, wait_for_port
from dicomflow.embedded.postgres import EmbeddedPostgres

__all__ = ["LAST_MEASURED", "orthanc_available", "postmaster_pid", "run_peer"]

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"
AET = "DICOMFLOW"
#: The last figure measured on this machine (bench.cost, 5,000 CT instances, storescu, one association).
LAST_MEASURED: dict[str, Any] = {"date": "2026-12-02", "system": "Orthanc 1.10.1 + PostgreSQL index (plugin 4.0)",
                                 "rate": 110.2, "cpu_ms_per_instance": 6.99,
                                 "source": "bench.cost on a quiet machine (load 1.2); 90.9 inst/s, 8.25 ms in the run "
                                           "before, 52-80 inst/s under load"}


def orthanc_available() -> bool:
    return Path(ORTHANC).is_file() and Path(PLUGIN).is_file()


def postmaster_pid(pgdata: Path) -> int | None:
    """The postmaster's pid from ``postmaster.pid`` (its first line)."""
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as rsp:  # noqa: S310 - loopback
        return json.loads(rsp.read())


def _config(work: Path, dicom_port: int, http_port: int, dsn: str) -> dict[str, Any]:
    parts = urlsplit(dsn)
    return {
        "Name": "bench-peer", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "DicomAet": AET, "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "StorageCompression": False,
        "SyncStorageArea": True, "Plugins": [PLUGIN],
        "PostgreSQL": {"EnableIndex": True, "EnableStorage": False, "Host": parts.hostname, "Port": parts.port,
                       "Database": parts.path.lstrip("/"), "Username": parts.username,
                       "Password": unquote(parts.password or ""), "Lock": False,
                       "IndexConnectionsCount": 1},
    }


def run_peer(files: list[Path], work: Path, *, sender: str = "storescu",
             timeout: float = 900.0) -> dict[str, Any] | None:
    """Send ``files`` to a fresh Orthanc + PostgreSQL; rate until Orthanc counts them all, CPU per instance."""
    if not orthanc_available():
        return None
    work.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(work / "postgres").start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        dicom_port, http_port = free_port(), free_port()
        config = work / "orthanc.json"
        config.write_text(json.dumps(_config(work, dicom_port, http_port, pg.dsn)))
        with open(work / "orthanc.log", "wb") as log:
            # Orthanc's DICOM layer is dcmtk, which stalls ~40 ms per response without TCP_NODELAY
            # (Nagle against the sender's delayed ACK), as storescu does (bench/senders.py).
            proc = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "TCP_NODELAY": "1"})
        base = f"http://127.0.0.1:{http_port}"
        if not (wait_for_port("127.0.0.1", http_port, 60) and wait_for_port("127.0.0.1", dicom_port, 60)):
            raise RuntimeError(f"Orthanc did not start: {(work / 'orthanc.log').read_text()[-1500:]}")
        pg_pid = postmaster_pid(pg.pgdata)
        version = _get(f"{base}/system").get("Version", "?")
        time.sleep(1.0)
        cpu0 = {"orthanc": tree_cpu_seconds(proc.pid), "postgres": tree_cpu_seconds(pg_pid) if pg_pid else None}
        load0 = os.getloadavg()
        timing = send_files(files, "127.0.0.1", dicom_port, AET, sender=sender, timeout=timeout)
        if not timing.ok:
            raise RuntimeError(f"send to Orthanc failed: {timing.detail}")
        deadline = time.monotonic() + 120
        while (count := int(_get(f"{base}/statistics")["CountInstances"])) < len(files):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc counts {count} of {len(files)} instances")
            time.sleep(0.1)
        visible = time.monotonic()
        cpu1 = {"orthanc": tree_cpu_seconds(proc.pid), "postgres": tree_cpu_seconds(pg_pid) if pg_pid else None}
        cpu = {k: (cpu1[k] or 0.0) - (cpu0[k] or 0.0) for k in cpu0}
        n = len(files)
        return {"system": f"Orthanc {version} + PostgreSQL index", "sender": timing.sender, "instances": n,
                "seconds": visible - timing.started, "rate": n / (visible - timing.started),
                "receive_rate": n / timing.seconds, "cpu_s": cpu,
                "cpu_ms_per_instance": {k: 1000 * v / n for k, v in cpu.items()},
                "cpu_ms_per_instance_total": 1000 * sum(cpu.values()) / n, "loadavg": [load0, os.getloadavg()]}
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pg.stop(mode="immediate")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--per-series", type=int, default=100)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dicomflow-bench-peer-"))
    try:
        ds = build_fast(work / "send", instances=args.instances, series=max(1, args.instances // args.per_series))
        result = run_peer(ds.files, work / "orthanc")
        print(json.dumps(result if result is not None else {"absent": True, "last_measured": LAST_MEASURED},
                         indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
