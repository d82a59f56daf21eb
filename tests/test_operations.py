"""Operations: `status --json` lag, the worker's /metrics, and the compose file."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

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


def _compose_tools() -> list[list[str]]:
    """The Compose tools present: `docker compose` (v2 plugin) and/or `docker-compose` (1.29)."""
    found = []
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) and subprocess.run([*cli, "version"], capture_output=True).returncode == 0:
            found.append(cli)
    return found


def test_compose_file_is_valid() -> None:
    """The file is written for both Compose v2 and docker-compose 1.29 (Debian 12): each one present
    validates it. CI installs Debian's docker-compose (.ci/run); v2 is checked where it is installed."""
    compose_file = REPO / "docker-compose.yml"
    tools = _compose_tools()
    assert tools, "neither `docker compose` (v2) nor `docker-compose` (1.29) is installed; .ci/run installs " \
                  "Debian's docker-compose"
    for cli in tools:
        proc = subprocess.run([*cli, "-f", str(compose_file), "config", "-q"], capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cli)}: {proc.stderr}"
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
    assert "name" not in doc, "docker-compose 1.29 rejects a top-level name (the project name is in .env)"
    assert "COMPOSE_PROJECT_NAME=dicomflow" in (REPO / ".env").read_text()
    # The worker's healthcheck is `dicomflow status --health` (a command that exists).
    health = services["worker"]["healthcheck"]["test"]
    assert health[:4] == ["CMD", "dicomflow", "status", "--health"], health
    from click.testing import CliRunner

    from dicomflow.cli import main as cli_main

    usage = CliRunner().invoke(cli_main, [*health[2:], "--help"])
    assert usage.exit_code == 0, usage.output


async def test_status_health_exits_nonzero_when_a_stage_is_stuck(fresh_broker: EmbeddedBroker, tmp_path: Path) -> None:
    """`status --health` (the worker's compose healthcheck): lag that does not move for the
    stuck time is unhealthy (exit 1); lag caught up is healthy again (exit 0)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.broker import bootstrap_of, ensure_topics
    from streams.topology import ALL_TOPICS, STORAGE

    env = worker_env(fresh_broker.url, tmp_path / "home")
    await ensure_topics(bootstrap_of(fresh_broker.url), ALL_TOPICS, 4)
    publisher = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=4)
    await publisher.start()
    try:
        for i in range(3):
            await publisher.publish({"tenant_id": "t-ops", "file_path": f"none/{i}.dcm", "trace_id": f"h-{i}"}, None)
    finally:
        await publisher.stop()
    args = ("status", "--health", "--stuck-minutes", "0.02")  # 1.2 s
    first = await asyncio.to_thread(_cli, env, *args)
    assert first.returncode == 0 and "first look" in first.stdout, first.stdout + first.stderr
    deadline = time.monotonic() + 30
    while True:
        await asyncio.sleep(1.3)
        proc = await asyncio.to_thread(_cli, env, *args)
        if proc.returncode != 0 or time.monotonic() > deadline:
            break
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "UNHEALTHY" in proc.stdout and f"{STORAGE} p" in proc.stdout and "not moving" in proc.stdout, proc.stdout

    # The group catches up (commits every end offset, as a worker does): healthy again.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_of(fresh_broker.url), group_id=env["DICOMFLOW_APP_ID"],
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(STORAGE, p) for p in range(4)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.commit({tp: end for tp, end in ends.items() if end > 0})
    finally:
        await consumer.stop()
    healthy = await asyncio.to_thread(_cli, env, *args)
    assert healthy.returncode == 0 and "health: ok" in healthy.stdout, healthy.stdout + healthy.stderr
    report = orjson.loads((await asyncio.to_thread(_cli, env, "status", "--json")).stdout)
    assert report["health"]["ok"] is True and report["total_lag"] == 0


def test_health_judges_a_failing_sink_over_the_stuck_time() -> None:
    """A sink that retried and wrote no batch over the window is failing; one that wrote is not."""
    from dicomflow.status import judge_health

    def obs(t: float, retries: float, batches: float) -> dict[str, object]:
        return {"t": t, "committed": {}, "lag": {}, "sinks": {"doris": {"batches": batches, "retries": retries},
                                                             "postgres": {"batches": batches + t, "retries": t}}}

    history = [obs(0.0, 1, 10), obs(300.0, 4, 10)]
    verdict = judge_health(obs(660.0, 9, 10), history, 600.0)
    assert verdict["failing_sinks"] == ["doris"] and not verdict["ok"]
    assert judge_health(obs(660.0, 9, 11), history, 600.0)["ok"]  # it wrote a batch: recovering
    assert judge_health(obs(500.0, 9, 10), history, 600.0)["judged_over_s"] is None  # not long enough yet


async def test_status_health_names_a_failing_sink(fresh_broker: EmbeddedBroker, tmp_path: Path, ct_small: Path,
                                                 doris_emulator: Any) -> None:
    """A real worker whose Doris loads all fail (the Stream Load emulator answers Status Fail):
    retries grow, no batch is written, and `status --health` names the sink (exit 1)."""
    from tests.fixtures_doris import DORIS_DB, DORIS_PASSWORD, DORIS_USER

    home = tmp_path / "home"
    clone_series(ct_small, home / "storage" / "a", series=1, instances=2)
    env = worker_env(fresh_broker.url, home, DICOMFLOW_DORIS_FE_URL=doris_emulator.fe_url,
                     DICOMFLOW_DORIS_USER=DORIS_USER, DICOMFLOW_DORIS_PASSWORD=DORIS_PASSWORD,
                     DICOMFLOW_DORIS_DATABASE=DORIS_DB, DICOMFLOW_DORIS_MAX_INTERVAL="0.3")
    doris_emulator.inject("fail", count=100_000)
    assert _cli(env, "backfill", str(home / "storage"), "--tenant", "t-ops", "--no-progress").returncode == 0
    worker = WorkerProcess(env, home / "worker.log").start()
    args = ("status", "--health", "--stuck-minutes", "0.02")
    try:
        deadline = time.monotonic() + 90
        while True:  # until a Doris sink has retried (the worker is up and loading)
            try:
                text = _scrape(int(env["DICOMFLOW_WEB_PORT"]))
            except OSError:
                text = ""
            if any(line.startswith('dicomflow_sink_retries_total{sink="doris') and not line.endswith(" 0.0")
                   for line in text.splitlines()):
                break
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.3)
        first = await asyncio.to_thread(_cli, env, *args)
        assert first.returncode == 0 and "first look" in first.stdout, first.stdout + first.stderr
        await asyncio.sleep(1.3)  # one stuck window (1.2 s)
        proc = await asyncio.to_thread(_cli, env, *args)
    finally:
        worker.kill()  # a worker retrying Doris would drain slowly; status is what is tested
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "retrying without writing" in proc.stdout and "doris" in proc.stdout, proc.stdout
