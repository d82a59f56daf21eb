"""`dicomflow dlq list|show|export` and `replay-dlq`'s filters, on the real (embedded Tansu) broker.

Letters are built with the one envelope builder (schemas/deadletter.py) and written to both
dead-letter topics with the feeders' producer, as the pipeline's stages write them.
"""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from core.errors import ExtractionError, SinkDataError
from core.settings import EMBEDDED_PROFILE
from dicomflow.cli import main as cli_main
from dicomflow.embedded.broker import EmbeddedBroker
from feeders.publisher import EventPublisher
from schemas.deadletter import dead_letter
from streams.broker import bootstrap_of, ensure_topics
from streams.topology import ALL_TOPICS, DLQ, SINK_DLQ, STORAGE
from tests.harness import read_all, worker_env

pytestmark = pytest.mark.integration


def _event(tenant: str, trace: str, path: str) -> dict[str, object]:
    return {"tenant_id": tenant, "trace_id": trace, "file_path": path, "schema_version": 1}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The command in this process (click's runner, the environment given): a subprocess each
    would cost a second and a half of imports."""
    result = CliRunner().invoke(cli_main, list(args), env=env)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


@pytest.fixture
async def letters(fresh_broker: EmbeddedBroker) -> EmbeddedBroker:
    await ensure_topics(bootstrap_of(fresh_broker.url), ALL_TOPICS, 4)
    now = datetime.now()
    storage = [
        (_event("hosp-a", "trace-old", "hosp-a/1/old.dcm"), ExtractionError("file not found", code="FILE_MISSING",
                                                                             field="file_path"), now - timedelta(hours=3)),
        (_event("hosp-b", "trace-missing", "hosp-b/2/gone.dcm"), ExtractionError(
            "file not found", code="FILE_MISSING", field="file_path"), now),
        (_event("hosp-b", "trace-notdicom", "hosp-b/2/junk.dcm"), ExtractionError(
            "not a DICOM file", code="NOT_DICOM", field="file_path"), now),
    ]
    publisher = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=4)
    await publisher.start()
    try:
        for event, error, when in storage:
            raw = orjson.dumps(event)
            await publisher.publish_raw(dead_letter(error=error, stage="ingest", worker="w1", raw=raw, original=event,
                                                    now=when), str(event["trace_id"]), topic=DLQ)
        # A message that was not even JSON keeps its bytes.
        await publisher.publish_raw(dead_letter(error=ExtractionError("not JSON", code="INVALID_EVENT", field=None),
                                                stage="ingest", worker="w1", raw=b"\x00garbage"), None, topic=DLQ)
        row = {"tenant_id": "hosp-a", "trace_id": "trace-row", "patient_sex": "XYZ"}
        await publisher.publish_raw(dead_letter(error=SinkDataError("value too long for type character(1)",
                                                                    field="patient_sex"),
                                                stage="postgres", worker="w1", raw=orjson.dumps(row), original=row,
                                                source={"topic": "dicom_state_queue", "partition": 1, "offset": 7}),
                                    "hosp-a/1.2/3.4", topic=SINK_DLQ)
    finally:
        await publisher.stop()
    return fresh_broker


def _lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line.strip()]


def test_list_filters_show_and_export(letters: EmbeddedBroker, tmp_path: Path) -> None:
    env = worker_env(letters.url, tmp_path / "home")

    every = _lines(_cli(env, "dlq", "list"))
    assert len(every) == 5
    assert every[0].split()[2] == "FILE_MISSING" and "trace-old" in every[0]  # oldest first
    missing = next(line for line in every if "trace-missing" in line)
    # time, code, field, tenant, trace id, file path, where
    assert missing.split()[2:8] == ["FILE_MISSING", "file_path", "hosp-b", "trace-missing", "hosp-b/2/gone.dcm",
                                    missing.split()[-1]]
    assert missing.split()[-1].startswith(f"@{DLQ}:")

    assert [line.split()[2] for line in _lines(_cli(env, "dlq", "list", "--topic", "sink"))] == ["SINK_REJECTED"]
    assert len(_lines(_cli(env, "dlq", "list", "--topic", "storage"))) == 4
    assert {line.split()[5] for line in _lines(_cli(env, "dlq", "list", "--code", "FILE_MISSING"))} == \
        {"trace-old", "trace-missing"}
    assert {line.split()[5] for line in _lines(_cli(env, "dlq", "list", "--tenant", "hosp-b"))} == \
        {"trace-missing", "trace-notdicom"}
    recent = _lines(_cli(env, "dlq", "list", "--since", "1h", "--code", "FILE_MISSING", "--code", "NOT_DICOM"))
    assert {line.split()[5] for line in recent} == {"trace-missing", "trace-notdicom"}
    bad_since = _cli(env, "dlq", "list", "--since", "yesterday-ish")
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr, bad_since

    shown = _cli(env, "dlq", "show", "trace-row")
    assert shown.returncode == 0, shown.stderr
    assert "SINK_REJECTED" in shown.stdout and "value too long for type character(1)" in shown.stdout
    assert '"patient_sex": "XYZ"' in shown.stdout and '"stage": "postgres"' in shown.stdout
    ref = missing.split()[-1].removeprefix("@")
    by_ref = _cli(env, "dlq", "show", ref)
    assert by_ref.returncode == 0 and '"file_path": "hosp-b/2/gone.dcm"' in by_ref.stdout, by_ref.stdout
    assert _cli(env, "dlq", "show", f"{DLQ}:0:999").returncode == 1
    assert _cli(env, "dlq", "show", "no-such-trace").returncode == 1

    exported = _cli(env, "dlq", "export", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(rows) == 5 and {r["code"] for r in rows} == {"FILE_MISSING", "NOT_DICOM", "INVALID_EVENT", "SINK_REJECTED"}
    assert next(r for r in rows if r["trace_id"] == "trace-row")["field"] == "patient_sex"
    out = tmp_path / "letters.jsonl"
    assert _cli(env, "dlq", "export", "--format", "jsonl", "--tenant", "hosp-a", "-o", str(out)).returncode == 0
    docs = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert {d["trace_id"] for d in docs} == {"trace-old", "trace-row"}
    assert next(d for d in docs if d["trace_id"] == "trace-old")["original"]["file_path"] == "hosp-a/1/old.dcm"


def test_replay_dlq_takes_the_same_filters(letters: EmbeddedBroker, tmp_path: Path) -> None:
    env = worker_env(letters.url, tmp_path / "home")
    proc = _cli(env, "replay-dlq", "--code", "FILE_MISSING", "--tenant", "hosp-b", "--since", "1h")
    assert proc.returncode == 0, proc.stderr
    assert "replayed=1" in proc.stdout, proc.stdout
    replayed = asyncio.run(read_all(letters.url, STORAGE))
    assert [orjson.loads(m.value or b"")["trace_id"] for m in replayed] == ["trace-missing"]
