"""Ingest stage: storage_queue -> dicom_image_queue, log_queue, series instances (or the DLQ).

At-least-once: Faust acks a batch only after this body returns, and commits an
offset only after the producer has flushed every output of the events before it.
A crash between the two replays the events; the outputs are deterministic, and every
later stage de-duplicates, so a replay never leaves a fan-out half done.

The header parse (pure CPU, pydicom) runs in a pool of DICOMFLOW_INGEST_PROCESSES
processes, so it overlaps with Faust's own work on the event loop; the outputs are
still sent in offset order from here. With 0 processes (the default on 2 cores, where
the pool's process hop costs more than it overlaps) the parse runs on the event loop,
and after an unclean stop the replayed events are parsed in a pool of one process all
the same: the file that killed the worker, if one did, is among them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import re
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from faust.types import EventT, StreamT

from agents.fanout import Outcome, Output, failure, process_many
from agents.gaps import GapGuard
from agents.lanes import LaneSender
from agents.series_held import HeldSeriesStage, SeriesInstance, stage_of
from agents.sink_support import run_batches, stopping
from core.errors import Code, DicomflowError
from sinks.base import retry_until_done
from streams.topology import SERIES_INSTANCES, STORAGE

if TYPE_CHECKING:
    from core.settings import Settings
    from streams.app import DicomflowApp

__all__ = ["IngestStage", "register"]

log = logging.getLogger(__name__)

#: Events per take: large enough to amortise Faust's per-batch cost and feed the pool,
#: small enough that a crash replays little.
BATCH = 200
BATCH_WITHIN_S = 0.05
#: Events per parse task: small enough that sending the first chunk's outputs overlaps
#: with parsing the next ones, large enough to amortise the process hop.
CHUNK = 25
#: After an unclean stop, this many events go through a pool even without one configured:
#: more than the uncommitted events a crash can leave (Faust commits every 2.8 s).
ISOLATE_AFTER_CRASH = 10_000

Item = tuple[bytes, bytes | None, dict[str, Any]]


def _item(event: EventT) -> Item:
    msg = event.message
    raw = event.value if isinstance(event.value, bytes) else bytes(event.value or b"")
    key = event.key if isinstance(event.key, bytes) or event.key is None else str(event.key).encode()
    return raw, key, {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
                      "timestamp": msg.timestamp}


def _lane(out: Output) -> tuple[str, bytes | None]:
    return out.topic, out.key


Parse = Callable[[list[Item], Path, str], list[Outcome]]


class IngestStage:
    """storage_queue -> the outputs of each event, with the parse pool this worker owns.

    The parse runs in a pool of processes so that neither a slow file nor one that crashes
    the parser can stop the event loop (heartbeats) or kill the worker. A pool that broke
    (a process died: OOM, a crash in a C extension) is replaced; the chunk that was in
    flight is re-run one file at a time in a fresh pool, and a file that kills that pool
    too is dead-lettered as PARSER_CRASHED, so the worker never crash-loops on it.
    """

    def __init__(self, app: DicomflowApp, settings: Settings, *, parse: Parse = process_many) -> None:
        self.app = app
        self.storage_root = settings.storage_root
        self.worker_id = settings.worker_id
        self.processes = settings.ingest_processes
        self.parse = parse
        self.guard = GapGuard(app, STORAGE)
        #: With a series index, the series rows go to the windows in this process, and the
        #: events are acked once their windows were flushed (agents/series_held.py).
        self.series: HeldSeriesStage | None = stage_of(app)
        if self.series is not None:
            self.series.forgetters.append(self.guard.forget)
        self._pool: ProcessPoolExecutor | None = None
        #: Present while this worker runs: found at start, the last run did not stop cleanly.
        self.running_marker = settings.home / "run" / f"ingest-{re.sub(r'[^A-Za-z0-9_.-]', '_', self.worker_id)}"
        #: Events still to parse in a pool after an unclean stop (only without a configured pool).
        self.isolate_left = 0
        self.counters = {"parser_crashes": 0, "pools_replaced": 0, "isolated_after_crash": 0}

    async def start(self) -> None:
        """Note that this worker runs; after an unclean stop, isolate the replay's parse."""
        self.running_marker.parent.mkdir(parents=True, exist_ok=True)
        if self.running_marker.exists() and self.processes <= 0:
            self.isolate_left = ISOLATE_AFTER_CRASH
            log.warning("ingest: the last run of this worker did not stop cleanly; the next %s events are "
                        "parsed in a separate process, so a file that crashes the parser is dead-lettered "
                        "(PARSER_CRASHED) instead of crashing the worker again", self.isolate_left)
        self.running_marker.touch()

    def _pool_size(self) -> int:
        return self.processes if self.processes > 0 else (1 if self.isolate_left > 0 else 0)

    def _get_pool(self) -> ProcessPoolExecutor | None:
        size = self._pool_size()
        if size <= 0:
            if self._pool is not None:  # the isolation after a crash is over
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            return None
        if self._pool is None:
            # spawn, not fork: the worker already runs aiokafka threads, and forking a
            # threaded process can deadlock the child.
            self._pool = ProcessPoolExecutor(max_workers=size, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _replace_pool(self) -> ProcessPoolExecutor | None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            self.counters["pools_replaced"] += 1
        return self._get_pool()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.running_marker.unlink(missing_ok=True)  # a clean stop

    def _submit(self, chunk: list[Item]) -> asyncio.Future[list[Outcome]]:
        pool = self._get_pool()
        assert pool is not None
        loop = asyncio.get_running_loop()
        try:
            return loop.run_in_executor(pool, self.parse, chunk, self.storage_root, self.worker_id)
        except BrokenProcessPool:
            # Died between batches: the pool knows it is broken only now. A fresh one, once.
            log.error("ingest parse pool was broken; replacing it")
            fresh = self._replace_pool()
            assert fresh is not None
            return loop.run_in_executor(fresh, self.parse, chunk, self.storage_root, self.worker_id)

    async def _outcomes(self, items: list[Item]) -> AsyncIterator[list[Outcome]]:
        """Outcomes chunk by chunk, in order, as the pool finishes them."""
        if self._get_pool() is None:
            yield self.parse(items, self.storage_root, self.worker_id)
            return
        chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
        futures = [self._submit(c) for c in chunks]
        for i, future in enumerate(futures):
            try:
                yield await future
            except BrokenProcessPool:
                log.error("ingest parse pool broke during a batch; re-running its files one by one")
                for other in futures[i + 1:]:
                    other.cancel()
                self._replace_pool()
                for chunk in chunks[i:]:
                    yield [await self._isolated(item) for item in chunk]
                break
        if self.processes <= 0:  # counted once the batch is through (the pool is torn down at 0)
            self.isolate_left = max(0, self.isolate_left - len(items))
            self.counters["isolated_after_crash"] += len(items)

    async def _isolated(self, item: Item) -> Outcome:
        """One file in the pool alone: the outcome, or PARSER_CRASHED if it kills the pool again."""
        try:
            return (await self._submit([item]))[0]
        except BrokenProcessPool:
            self.counters["parser_crashes"] += 1
            self._replace_pool()
            raw, key, source = item
            error = DicomflowError("the header parser crashed on this file (its process died); the file is "
                                   "dead-lettered so the worker does not crash-loop on it", code=Code.PARSER_CRASHED,
                                   field="file_path")
            log.error("parser crashed offset=%s partition=%s", source.get("offset"), source.get("partition"))
            return failure(raw, key, error, self.worker_id, source)

    async def consume(self, stream: StreamT[Any]) -> None:
        # No exception leaves a batch with its events acked: run_batches acks only after
        # _handle returned, and retries it (a send failure, a broken pool) otherwise.
        await run_batches(self.app, stream, BATCH, BATCH_WITHIN_S, stage="ingest", prepare=self._items,
                          handle=self._handle,
                          on_abort=lambda events: self.guard.forget({(e.message.topic, e.message.partition)
                                                                     for e in events}),
                          ack=self.series.hold if self.series is not None else None)

    async def _items(self, events: Sequence[EventT]) -> list[Item]:
        """The batch's items, with the records Faust skipped before them (once per batch)."""
        items: list[Item] = []
        for e in events:
            _, missing = await retry_until_done(functools.partial(self.guard.check, e.message.partition,
                                                                  e.message.offset),
                                                what="ingest gap guard", should_stop=stopping(self.app))
            items.extend((r.value, r.key, {"topic": r.topic, "partition": r.partition, "offset": r.offset,
                                           "timestamp": r.timestamp})
                         for r in missing)
            items.append(_item(e))
        return items

    async def _handle(self, items: list[Item]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        failed = 0
        done = 0
        sender: LaneSender[Output] = LaneSender(self._send, _lane)
        instances: list[SeriesInstance] = []
        series = self.series
        if series is not None:
            await series.wait_room()
        try:
            async for chunk in self._outcomes(items):
                for item, outcome in zip(items[done:done + len(chunk)], chunk, strict=True):
                    for out in outcome.outputs:
                        if series is not None and out.topic == SERIES_INSTANCES:
                            src = item[2]
                            instances.append((src["topic"], src["partition"], src["offset"],
                                              src.get("timestamp") or None, out.key or b"", orjson.loads(out.value)))
                        else:
                            sender.add(out)
                    failed += self._account(item, outcome)
                done += len(chunk)
            lanes = sender.lanes
            await sender.drain()
        except BaseException:
            sender.cancel()  # no send outlives a batch that is not going to be acked
            raise
        if series is not None:
            # Only once the batch's other outputs are out: a retried batch adds nothing twice.
            series.add(instances)
        log.info("ingest batch events=%s dead_lettered=%s lanes=%s elapsed_s=%.3f", len(items), failed, lanes,
                 loop.time() - started)

    async def _send(self, out: Output) -> None:
        await self.app.queues.by_name[out.topic].send(key=out.key, value=out.value)

    def _account(self, item: Item, outcome: Outcome) -> int:
        """Log and count one event's outcome; 1 if it was dead-lettered."""
        if outcome.error is None:
            log.debug("ingested trace_id=%s offset=%s", outcome.trace_id, item[2]["offset"])
            return 0
        self.app.metrics.dead_letters.labels("ingest", outcome.error.code).inc()
        log.info("dead-lettered trace_id=%s code=%s field=%s offset=%s", outcome.trace_id, outcome.error.code,
                 outcome.error.field, item[2]["offset"])
        return 1


def register(app: DicomflowApp, settings: Settings) -> None:
    stage = IngestStage(app, settings)
    stage.guard.watch_revocations(app)
    app.metrics.register_counters("ingest_gaps", stage.guard.stats)
    app.metrics.register_counters("ingest_pool", stage.counters)
    app.start_with(stage.start)
    app.close_on_shutdown(stage.close)
    app.agent(app.queues.storage, name="ingest")(stage.consume)
