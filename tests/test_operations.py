"""Operations: `status --json` lag, the worker's /metrics, and the compose file."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import yaml

from core.settings import EMBEDDED_PROFILE
from dicomflow.embedded.broker import EmbeddedBroker
from feeders.publisher import EventPublisher
from streams.topology import IMAGE
from tests.harness import REPO, WorkerProcess, clone_series, read_topic, worker_env

pytestmark = pytest.mark.integration



def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310 - loopback
        return str(resp.read().decode())


def _value(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting with {line_prefix!r}")


async def test_status_lag_and_metrics(fresh_broker: EmbeddedBroker, tmp_path: Path, ct_small: Path,
                                      pg_dsn: str) -> None:
    home = tmp_path / "home"
    clone_series(ct_small, home / "storage" / "a", series=1, instances=6)
    (home / "storage" / "junk.dcm").write_text("not dicom")
    env = worker_env(fresh_broker.url, home, DICOMFLOW_POSTGRES_DSN=pg_dsn)
    assert _cli(env, "backfill", str(home / "storage"), "--tenant", "t-ops", "--no-progress").returncode == 0
    worker = WorkerProcess(env, home / "worker.log").start()
    port = int(env["DICOMFLOW_WEB_PORT"])
    try:
        await read_topic(fresh_broker.url, IMAGE, until=lambda m: len(m) >= 6, timeout=90)
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            try:
                text = _scrape(port)
                if ('dicomflow_sink_rows_total{sink="postgres"} 1.0' in text
                        and "dicomflow_consumer_lag{" in text):
                    break
            except OSError:
                pass
            await asyncio.sleep(0.5)
        assert _value(text, 'dicomflow_dead_letters_total{code="NOT_DICOM",stage="ingest"}') == 1.0
        assert _value(text, 'dicomflow_sink_rows_total{sink="postgres"}') == 1.0
        assert _value(text, 'dicomflow_stage_events_total{stage="series_window",what="instances"}') == 6.0
        assert _value(text, 'dicomflow_stage_events_total{stage="series_window",what="flushes"}') >= 1.0
        assert _value(text, 'dicomflow_faust_messages_received_per_topic_total{topic="storage_queue"}') == 7.0
        assert 'dicomflow_consumer_lag{partition="' in text
        live = _cli(env, "status", "--json")
        assert live.returncode == 0, live.stderr
        assert orjson.loads(live.stdout)["sinks"]["postgres"]["rows"] == 1.0
    finally:
        worker.stop()

    # With the worker stopped, K new events are exactly the lag status reports.
    publisher = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=4)
    await publisher.start()
    try:
        for i in range(5):
            await publisher.publish({"tenant_id": "t-ops", "file_path": f"none/{i}.dcm", "trace_id": f"lag-{i}"}, None)
    finally:
        await publisher.stop()
    proc = _cli(env, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    report = orjson.loads(proc.stdout)
    storage_lag = sum(p["lag"] for p in report["topics"]["storage_queue"])
    assert storage_lag == 5
    assert report["dead_letters"]["storage_queue_dlq"] == {"NOT_DICOM": 1}
    assert report["postgres_dsn"].startswith("postgresql://") and "****" in report["postgres_dsn"]


def test_compose_file_is_valid() -> None:
    compose_file = REPO / "docker-compose.yml"
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) and subprocess.run([*cli, "version"], capture_output=True).returncode == 0:
            proc = subprocess.run([*cli, "-f", str(compose_file), "config", "-q"], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
    # Structural checks that hold with or without a docker client.
    doc = yaml.safe_load(compose_file.read_text())
    services = doc["services"]
    for required in ("redpanda", "topics", "postgres", "doris-fe", "doris-be", "console", "scp", "worker"):
        assert required in services, required
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}) or {}:
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []) or []:
            source = str(vol).split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            elif "/" not in source:
                assert source in (doc.get("volumes") or {}), f"{name} uses undeclared volume {source}"
        if "build" in svc:
            assert (REPO / "Dockerfile").exists()
    assert "ports" not in services["worker"], "workers must scale with --scale worker=N (no fixed host port)"
