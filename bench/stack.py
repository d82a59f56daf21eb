"""``dicomflow up`` as a subprocess for a benchmark, and reads of its PostgreSQL series index."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import asyncpg

from bench.procstat import descendants
from dicomflow.embedded.ports import free_port
from tests.harness import REPO

__all__ = ["UpStack", "series_rows"]

READY_LINE = "dicomflow is up"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class UpStack:
    """The whole embedded stack (broker, PostgreSQL, worker, SCP) in a fresh home; a context manager."""

    home: Path
    tenant: str
    extra_env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 120.0
    scp_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    dsn: str = ""
    startup_s: float = 0.0
    stop_s: float | None = None
    #: After SIGTERM, for this long: SIGKILL the SCP child as soon as the worker has exited (None: never).
    scp_stop_grace_s: float | None = 8.0
    scp_killed: bool = False

    @property
    def log_path(self) -> Path:
        return self.home.parent / f"{self.home.name}-up.log"

    def env(self) -> dict[str, str]:
        self.scp_port = self.scp_port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW_")}
        env.update({"DICOMFLOW_HOME": str(self.home), "DICOMFLOW_SCP_PORT": str(self.scp_port),
                    "DICOMFLOW_SCP_HOST": "127.0.0.1",
                    "DICOMFLOW_EMBEDDED_BROKER_PORT": str(free_port()), "DICOMFLOW_WEB_PORT": str(free_port()),
                    "DICOMFLOW_DEFAULT_TENANT": self.tenant, "DICOMFLOW_APP_ID": f"dicomflow-bench-{self.scp_port}",
                    "DICOMFLOW_WORKER_ID": "worker-bench", "PYTHONPATH": str(REPO)})
        env.update(self.extra_env)
        return env

    def start(self) -> UpStack:
        self.home.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        out = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomflow.cli", "up"], env=self.env(), cwd=REPO,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = started + self.start_timeout
        while READY_LINE not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dicomflow up did not come up:\n{self.log_tail(40)}")
            time.sleep(0.2)
        self.startup_s = time.monotonic() - started
        self.dsn = (self.home / "postgres.dsn").read_text().strip()
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            started = time.monotonic()
            os.killpg(self.proc.pid, signal.SIGTERM)
            if self.scp_stop_grace_s is not None:
                self._cut_scp_grace(self.scp_stop_grace_s)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            self.stop_s = time.monotonic() - started
        return self.proc.returncode

    def _cut_scp_grace(self, grace: float) -> None:
        """``dicomflow up``'s readiness probe (a bare TCP connect to the SCP) leaves an association that
        pynetdicom holds until its ACSE timeout (30 s); a stop within that time waits the SCP's full 10 s
        grace for it. The benchmark is over by then: once the worker has exited, kill the SCP (by pid)."""
        assert self.proc is not None
        deadline = time.monotonic() + grace
        while self.proc.poll() is None and time.monotonic() < deadline:
            kids = {pid: _cmdline(pid) for pid in descendants(self.proc.pid)}
            if not any("dicomflow.cli worker" in c for c in kids.values()):
                for pid, cmd in kids.items():
                    if "dicomflow.cli scp" in cmd:
                        os.kill(pid, signal.SIGKILL)
                        self.scp_killed = True
                return
            time.sleep(0.1)

    def log_tail(self, n: int = 40, name: str | None = None) -> str:
        path = self.home / "logs" / f"{name}.log" if name else self.log_path
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> UpStack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            for name in ("worker-0", "scp"):
                print(f"--- {name} log tail ({self.home / 'logs' / (name + '.log')}):\n{self.log_tail(15, name)}")
        self.stop()


async def series_rows(conn: asyncpg.Connection, study_uid: str) -> dict[str, int]:
    """series_uid -> series_related_instances of one study in dicom_state_meta (empty before the table exists)."""
    try:
        rows = await conn.fetch("SELECT series_uid, series_related_instances FROM dicom_state_meta "
                                "WHERE study_uid = $1", study_uid)
    except asyncpg.UndefinedTableError:
        return {}
    return {r["series_uid"]: int(r["series_related_instances"] or 0) for r in rows}
