"""The ingest parse pool survives its processes dying (review defect, issue #14 §2).

A pool process killed between batches must not wedge ingest, and a file that kills the
parser mid-batch is dead-lettered as PARSER_CRASHED while its neighbours are processed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from agents.ingest import IngestStage
from core.errors import Code
from core.settings import Settings
from streams.topology import DLQ, IMAGE, LOG
from tests.support.crashing_parse import CRASH_MARK, parse_or_die


def _event(rel: str, trace: str) -> tuple[bytes, bytes | None, dict[str, Any]]:
    raw = orjson.dumps({"tenant_id": "t1", "file_path": rel, "trace_id": trace})
    return raw, None, {"topic": "storage_queue", "partition": 0, "offset": 0}


def _stage(home: Path, parse: Any = None, processes: int = 1) -> IngestStage:
    settings = Settings.from_env({"DICOMFLOW_HOME": str(home), "DICOMFLOW_INGEST_PROCESSES": str(processes),
                                  "DICOMFLOW_BROKER": "kafka://127.0.0.1:1", "DICOMFLOW_WORKER_ID": "w/0"})
    app: Any = SimpleNamespace(bootstrap="127.0.0.1:1", settings=settings)
    return IngestStage(app, settings, **({"parse": parse} if parse else {}))


async def _run(stage: IngestStage, items: list[tuple[bytes, bytes | None, dict[str, Any]]]) -> list[Any]:
    return [o async for chunk in stage._outcomes(items) for o in chunk]


@pytest.fixture
def stored(home: Path, ct_small: Path) -> list[str]:
    rels = []
    for i in range(3):
        rel = f"t1/ok{i}.dcm"
        (home / "storage" / "t1").mkdir(exist_ok=True)
        (home / "storage" / rel).write_bytes(ct_small.read_bytes())
        rels.append(rel)
    return rels


async def test_a_pool_killed_between_batches_is_replaced(home: Path, stored: list[str]) -> None:
    stage = _stage(home)
    try:
        first = await _run(stage, [_event(r, f"a{i}") for i, r in enumerate(stored)])
        assert all(o.error is None for o in first)
        pool = stage._pool
        assert pool is not None
        for pid in list(pool._processes):  # the OOM killer takes the pool's process
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not pool._broken and time.monotonic() < deadline:  # the pool has noticed: it is broken now
            await asyncio.sleep(0.05)
        assert pool._broken
        second = await _run(stage, [_event(r, f"b{i}") for i, r in enumerate(stored)])
        assert [o.error for o in second] == [None, None, None]
        assert {out.topic for o in second for out in o.outputs} >= {IMAGE, LOG}
        third = await _run(stage, [_event(r, f"c{i}") for i, r in enumerate(stored)])
        assert [o.error for o in third] == [None, None, None]
    finally:
        await stage.close()


async def test_a_file_that_kills_the_parser_is_dead_lettered(home: Path, stored: list[str]) -> None:
    stage = _stage(home, parse=parse_or_die)
    bad = f"t1/{CRASH_MARK}.dcm"
    items = [_event(stored[0], "x0"), _event(bad, "x1"), _event(stored[1], "x2"), _event(stored[2], "x3")]
    try:
        outcomes = await _run(stage, items)
        assert [o.error.code if o.error else None for o in outcomes] == [None, Code.PARSER_CRASHED, None, None]
        crashed = outcomes[1]
        letter = orjson.loads(next(o.value for o in crashed.outputs if o.topic == DLQ))
        assert letter["error"]["code"] == Code.PARSER_CRASHED and letter["original"]["file_path"] == bad
        row = orjson.loads(next(o.value for o in crashed.outputs if o.topic == LOG))
        assert row["transfer_status"] == Code.PARSER_CRASHED and row["trace_id"] == "x1"
        # and the stage goes on with a working pool
        after = await _run(stage, [_event(stored[0], "y0"), _event(stored[1], "y1")])
        assert [o.error for o in after] == [None, None]
    finally:
        await stage.close()


async def test_without_a_pool_the_replay_after_an_unclean_stop_is_isolated(home: Path, stored: list[str]) -> None:
    """No pool configured (the 2-core default): a worker that died parses its replay in a pool of one,
    so the file that killed it is dead-lettered instead of killing it again."""
    first = _stage(home, parse=parse_or_die, processes=0)
    await first.start()
    assert first.running_marker.exists() and first.isolate_left == 0
    ok = await _run(first, [_event(stored[0], "a0")])
    assert [o.error for o in ok] == [None] and first._pool is None  # parsed on the event loop
    # ... the worker dies here (no close): its marker stays behind.
    second = _stage(home, parse=parse_or_die, processes=0)
    await second.start()
    assert second.isolate_left > 0
    bad = f"t1/{CRASH_MARK}.dcm"
    try:
        outcomes = await _run(second, [_event(stored[0], "b0"), _event(bad, "b1"), _event(stored[1], "b2")])
        assert [o.error.code if o.error else None for o in outcomes] == [None, Code.PARSER_CRASHED, None]
        assert second.counters["isolated_after_crash"] == 3
    finally:
        await second.close()
    assert not second.running_marker.exists()  # a clean stop
    third = _stage(home, parse=parse_or_die, processes=0)
    await third.start()
    try:
        assert third.isolate_left == 0
    finally:
        await third.close()
