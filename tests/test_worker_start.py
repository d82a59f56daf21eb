"""A worker starts on a DICOMFLOW_HOME that does not exist yet (review defect, issue #14 §7)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from dicomflow.embedded.broker import EmbeddedBroker
from tests.harness import WorkerProcess, worker_env


def _metrics(port: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            return resp.read().decode()
    except OSError:
        return None


def test_worker_creates_a_missing_home(fresh_broker: EmbeddedBroker, tmp_path: Path) -> None:
    home = tmp_path / "not-yet" / "home"  # neither exists; the parent of the parent does
    env = worker_env(fresh_broker.url, home)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(env, log).start()
    try:
        deadline = time.monotonic() + 60
        text = None
        while time.monotonic() < deadline and text is None:
            assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
            text = _metrics(env["DICOMFLOW_WEB_PORT"])
            time.sleep(0.2)
        assert text is not None and "dicomflow_" in text, worker.log_tail()
        assert home.is_dir()
    finally:
        worker.stop()
