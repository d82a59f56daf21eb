"""The shipped Prometheus alert rules and Grafana dashboard (ops/): promtool accepts the rules, each
alert fires on the situation it names and stays quiet on its look-alike (`promtool test rules`), and
every metric the dashboard and the alerts use exists in a real worker's /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dicomflow.embedded.broker import EmbeddedBroker
from tests.doris_emulator import DorisEmulator
from tests.fixtures_doris import DORIS_DB, DORIS_PASSWORD, DORIS_USER
from tests.harness import REPO, WorkerProcess, clone_series, worker_env

ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "ops" / "grafana" / "dicomflow.json"

#: Metrics another stage will export but a worker of this tree does not yet. Empty once every
#: name the dashboard and the alerts use is served by /metrics.
PENDING: frozenset[str] = frozenset()


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install the Debian package prometheus (.ci/run does)"
    return path


def test_promtool_checks_the_rules() -> None:
    proc = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout, proc.stdout


# Each alert on the situation it names, and on a look-alike that must stay quiet. Inputs are
# one sample a minute; rules are evaluated every 30 s.
RULE_TESTS: list[dict[str, Any]] = [
    {"interval": "1m",
     "input_series": [
         # storage_queue: lag rising 10 a minute, reported by two workers (not counted twice).
         {"series": 'dicomflow_consumer_lag{topic="storage_queue",partition="0",instance="w1"}', "values": "0+10x40"},
         {"series": 'dicomflow_consumer_lag{topic="storage_queue",partition="0",instance="w2"}', "values": "0+10x40"},
         # log_queue: a high but steady lag, and a burst that drains.
         {"series": 'dicomflow_consumer_lag{topic="log_queue",partition="1",instance="w1"}', "values": "500x40"},
         {"series": 'dicomflow_consumer_lag{topic="dicom_image_queue",partition="1",instance="w1"}',
          "values": "0+100x5 500-50x10 0x25"}],
     "alert_rule_test": [
         {"eval_time": "8m", "alertname": "DicomflowLagGrowing", "exp_alerts": []},  # not for 10 min yet
         {"eval_time": "20m", "alertname": "DicomflowLagGrowing",
          "exp_alerts": [{"exp_labels": {"topic": "storage_queue", "severity": "warning"}}]}]},
    {"interval": "1m",
     "input_series": [
         # A sink's first letter of a code: the series appears, at 1, after 15 minutes.
         {"series": 'dicomflow_dead_letters_total{stage="postgres",code="SINK_DATA",instance="w1"}',
          "values": "_x15 1x30"},
         # Another sink's letters of a code seen before: one more at 20 minutes.
         {"series": 'dicomflow_dead_letters_total{stage="doris:image",code="SINK_DATA",instance="w1"}',
          "values": "2x20 3x25"},
         # Bad input at ingest is not a sink dead letter.
         {"series": 'dicomflow_dead_letters_total{stage="ingest",code="NOT_DICOM",instance="w1"}', "values": "0+5x45"}],
     "alert_rule_test": [
         {"eval_time": "13m", "alertname": "DicomflowSinkDeadLetter", "exp_alerts": []},
         {"eval_time": "17m", "alertname": "DicomflowSinkDeadLetter",
          "exp_alerts": [{"exp_labels": {"stage": "postgres", "code": "SINK_DATA", "severity": "warning"}}]},
         {"eval_time": "22m", "alertname": "DicomflowSinkDeadLetter",
          "exp_alerts": [{"exp_labels": {"stage": "postgres", "code": "SINK_DATA", "severity": "warning"}},
                         {"exp_labels": {"stage": "doris:image", "code": "SINK_DATA", "severity": "warning"}}]},
         {"eval_time": "40m", "alertname": "DicomflowSinkDeadLetter", "exp_alerts": []}]},
    {"interval": "1m",
     "input_series": [
         {"series": 'dicomflow_sink_retries_total{sink="postgres",instance="w1"}', "values": "0+6x20"},
         {"series": 'dicomflow_sink_retries_total{sink="doris_image",instance="w1"}', "values": "0 0 3 3x18"},
         {"series": 'dicomflow_stage_events_total{stage="postgres_agent",what="agent_batch_retries",instance="w1"}',
          "values": "0+2x20"},
         {"series": 'dicomflow_stage_events_total{stage="ingest_agent",what="agent_batch_retries",instance="w1"}',
          "values": "0x20"}],
     "alert_rule_test": [
         {"eval_time": "4m", "alertname": "DicomflowSinkFailing", "exp_alerts": []},
         {"eval_time": "10m", "alertname": "DicomflowSinkFailing",
          "exp_alerts": [{"exp_labels": {"sink": "postgres", "severity": "critical"}}]},
         {"eval_time": "10m", "alertname": "DicomflowBatchesRetrying",
          "exp_alerts": [{"exp_labels": {"stage": "postgres_agent", "severity": "critical"}}]}]},
    {"interval": "1m",
     "input_series": [
         # w1: instances wait and nothing flushes; w2: a long window (60 s) with a normal wait.
         {"series": 'dicomflow_series_flush_wait_seconds{instance="w1"}', "values": "0 0 60 120 180 240"},
         {"series": 'dicomflow_series_window_seconds{instance="w1"}', "values": "5x5"},
         {"series": 'dicomflow_series_flush_wait_seconds{instance="w2"}', "values": "0 30 60 0 30 60"},
         {"series": 'dicomflow_series_window_seconds{instance="w2"}', "values": "60x5"}],
     "alert_rule_test": [
         {"eval_time": "4m", "alertname": "DicomflowSeriesNotFlushing",
          "exp_alerts": [{"exp_labels": {"instance": "w1", "severity": "critical"}}]}]},
    {"interval": "1m",
     "input_series": [
         {"series": 'dicomflow_json_oldest_stale_seconds{instance="w1"}', "values": "0+600x20"},
         {"series": 'dicomflow_json_oldest_stale_seconds{instance="w2"}', "values": "0 3000 0x18"}],
     "alert_rule_test": [
         {"eval_time": "9m", "alertname": "DicomflowJsonStale", "exp_alerts": []},
         {"eval_time": "13m", "alertname": "DicomflowJsonStale",
          "exp_alerts": [{"exp_labels": {"instance": "w1", "severity": "warning"}}]}]},
]


def test_each_alert_fires_on_its_situation(tmp_path: Path) -> None:
    # promtool compares annotations too; they are prose (checked by `check rules` above), so the
    # unit tests run on a copy without them and test the expressions, durations and labels.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tested = {t["alertname"] for case in RULE_TESTS for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for g in rules["groups"] for r in g["rules"]}, "an alert without a test"
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "30s",
                                                        "tests": RULE_TESTS}))
    proc = subprocess.run([_promtool(), "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


SELECTOR = re.compile(r"\b(dicomflow_[a-z0-9_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    exprs += [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) > 15, "the dashboard has lost its panels"
    return exprs


def _used() -> dict[str, list[dict[str, str]]]:
    """Metric name -> the equality matchers each use of it requires."""
    used: dict[str, list[dict[str, str]]] = {}
    for expr in _expressions():
        for name, braces in SELECTOR.findall(expr):
            wanted = {k: v for k, op, v in MATCHER.findall(braces or "") if op == "="}  # equality only
            used.setdefault(name, []).append(wanted)
    return used


def _samples(text: str) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


@pytest.mark.integration
async def test_every_metric_of_the_dashboard_and_alerts_is_served(fresh_broker: EmbeddedBroker, tmp_path: Path,
                                                                  ct_small: Path, pg_dsn: str,
                                                                  doris_emulator: DorisEmulator) -> None:
    home = tmp_path / "home"
    clone_series(ct_small, home / "storage" / "a", series=1, instances=3)
    (home / "storage" / "a" / "junk.dcm").write_text("not dicom")
    env = worker_env(fresh_broker.url, home, DICOMFLOW_POSTGRES_DSN=pg_dsn,
                     DICOMFLOW_DORIS_FE_URL=doris_emulator.fe_url, DICOMFLOW_DORIS_USER=DORIS_USER,
                     DICOMFLOW_DORIS_PASSWORD=DORIS_PASSWORD, DICOMFLOW_DORIS_DATABASE=DORIS_DB,
                     DICOMFLOW_DORIS_MAX_INTERVAL="0.5")
    worker = WorkerProcess(env, home / "worker.log").start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dicomflow.cli", "backfill", str(home / "storage"), "--tenant", "t-ops",
            "--no-progress", env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, out.decode()
        url = f"http://127.0.0.1:{env['DICOMFLOW_WEB_PORT']}/metrics"
        deadline = time.monotonic() + 90
        text = ""
        while True:
            try:
                text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())  # noqa: S310
            except OSError:
                text = ""
            # Every stage has been through at least once: a series flushed and reached both sinks.
            if ('dicomflow_sink_rows_total{sink="postgres"} 1.0' in text
                    and 'dicomflow_sink_rows_total{sink="doris_state"} 1.0' in text
                    and "dicomflow_consumer_lag{" in text):
                break
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.5)
    finally:
        worker.stop()

    served = _samples(text)
    missing: dict[str, list[dict[str, str]]] = {}
    for name, uses in sorted(_used().items()):
        if name not in served:
            missing[name] = uses
            continue
        for wanted in uses:
            if wanted and not any(all(labels.get(k) == v for k, v in wanted.items()) for labels in served[name]):
                missing.setdefault(name, []).append(wanted)
    assert set(missing) <= PENDING, f"used by ops/ but not in a worker's /metrics: {missing}"
    still_pending = PENDING & set(served)
    assert not still_pending, f"served now, take them off PENDING: {sorted(still_pending)}"
