"""Doris sink stage: dicom_state_queue, dicom_image_queue, log_queue -> Doris via Stream Load, exactly once.

Exactly once rests on three rules, one per way a row could be loaded twice:

1. **Same batch, same label.** A batch is a contiguous offset range of one source
   partition; its label is derived from (table, topic, partition, first, last). Before
   a load, the range is written to ``dicomflow_doris_intents`` (same partition) and
   acknowledged by the broker. A restarted worker reads those intents and rebuilds
   exactly the same ranges, so a replayed batch meets ``Label Already Exists``/
   ``FINISHED`` instead of loading again.
2. **Commit after load.** Events are acked by hand only after their batch is in Doris
   (``Success``, ``Publish Timeout``, or ``FINISHED``), so the committed offset never
   passes unloaded rows; a crash replays them under rule 1.
3. **One row per transfer outcome.** The ingest stage is at-least-once: after a crash it
   may put a second copy of a transfer-log row on ``log_queue`` (same key, so same
   partition, later offset). The ``dicom_object_meta`` sink skips a row whose
   (trace id, transfer status) it has seen within the last DICOMFLOW_DORIS_DEDUP_WINDOW
   records of the partition; after a restart that window is re-read from the topic. A
   replayed dead letter that now succeeds keeps its trace id and adds its SUCCESS row.
   The UNIQUE KEY tables need no such rule: a repeated row replaces itself.

The seeds' consumer committed offsets before writing; this is the fix.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from faust import Stream
from faust.types import TP, EventT, StreamT

from agents.gaps import GapGuard, read_range
from agents.sink_support import dead_letter_rejected
from core.errors import SinkDataError
from sinks.base import Rejected, SinkBatch, SinkItem, flush_with_retry
from sinks.doris import DorisTableSink, StreamLoadClient
from streams.app import app, settings
from streams.topics import doris_intents, image, log, state
from streams.topology import DORIS_INTENTS

logger = logging.getLogger(__name__)

#: How many recent batch ranges each partition remembers in the intents topic; only
#: ranges at or above the committed offset matter, and commits lag by seconds.
INTENTS_KEPT = 64


@dataclass
class _Partition:
    intents: list[tuple[int, int]] = field(default_factory=list)
    events: list[EventT] = field(default_factory=list)
    items: list[SinkItem[dict[str, Any]]] = field(default_factory=list)
    first: int | None = None
    last: int | None = None
    nbytes: int = 0
    started: float = 0.0
    forced_end: int | None = None
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)


class DorisStage:
    """Batches one source topic into one Doris table with reproducible boundaries."""

    def __init__(self, kind: str, topic_name: str, client: StreamLoadClient, *, dedup_trace: bool) -> None:
        self.kind = kind
        self.topic_name = topic_name
        self.client = client
        self.sink = DorisTableSink.from_settings(settings, kind, client)
        self.dedup_trace = dedup_trace
        self.parts: dict[int, _Partition] = {}
        self.parked: dict[int, _Partition] = {}
        self.guard = GapGuard(topic_name)
        self.lock = asyncio.Lock()
        self.stream: StreamT[Any] | None = None
        self.counters = {"duplicates_skipped": 0, "replayed_batches": 0}

    # -- partition lifecycle ---------------------------------------------------------
    #
    # Buffered events are never dropped on revocation: Faust does not deliver them again
    # when the partition comes straight back to this worker (it keeps its fetch
    # position), and faust 0.15.3 then commits past a single unacked offset (the
    # ``min(acked) - committed > 1`` off-by-one, faust-streaming#606), losing it. So a
    # revoked partition's buffer is parked after any in-flight load has finished, and
    # restored if the partition is assigned back; only a partition that went to another
    # worker is forgotten, and that worker replays it from the committed offset under the
    # ranges recorded in the intents topic.

    async def revoke(self, tps: Iterable[TP]) -> None:
        async with self.lock:  # no load may be in flight while the partition changes hands
            for tp in tps:
                if tp.topic == self.topic_name and tp.partition in self.parts:
                    self.parked[tp.partition] = self.parts.pop(tp.partition)

    def assign(self, tps: Iterable[TP]) -> None:
        mine = {tp.partition for tp in tps if tp.topic == self.topic_name}
        for partition in list(self.parked):
            part = self.parked.pop(partition)
            if partition in mine:
                self.parts[partition] = part
            else:
                self.guard.forget([TP(self.topic_name, partition)])
                logger.info("doris sink partition moved table=%s partition=%s unloaded=%s..%s", self.sink.table,
                            partition, part.first, part.last)

    async def _open(self, partition: int, first_offset: int) -> _Partition:
        part = _Partition()
        part.intents = await _read_intents(self._intent_key(partition), partition)
        if self.dedup_trace and settings.doris_dedup_window and first_offset > 0:
            start = max(0, first_offset - settings.doris_dedup_window)
            for trace in await _read_trace_ids(self.topic_name, partition, start, first_offset):
                part.seen[trace] = None
        self.parts[partition] = part
        logger.info("doris sink open table=%s partition=%s from_offset=%s intents=%s dedup_window=%s",
                    self.sink.table, partition, first_offset, len(part.intents), len(part.seen))
        return part

    def _intent_key(self, partition: int) -> bytes:
        return f"{self.sink.table}:{partition}".encode()

    # -- per event -------------------------------------------------------------------

    async def on_event(self, event: EventT) -> None:
        msg = event.message
        again, missing = await self.guard.check(msg.partition, msg.offset)
        # A partition between revocation and re-assignment still owns its parked buffer.
        part = (self.parts.get(msg.partition) or self.parked.get(msg.partition)
                or await self._open(msg.partition, missing[0].offset if missing else msg.offset))
        if again:
            # Delivered again (Faust re-seeked after a rebalance): already buffered or
            # loaded; ack it with the current batch, load nothing twice.
            part.events.append(event)
            if part.first is None:
                await self._ack(event)
                part.events.clear()
            return
        for r in missing:  # records Faust skipped: load them in order, before this event
            await self._add(part, r.value, r.key, r.topic, r.partition, r.offset, r.timestamp)
            if self._due(part, now=None):
                # A recovered record can close a batch rebuilt from an intent: load it as the
                # same range (same label) before the next record starts another one.
                await self.flush(msg.partition)
        part.events.append(event)
        raw = event.value if isinstance(event.value, bytes) else bytes(event.value or b"")
        await self._add(part, raw, event.key, msg.topic, msg.partition, msg.offset, msg.timestamp or 0.0)
        if self._due(part, now=None):
            await self.flush(msg.partition)

    async def _add(self, part: _Partition, raw: bytes, key: Any, topic: str, partition: int, offset: int,
                   timestamp: float) -> None:
        if part.first is None:
            self._start_batch(part, offset)
        part.last = offset
        skey = key.decode() if isinstance(key, bytes) else key
        try:
            row = orjson.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            bad: SinkItem[dict[str, Any]] = SinkItem({}, skey, topic, partition, offset, raw=raw)
            await dead_letter_rejected([Rejected(bad, SinkDataError(f"undecodable row: {exc}"))], f"doris:{self.kind}")
            return
        if self.dedup_trace:
            dkey = _dedup_key(row)
            if dkey is not None:
                if dkey in part.seen:
                    self.counters["duplicates_skipped"] += 1
                    return
                part.seen[dkey] = None
                while len(part.seen) > settings.doris_dedup_window:
                    part.seen.popitem(last=False)
        part.items.append(SinkItem(row, skey, topic, partition, offset, timestamp=timestamp, raw=raw))
        part.nbytes += len(raw)

    def _start_batch(self, part: _Partition, offset: int) -> None:
        part.first = offset
        part.started = time.monotonic()
        part.forced_end = None
        for a, b in part.intents:
            if a <= offset <= b:
                # Replaying a range that was (maybe) loaded before a crash: rebuild it exactly.
                part.first, part.forced_end = a, b
                self.counters["replayed_batches"] += 1
                break

    def _due(self, part: _Partition, now: float | None) -> bool:
        if part.first is None:
            return False
        if part.forced_end is not None:
            return part.last is not None and part.last >= part.forced_end
        if len(part.events) >= settings.doris_max_rows or part.nbytes >= settings.doris_max_bytes:
            return True
        return now is not None and now - part.started >= settings.doris_max_interval

    # -- flushing ----------------------------------------------------------------------

    async def tick(self) -> None:
        now = time.monotonic()
        for partition, part in list(self.parts.items()):
            if self._due(part, now):
                await self.flush(partition)

    async def flush(self, partition: int) -> None:
        async with self.lock:
            part = self.parts.get(partition)
            if part is None or part.first is None or part.last is None:
                return
            first, last = part.first, part.last
            events, items = part.events, part.items
            if part.forced_end is None:
                await self._record_intent(partition, part, (first, last))
            self.sink.add_batch(SinkBatch(self.topic_name, partition, items, source_range=(first, last)))
            await flush_with_retry(self.sink, on_rejected=lambda r: dead_letter_rejected(r, f"doris:{self.kind}"),
                                   should_stop=lambda: bool(app.should_stop))
            for event in events:
                await self._ack(event)
            part.events, part.items, part.nbytes = [], [], 0
            part.first = part.last = part.forced_end = None

    async def _record_intent(self, partition: int, part: _Partition, rng: tuple[int, int]) -> None:
        part.intents = [*part.intents, rng][-INTENTS_KEPT:]
        fut = await doris_intents.send(key=self._intent_key(partition), value=orjson.dumps(part.intents),
                                       partition=partition)
        await fut  # the range must be durable before Doris can hold the batch

    async def _ack(self, event: EventT) -> None:
        if self.stream is not None:
            await self.stream.ack(event)
        else:
            event.ack()


async def _read_intents(key: bytes, partition: int) -> list[tuple[int, int]]:
    latest: list[tuple[int, int]] = []
    for record in await read_range(DORIS_INTENTS, partition, None, None):
        if record.key == key and record.value:
            latest = [(int(a), int(b)) for a, b in orjson.loads(record.value)]
    return latest


def _dedup_key(row: dict[str, Any]) -> str | None:
    """Identity of a transfer-log row: the transfer and its outcome.

    A replayed copy of the same outcome is a duplicate; a later attempt of the same
    transfer with another outcome (a dead letter replayed after its file was restored)
    is a new fact and is kept.
    """
    trace = row.get("trace_id")
    if not isinstance(trace, str):
        return None
    return f"{trace}|{row.get('transfer_status')}"


async def _read_trace_ids(topic: str, partition: int, start: int, end: int) -> list[str]:
    keys: list[str] = []
    for record in await read_range(topic, partition, start, end):
        try:
            row = orjson.loads(record.value or b"null")
        except orjson.JSONDecodeError:
            continue
        key = _dedup_key(row) if isinstance(row, dict) else None
        if key is not None:
            keys.append(key)
    return keys


def _register(stage: DorisStage, topic: Any) -> None:
    async def doris_agent(stream: StreamT[Any]) -> None:
        manual = cast(Stream[Any], stream).noack()
        stage.stream = manual
        async for event in manual.events():
            async with stage.lock:
                pass  # a flush in progress (Doris slow or down) holds us here: backpressure
            await stage.on_event(event)

    app.agent(topic, name=f"doris_{stage.kind}")(doris_agent)


if settings.doris_enabled:
    _client = StreamLoadClient.from_settings(settings)
    STAGES = [
        DorisStage("state", state.get_topic_name(), _client, dedup_trace=False),
        DorisStage("image", image.get_topic_name(), _client, dedup_trace=False),
        DorisStage("object", log.get_topic_name(), _client, dedup_trace=True),
    ]
    for _stage, _topic in zip(STAGES, (state, image, log), strict=True):
        _register(_stage, _topic)
        app.metrics.register_counters(f"doris_{_stage.kind}", _stage.sink.counters)
        app.metrics.register_counters(f"doris_{_stage.kind}_stage", _stage.counters)
        app.metrics.register_counters(f"doris_{_stage.kind}_gaps", _stage.guard.stats)

    @app.timer(0.5)
    async def doris_tick() -> None:
        for stage in STAGES:
            await stage.tick()

    async def _doris_revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        revoked: set[TP] = kwargs.get("revoked") or (args[0] if args else set())
        for stage in STAGES:
            await stage.revoke(revoked)

    async def _doris_assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        assigned: set[TP] = kwargs.get("assigned") or (args[0] if args else set())
        for stage in STAGES:
            stage.assign(assigned)

    app.on_partitions_revoked.connect(_doris_revoked)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(_doris_assigned)  # type: ignore[arg-type]

    app.close_on_shutdown(_client.stop)
else:
    STAGES = []
    logger.warning("DICOMFLOW_DORIS_FE_URL is not set: the Doris sink is off; records stay in the topics")
