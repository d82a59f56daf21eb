"""Shared machinery of the failure scenarios: a dataset, the expected end state, and checks.

"Exactly as after a clean run" is checked against the ground truth derived from the
dataset itself (one row per series with its distinct instance count in PostgreSQL and
Doris, one image row per instance, one transfer-log row per file), plus: no trace id
appears twice in dicom_object_meta.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pydicom

from dicomflow.embedded.broker import EmbeddedBroker
from schemas.identity import trace_id_for
from tests.doris_emulator import DorisEmulator
from tests.fixtures_doris import DORIS_DB, DORIS_PASSWORD, DORIS_USER
from tests.harness import REPO, clone_series, worker_env


@dataclass
class Expected:
    series: dict[str, int]
    sops: set[str]
    traces: set[str]


def make_dataset(ct_small: Path, root: Path, *, series: int, instances: int, tenant: str) -> Expected:
    files = clone_series(ct_small, root / "data", series=series, instances=instances)
    counts: dict[str, set[str]] = defaultdict(set)
    traces = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        counts[str(ds.SeriesInstanceUID)].add(str(ds.SOPInstanceUID))
        traces.add(trace_id_for(tenant, str(ds.SOPInstanceUID), str(f.resolve().relative_to(root.resolve()))))
    return Expected({k: len(v) for k, v in counts.items()}, {s for v in counts.values() for s in v}, traces)


def stack_env(broker: EmbeddedBroker, home: Path, pg_dsn: str, emulator: DorisEmulator, **extra: str) -> dict[str, str]:
    return worker_env(broker.url, home, DICOMFLOW_POSTGRES_DSN=pg_dsn, DICOMFLOW_DORIS_FE_URL=emulator.fe_url,
                      DICOMFLOW_DORIS_USER=DORIS_USER, DICOMFLOW_DORIS_PASSWORD=DORIS_PASSWORD,
                      DICOMFLOW_DORIS_DATABASE=DORIS_DB, DICOMFLOW_DORIS_MAX_INTERVAL="1",
                      DICOMFLOW_DORIS_MAX_ROWS="500", **extra)


def backfill(env: dict[str, str], directory: Path, tenant: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dicomflow.cli", "backfill", str(directory), "--tenant", tenant,
                           "--no-progress"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def pg_series(dsn: str) -> dict[str, int]:
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError):
        return {}
    try:
        rows = await conn.fetch("SELECT series_uid, series_related_instances FROM dicom_state_meta")
        return {r[0]: r[1] for r in rows}
    except asyncpg.UndefinedTableError:
        return {}
    finally:
        await conn.close()


def doris_view(emulator: DorisEmulator) -> dict[str, Any]:
    objects = emulator.rows("dicom_object_meta")
    return {
        "series": {r["series_uid"]: r["series_related_instances"] for r in emulator.rows("dicom_state_meta")},
        "sops": {r["sop_uid"] for r in emulator.rows("dicom_image_meta")},
        "traces": Counter(r["trace_id"] for r in objects),
        "object_rows": len(objects),
    }


def matches(expected: Expected, pg: dict[str, int], doris: dict[str, Any]) -> bool:
    return (pg == expected.series and doris["series"] == expected.series and doris["sops"] == expected.sops
            and set(doris["traces"]) == expected.traces)


def progress(emulator: DorisEmulator) -> int:
    return len(emulator.rows("dicom_object_meta"))


async def wait_for(pred: Any, timeout: float, describe: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"deadline: {describe()}")


async def assert_final(expected: Expected, dsn: str, emulator: DorisEmulator, timeout: float, log: Any) -> None:
    """Wait for the exact end state, hold it through a quiet period, then check duplicates."""
    async def done() -> bool:
        return matches(expected, await pg_series(dsn), doris_view(emulator))

    def describe() -> str:
        d = doris_view(emulator)
        return (f"doris_series={len(d['series'])}/{len(expected.series)} sops={len(d['sops'])}/{len(expected.sops)} "
                f"traces={len(d['traces'])}/{len(expected.traces)}\n{log()}")

    await wait_for(done, timeout, describe)
    await asyncio.sleep(3.0)  # a late duplicate or double count would show up here
    pg, doris = await pg_series(dsn), doris_view(emulator)
    assert matches(expected, pg, doris), "state changed after reaching the expected end state"
    dupes = [t for t, n in doris["traces"].items() if n > 1]
    assert not dupes and doris["object_rows"] == len(expected.traces), f"duplicate trace ids: {dupes[:5]}"


async def explain_missing(broker: EmbeddedBroker, emulator: DorisEmulator, expected: Expected) -> str:
    """Where the records missing from Doris sit in their topics, and which loads covered them."""
    from streams.topology import IMAGE, LOG
    from tests.harness import read_all

    lines = []
    have_sops = {r["sop_uid"] for r in emulator.rows("dicom_image_meta")}
    have_traces = {r["trace_id"] for r in emulator.rows("dicom_object_meta")}
    for topic, table, field, have in ((IMAGE, "dicom_image_meta", "sop_uid", have_sops),
                                      (LOG, "dicom_object_meta", "trace_id", have_traces)):
        for m in await read_all(broker.url, topic):
            value = m.json().get(field)
            if value not in have:
                covering = [(load.label, load.status, load.total, load.loaded) for load in emulator.loads
                            if load.table == table and load.label and _covers(load.label, topic, m.partition, m.offset)]
                lines.append(f"{table}: missing {field}={value} at {topic}[{m.partition}]@{m.offset}; loads={covering}")
    return "\n".join(lines[:20])


def _covers(label: str, topic: str, partition: int, offset: int) -> bool:
    parts = label.split(":")
    try:
        return parts[-4] == topic and int(parts[-3]) == partition and int(parts[-2]) <= offset <= int(parts[-1])
    except (IndexError, ValueError):
        return False
