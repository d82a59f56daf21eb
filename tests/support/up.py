"""`dicomflow up` as a real process on a home of its own, for the tests of the embedded stack."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from dicomflow.embedded.ports import free_port
from tests.harness import REPO

__all__ = ["UpProcess"]


class UpProcess:
    """`dicomflow up` as a real process on a home of its own."""

    def __init__(self, tmp_path: Path, **extra_env: str) -> None:
        self.home = tmp_path / "home"
        self.log = tmp_path / "up.log"
        self.scp_port, self.broker_port, self.web_port = free_port(), free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW_")}
        self.env.update({"DICOMFLOW_HOME": str(self.home), "DICOMFLOW_SCP_PORT": str(self.scp_port),
                         "DICOMFLOW_EMBEDDED_BROKER_PORT": str(self.broker_port),
                         "DICOMFLOW_WEB_PORT": str(self.web_port), "DICOMFLOW_DEFAULT_TENANT": "t-up",
                         "DICOMFLOW_SERIES_WINDOW_SECONDS": "1", "DICOMFLOW_APP_ID": f"dicomflow-up-{self.scp_port}",
                         "PYTHONPATH": str(REPO)})
        self.env.update(extra_env)
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dicomflow.cli", "up"], env=self.env, cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        await self.wait_for(lambda: "dicomflow is up" in self.text(), 120)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list[int]:
        """Every live process of this home (up, its children, the broker, PostgreSQL): those
        started with its DICOMFLOW_HOME, found in /proc whatever stack.json says."""
        mark = f"DICOMFLOW_HOME={self.home}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "stat").read_text().split(") ")[1].split()[0] == "Z":
                    continue  # a zombie nobody reaped yet is gone for our purposes
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except (OSError, IndexError):
                continue
        return pids

    async def wait_no_processes(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not left, f"still running after the stop: {left}"

    def stack(self) -> dict[str, Any]:
        try:
            return orjson.loads((self.home / "stack.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}

    async def wait_for(self, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc is not None and self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, self.text()[-3000:]
            await asyncio.sleep(0.2)

    async def counts(self) -> list[int]:
        conn = await asyncpg.connect((self.home / "postgres.dsn").read_text())
        try:
            rows = await conn.fetch("SELECT series_related_instances FROM dicom_state_meta")
        except asyncpg.UndefinedTableError:
            rows = []
        finally:
            await conn.close()
        return sorted(r["series_related_instances"] for r in rows)

    async def wait_counts(self, want: list[int], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        got: list[int] = []
        while time.monotonic() < deadline:
            got = await self.counts()
            if got == want:
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"counts {got}, want {want}\n{self.text()[-2000:]}")

    def terminate(self, timeout: float = 90) -> tuple[int, float]:
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started
