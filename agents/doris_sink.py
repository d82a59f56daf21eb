"""Doris sink stage: every Doris output of the topology -> its Doris table, exactly once.

One agent per topic of :data:`streams.topology.DORIS_OUTPUTS` (today dicom_state_queue,
dicom_image_queue and log_queue); the table is ``settings.doris_table(spec.doris_kind)``.
The exactly-once rules (reproducible offset-range batches, intents recorded before the
load, acks after it, the trace-id window) live in :mod:`sinks.doris_batches`; this module
wires them to Faust and the broker:

* events come from a manual-ack stream, so nothing is committed before its batch loaded;
* intents go to ``dicomflow_doris_intents`` (same partition as the source) and are
  re-read from there with :func:`streams.broker.read_range`;
* the gap guard hands over the records Faust skipped;
* a timer flushes batches that waited ``DICOMFLOW_DORIS_MAX_INTERVAL``;
* rebalances park and restore buffers (see :meth:`DorisBatcher.revoke`).

The seeds' consumer committed offsets before writing; this is the fix.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from faust import Stream
from faust.types import TP, EventT, StreamT

from agents.gaps import GapGuard
from agents.sink_support import dead_letter_rejected, event_bytes, release, serve_sink, stopping
from core.settings import DORIS_IDLE_SPACING_S
from sinks.base import Rejected, RetryAborted, retry_until_done
from sinks.doris import DorisTableSink, StreamLoadClient
from sinks.doris_batches import BatchLimits, DorisBatcher, DorisPorts
from sinks.doris_intents import Range, encode_intents, latest_intents
from sinks.doris_loaded import LoadedKeys
from streams.broker import Record, read_last, read_range
from streams.incarnation import read_incarnation
from streams.topology import DORIS_INTENTS, DORIS_OUTPUTS, TopicSpec

if TYPE_CHECKING:
    from core.settings import Settings
    from streams.app import DicomflowApp

__all__ = ["register", "DorisStage"]

logger = logging.getLogger(__name__)

#: How often batches are checked against DICOMFLOW_DORIS_MAX_INTERVAL.
TICK_S = 0.5
#: How often a worker on an external broker deletes loaded keys older than their retention.
PRUNE_EVERY_S = 3600.0


class _TopicIntents:
    """The intents store on ``dicomflow_doris_intents``."""

    def __init__(self, app: DicomflowApp) -> None:
        self.app = app
        self.stats: dict[str, float] = {"intent_records_read": 0}

    async def read(self, key: bytes, partition: int) -> list[Range]:
        # The latest record of the key holds every range still needed: read from the end.
        record, read = await read_last(self.app.bootstrap, DORIS_INTENTS, partition, key)
        self.stats["intent_records_read"] += read
        return latest_intents([(record.key, record.value)] if record else [], key)

    async def record(self, key: bytes, partition: int, ranges: Sequence[Range]) -> None:
        fut = await self.app.queues.doris_intents.send(key=key, value=encode_intents(ranges), partition=partition)
        await fut  # the range must be durable before Doris can hold the batch


class _ManualAck:
    """Acks through the agent's manual-ack stream, once the agent has opened it."""

    def __init__(self, app: DicomflowApp | None = None) -> None:
        self.stream: StreamT[Any] | None = None
        self.app = app

    def release(self, events: Sequence[EventT]) -> None:
        if self.app is not None:
            release(self.app, events)

    async def __call__(self, event: EventT) -> None:
        if self.stream is not None:
            await self.stream.ack(event)
        else:
            event.ack()


@dataclass
class DorisStage:
    """One Doris output topic: its batcher, gap guard and acks."""

    spec: TopicSpec
    batcher: DorisBatcher[EventT]
    guard: GapGuard
    acks: _ManualAck
    #: DICOMFLOW_DORIS_IDLE_FLUSH (0: batches close only on rows, bytes or max interval).
    idle_flush_s: float = 0.0
    idle_flush_min_age_s: float = DORIS_IDLE_SPACING_S
    #: The partition's high watermark as the consumer last fetched it (None: not known yet).
    highwater: Callable[[int], int | None] = lambda partition: None
    #: When each partition last delivered an event (monotonic).
    last_event: dict[int, float] = field(default_factory=dict)

    async def tick(self) -> None:
        """The batcher's interval flush, then the batches of partitions that went idle.

        The interval exists to make batches large under load; once a partition delivers
        nothing more, waiting out the interval only delays the burst's tail. Quiet means both:
        no event for ``idle_flush_s`` and the batch ends at the partition's high watermark; and the
        partition's previous idle load must be ``idle_flush_min_age_s`` old, which bounds how often
        sparse traffic loads.
        The watermark matters: while this stage waits for one partition's load, it reads no
        event at all, so every other partition looks quiet although the consumer holds its
        records. An early load is an ordinary batch (its intent is recorded first), so
        exactly-once is unchanged; a batch rebuilt from an intent keeps its recorded end and is
        never cut early.
        """
        await self.batcher.tick()
        if self.idle_flush_s <= 0:
            return
        now = time.monotonic()
        for partition, part in list(self.batcher.parts.items()):
            if (part.first is not None and part.last is not None and part.forced_end is None
                    and now - part.idle_loaded_at >= self.idle_flush_min_age_s
                    and now - self.last_event.get(partition, 0.0) >= self.idle_flush_s
                    and (hw := self.highwater(partition)) is not None and part.last + 1 >= hw):
                if await self.batcher.flush(partition, idle=True):
                    self.batcher.counters["idle_flushes"] += 1

    async def consume(self, stream: StreamT[Any]) -> None:
        manual = cast(Stream[Any], stream).noack()
        self.acks.stream = manual
        async for event in manual.events():
            async with self.batcher.lock:
                pass  # a flush in progress (Doris slow or down) holds us here: backpressure
            msg = event.message
            self.last_event[msg.partition] = time.monotonic()
            record = Record(msg.topic, msg.partition, msg.offset, event.key, event_bytes(event), msg.timestamp or 0.0)
            try:
                # The guard advances only once its read succeeded; on_event retries the
                # partition open itself. Nothing but RetryAborted leaves (stopping, rebalancing):
                # then the partition restarts from its committed offset, this event included.
                again, missing = await retry_until_done(
                    functools.partial(self.guard.check, msg.partition, msg.offset),
                    what=f"doris gap guard topic={msg.topic}", should_stop=self.batcher.ports.should_stop)
                await self.batcher.on_event(record, event, again=again, missing=missing)
            except RetryAborted:
                if msg.partition in self.batcher.parts or msg.partition in self.batcher.parked:
                    self.batcher.drop(msg.partition)  # also hands back (releases) the buffered events
                self.guard.forget([(msg.topic, msg.partition)])
                self.acks.release([event])

    def assign(self, assigned: set[TP]) -> None:
        moved = self.batcher.assign(assigned)
        self.guard.forget([TP(self.spec.name, partition) for partition in moved])


def _stage(app: DicomflowApp, settings: Settings, spec: TopicSpec, client: StreamLoadClient,
           intents: _TopicIntents, loaded: LoadedKeys | None) -> DorisStage:
    kind = spec.doris_kind
    assert kind is not None  # DORIS_OUTPUTS holds only topics with a Doris kind
    stage_name = f"doris:{kind}"

    async def read_source(partition: int, start: int, end: int) -> list[bytes]:
        return [r.value for r in await read_range(app.bootstrap, spec.name, partition, start, end)]

    async def dead_letter(rejected: Sequence[Rejected[dict[str, Any]]]) -> None:
        await dead_letter_rejected(app, rejected, stage_name)

    acks = _ManualAck(app)
    guard = GapGuard(app, spec.name)

    def committed(partition: int) -> int | None:
        try:
            offset = app.consumer._committed_offset.get(TP(spec.name, partition))  # type: ignore[attr-defined]  # noqa: SLF001
        except Exception:  # noqa: BLE001 - no consumer yet: keep every intent
            return None
        return int(offset) if offset is not None else None

    def released(partition: int, events: Sequence[EventT]) -> None:
        guard.forget([(spec.name, partition)])  # its records are read again from the committed offset
        acks.release(events)

    ports: DorisPorts[EventT] = DorisPorts(intents=intents, read_source=read_source, ack=acks,
                                           dead_letter=dead_letter, should_stop=stopping(app),
                                           committed=committed, release=released,
                                           loaded=loaded if spec.dedup_trace else None)
    sink = DorisTableSink.from_settings(settings, kind, client)
    batcher = DorisBatcher(sink, spec.name, ports, BatchLimits.from_settings(settings), kind=kind,
                           dedup_trace=spec.dedup_trace)
    batcher.counters["idle_flushes"] = 0

    def highwater(partition: int) -> int | None:
        try:
            value = app.consumer.highwater(TP(spec.name, partition))
        except Exception:  # noqa: BLE001 - no consumer (yet): not known, no early load
            return None
        return int(value) if value is not None else None

    return DorisStage(spec, batcher, guard, acks, idle_flush_s=settings.doris_idle_flush,
                      idle_flush_min_age_s=settings.doris_idle_spacing, highwater=highwater)


def register(app: DicomflowApp, settings: Settings) -> None:
    """One agent per Doris output, the flush timer and the rebalance handlers, if Doris is on."""
    if not settings.doris_enabled:
        logger.warning("DICOMFLOW_DORIS_FE_URL is not set: the Doris sink is off; records stay in the topics")
        return
    client = StreamLoadClient.from_settings(settings)  # one HTTP session for every table
    intents = _TopicIntents(app)
    # With PostgreSQL, the transfer log's loaded keys outlive the broker (sinks/doris_loaded.py).
    loaded = LoadedKeys(settings.postgres_dsn) if settings.postgres_dsn is not None else None
    if loaded is not None:
        app.close_on_shutdown(loaded.stop)
        if not settings.journal:  # with a journal, the relay prunes at its checkpoints instead
            retention_s = settings.doris_loaded_retention_hours * 3600

            async def prune_loaded() -> None:
                try:
                    await loaded.prune(datetime.now(UTC) - timedelta(seconds=retention_s))
                except Exception as exc:  # pruning must never take the worker down
                    logger.warning("pruning the Doris loaded keys failed: %s", exc)

            app.timer(PRUNE_EVERY_S, name="doris_loaded_prune")(prune_loaded)
    stages = [_stage(app, settings, spec, client, intents, loaded) for spec in DORIS_OUTPUTS]

    async def read_label_incarnation() -> None:
        # Every label carries the broker's incarnation id; the sinks load nothing before it is set.
        incarnation = await read_incarnation(app.bootstrap)
        for stage in stages:
            stage.batcher.sink.incarnation = incarnation

    app.start_with(read_label_incarnation)
    for stage in stages:
        _register_agent(app, stage)
        kind = stage.batcher.kind
        serve_sink(app, stage.batcher.sink, f"doris_{kind}")
        app.metrics.register_counters(f"doris_{kind}_stage", stage.batcher.counters)
        app.metrics.register_counters(f"doris_{kind}_gaps", stage.guard.stats)
        # Each table flushes on its own timer: one table's failing loads stall only that table.
        app.timer(TICK_S, name=f"doris_tick_{kind}")(stage.tick)
    app.metrics.register_counters("doris_intents", intents.stats)

    async def doris_revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        revoked: set[TP] = kwargs.get("revoked") or (args[0] if args else set())
        for stage in stages:
            await stage.batcher.revoke(revoked)

    async def doris_assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        assigned: set[TP] = kwargs.get("assigned") or (args[0] if args else set())
        for stage in stages:
            stage.assign(assigned)

    app.on_partitions_revoked.connect(doris_revoked)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(doris_assigned)  # type: ignore[arg-type]


def _register_agent(app: DicomflowApp, stage: DorisStage) -> None:
    async def doris_agent(stream: StreamT[Any]) -> None:
        await stage.consume(stream)

    app.agent(app.queues.by_name[stage.spec.name], name=f"doris_{stage.batcher.kind}")(doris_agent)
