"""Test harness: real worker processes and topic readers with deadlines (never sleep-and-hope)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pydicom
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydicom.uid import generate_uid

from dicomflow.embedded.ports import free_port
from streams.broker import bootstrap_of

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0

    def json(self) -> Any:
        return orjson.loads(self.value or b"null")


class WorkerProcess:
    """`dicomflow worker` as a real subprocess, so it can be SIGKILLed like in production."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        out = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomflow.cli", "worker"], cwd=REPO, env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no final commit."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def worker_env(broker_url: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW_")}
    env.update({
        "DICOMFLOW_BROKER": broker_url,
        "DICOMFLOW_BROKER_PROFILE": "tansu",
        "DICOMFLOW_HOME": str(home),
        "DICOMFLOW_STORAGE_ROOT": str(home / "storage"),
        "DICOMFLOW_PARTITIONS": "4",
        "DICOMFLOW_APP_ID": f"dicomflow-test-{free_port()}",
        "DICOMFLOW_WEB_PORT": str(free_port()),
        "DICOMFLOW_WORKER_ID": "worker-test",
        "DICOMFLOW_SERIES_WINDOW_SECONDS": "1",
        "PYTHONPATH": str(REPO),
    })
    env.update(extra)
    return env


def fresh_web_port(env: dict[str, str], **extra: str) -> dict[str, str]:
    """``env`` with a web port free right now: another worker (or a restart) must not reuse a
    neighbour of the first one's, which any process may hold as an ephemeral port."""
    return dict(env, DICOMFLOW_WEB_PORT=str(free_port()), **extra)


async def read_topic(broker_url: str, topic: str, *, until: Callable[[list[Msg]], bool],
                     timeout: float = 60.0) -> list[Msg]:
    """Read a topic from the beginning until ``until(messages)`` holds; fail at the deadline."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_of(broker_url), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    messages: list[Msg] = []
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer.force_metadata_update() if hasattr(consumer, "force_metadata_update") else None
                await asyncio.sleep(0.2)
        assert parts, f"topic {topic} does not exist"
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            if until(messages):
                return messages
            if time.monotonic() > deadline:
                raise AssertionError(f"deadline: {topic} has {len(messages)} messages, condition not met")
            batch = await consumer.getmany(timeout_ms=300)
            for tp, recs in batch.items():
                messages.extend(Msg(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp) for r in recs)
    finally:
        await consumer.stop()


def clone_series(src: Path, dest_dir: Path, *, series: int, instances: int, study_uid: str | None = None,
                 patient_name: str | None = None) -> list[Path]:
    """Clone a DICOM file into `series` x `instances` files with fresh UIDs (one study)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(src)
    study = study_uid or generate_uid()
    out: list[Path] = []
    for s in range(series):
        series_uid = generate_uid()
        for i in range(instances):
            ds = base.copy()
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            ds.SeriesNumber = s + 1
            if patient_name is not None:
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.PatientName = patient_name
            path = dest_dir / f"s{s:03d}_i{i:04d}.dcm"
            ds.save_as(path)
            out.append(path)
    return out


def copy_into(src: Path, root: Path, rel: str) -> Path:
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest)
    return dest


async def read_all(broker_url: str, topic: str) -> list[Msg]:
    """Everything currently in a topic (up to the end offsets read at the start)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_of(broker_url), enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Msg] = []
        deadline = time.monotonic() + 30
        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            batch = await consumer.getmany(timeout_ms=300)
            for tp, recs in batch.items():
                out.extend(Msg(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp)
                       for r in recs if r.offset < ends[tp])
        return out
    finally:
        await consumer.stop()
