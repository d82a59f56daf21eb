"""Doris batching: one source topic into one Doris table, exactly once.

Exactly once rests on three rules, one per way a row could be loaded twice:

1. **Same batch, same label.** A batch is a contiguous offset range of one source
   partition; its label is derived from (table, topic, partition, first, last). Before
   a load, the range is recorded as an intent (:mod:`sinks.doris_intents`) and
   acknowledged by the broker. A restarted worker reads those intents and rebuilds
   exactly the same ranges, so a replayed batch meets ``Label Already Exists``/
   ``FINISHED`` instead of loading again.
2. **Commit after load.** Events are acked only after their batch is in Doris
   (``Success``, ``Publish Timeout``, or ``FINISHED``), so the committed offset never
   passes unloaded rows; a crash replays them under rule 1.
3. **One row per transfer outcome.** With ``dedup_trace``, a row whose (trace id,
   transfer status) was seen within the last DICOMFLOW_DORIS_DEDUP_WINDOW records of the
   partition is skipped (:mod:`sinks.dedupe`); after a restart that window is re-read
   from the topic when the partition is opened.

This module knows nothing of Faust or the broker: the stage hands it each event with
its coordinates (and the records the gap guard recovered), and it reaches the outside
only through :class:`DorisPorts`. An event is an opaque token here, given back to
``ack`` once its batch is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import orjson

from core.errors import SinkDataError
from core.settings import Settings
from sinks.base import Rejected, RetryAborted, SinkBatch, SinkItem, flush_with_retry, retry_until_done
from sinks.dedupe import DedupWindow, dedup_key, dedup_keys
from sinks.doris import DorisTableSink
from sinks.doris_intents import IntentStore, Range, intent_key, remember
from sinks.doris_loaded import LoadedKeys

__all__ = ["SourceRecord", "BatchLimits", "DorisPorts", "DorisBatcher"]

log = logging.getLogger(__name__)

E = TypeVar("E")
Row = dict[str, Any]


class SourceRecord(Protocol):
    """A consumed record's coordinates and bytes (an event, or one the gap guard recovered)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | str | None: ...
    @property
    def value(self) -> bytes: ...
    @property
    def timestamp(self) -> float: ...


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """When a batch is due (whichever comes first), and the de-duplication window."""

    max_rows: int
    max_bytes: int
    max_interval_s: float
    dedup_window: int

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchLimits:
        return cls(settings.doris_max_rows, settings.doris_max_bytes, settings.doris_max_interval,
                   settings.doris_dedup_window)


@dataclass(frozen=True, slots=True)
class DorisPorts(Generic[E]):
    """Everything a batcher does outside itself."""

    intents: IntentStore
    #: Raw values of the source partition's offsets ``start <= offset < end``:
    #: ``read_source(partition, start, end)`` (to re-read the de-duplication window).
    read_source: Callable[[int, int, int], Awaitable[Sequence[bytes]]]
    #: Commit one event (its batch is in Doris, or it was delivered again).
    ack: Callable[[E], Awaitable[None]]
    #: Rows refused as data (undecodable here, invalid for the DDL, or refused by Doris).
    dead_letter: Callable[[Sequence[Rejected[Row]]], Awaitable[None]]
    #: True once the worker is stopping or rebalancing: a retrying load gives up without acking.
    should_stop: Callable[[], bool]
    #: The source partition's committed offset (where a replay starts), if known: older
    #: intents can be dropped.
    committed: Callable[[int], int | None] = lambda partition: None
    #: Hand back a partition's buffered events unacked (a retry gave up): the stage lets
    #: Faust's revocation go on and restarts the partition from its committed offset.
    release: Callable[[int, Sequence[E]], None] = lambda partition, events: None
    #: A durable record of transfer-log keys already loaded (PostgreSQL), outliving the broker:
    #: with ``dedup_trace``, rows whose key it holds are left out of a load.
    loaded: LoadedKeys | None = None


@dataclass
class _Partition(Generic[E]):
    seen: DedupWindow
    intents: list[Range] = field(default_factory=list)
    events: list[E] = field(default_factory=list)
    items: list[SinkItem[Row]] = field(default_factory=list)
    first: int | None = None
    last: int | None = None
    nbytes: int = 0
    started: float = 0.0
    forced_end: int | None = None
    replay: bool = False
    intent_recorded: bool = False
    #: When this partition's previous batch was loaded early for being idle (monotonic): idle
    #: loads are spaced by it. Loads on size need no spacing (their size bounds them).
    idle_loaded_at: float = float("-inf")


class DorisBatcher(Generic[E]):
    """Batches one source topic into one Doris table with reproducible boundaries."""

    def __init__(self, sink: DorisTableSink, topic: str, ports: DorisPorts[E], limits: BatchLimits, *,
                 kind: str, dedup_trace: bool) -> None:
        self.sink = sink
        self.topic = topic
        self.ports = ports
        self.limits = limits
        self.kind = kind
        self.dedup_trace = dedup_trace
        self.parts: dict[int, _Partition[E]] = {}
        self.parked: dict[int, _Partition[E]] = {}
        #: Held while a batch is loaded; the stage waits on it before each event (backpressure).
        self.lock = asyncio.Lock()
        self.counters: dict[str, float] = {"duplicates_skipped": 0, "replayed_batches": 0}

    # -- partition lifecycle ---------------------------------------------------------
    #
    # Buffered events are never dropped on revocation: Faust does not deliver them again
    # when the partition comes straight back to this worker (it keeps its fetch
    # position), and faust 0.15.3 then commits past a single unacked offset (the
    # ``min(acked) - committed > 1`` off-by-one, faust-streaming#606), losing it. So a
    # revoked partition's buffer is parked after any in-flight load has finished, and
    # restored if the partition is assigned back; only a partition that went to another
    # worker is forgotten, and that worker replays it from the committed offset under the
    # ranges recorded in the intents.

    async def revoke(self, tps: Iterable[tuple[str, int]]) -> None:
        """Park the buffers of revoked partitions (``tps``: (topic, partition) pairs, e.g. Faust TPs)."""
        async with self.lock:  # no load may be in flight while the partition changes hands
            for topic, partition in tps:
                if topic == self.topic and partition in self.parts:
                    self.parked[partition] = self.parts.pop(partition)

    def assign(self, tps: Iterable[tuple[str, int]]) -> list[int]:
        """Restore parked buffers of partitions assigned back; return the partitions that moved away.

        The caller forgets the moved partitions' expected offsets (gap guard): their next
        owner here, if any, starts again from the committed offset.
        """
        mine = {partition for topic, partition in tps if topic == self.topic}
        moved: list[int] = []
        for partition in list(self.parked):
            part = self.parked.pop(partition)
            if partition in mine:
                self.parts[partition] = part
            else:
                moved.append(partition)
                log.info("doris sink partition moved table=%s partition=%s unloaded=%s..%s", self.sink.table,
                         partition, part.first, part.last)
        return moved

    async def _open(self, partition: int, first_offset: int) -> _Partition[E]:
        part: _Partition[E] = _Partition(DedupWindow(self.limits.dedup_window))

        async def read() -> None:
            part.intents = await self.ports.intents.read(self._intent_key(partition), partition)
            window = self.limits.dedup_window
            if self.dedup_trace and window and first_offset > 0:
                start = max(0, first_offset - window)
                part.seen.seed(dedup_keys(await self.ports.read_source(partition, start, first_offset)))

        # Retried here (the caller's gap guard has advanced past this event already); only
        # RetryAborted (stopping, rebalancing) leaves, and the stage then forgets the partition.
        await retry_until_done(read, what=f"doris open table={self.sink.table} partition={partition}",
                               should_stop=self.ports.should_stop)
        self.parts[partition] = part
        log.info("doris sink open table=%s partition=%s from_offset=%s intents=%s dedup_window=%s",
                 self.sink.table, partition, first_offset, len(part.intents), len(part.seen))
        return part

    def _intent_key(self, partition: int) -> bytes:
        return intent_key(self.sink.table, partition)

    # -- per event -------------------------------------------------------------------

    async def on_event(self, record: SourceRecord, event: E, *, again: bool = False,
                       missing: Sequence[SourceRecord] = ()) -> None:
        """Buffer one event (``record`` holds its coordinates and bytes).

        ``again``: the gap guard saw this offset before. ``missing``: the records Faust
        skipped before it, read back from the broker, in offset order.
        """
        partition = record.partition
        # A partition between revocation and re-assignment still owns its parked buffer.
        part = (self.parts.get(partition) or self.parked.get(partition)
                or await self._open(partition, missing[0].offset if missing else record.offset))
        if again:
            # Delivered again (Faust re-seeked after a rebalance): already buffered or
            # loaded; ack it with the current batch, load nothing twice.
            part.events.append(event)
            if part.first is None:
                await self.ports.ack(event)
                part.events.clear()
            return
        for r in missing:  # records Faust skipped: load them in order, before this event
            await self._add(part, r)
            if self._due(part, now=None):
                # A recovered record can close a batch rebuilt from an intent: load it as the
                # same range (same label) before the next record starts another one.
                await self.flush(partition)
        part.events.append(event)
        await self._add(part, record)
        if self._due(part, now=None):
            await self.flush(partition)

    async def _add(self, part: _Partition[E], record: SourceRecord) -> None:
        offset, raw = record.offset, record.value
        if part.first is None:
            self._start_batch(part, offset)
        part.last = offset
        key = record.key.decode() if isinstance(record.key, bytes) else record.key
        try:
            row = orjson.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            bad: SinkItem[Row] = SinkItem({}, key, record.topic, record.partition, offset, raw=raw)
            letter = [Rejected(bad, SinkDataError(f"undecodable row: {exc}"))]
            await retry_until_done(lambda: self.ports.dead_letter(letter), what="doris dead letter",
                                   should_stop=self.ports.should_stop)
            return
        if self.dedup_trace:
            dkey = dedup_key(row)
            if dkey is not None:
                if dkey in part.seen:
                    self.counters["duplicates_skipped"] += 1
                    return
                part.seen.remember(dkey)
        part.items.append(SinkItem(row, key, record.topic, record.partition, offset, timestamp=record.timestamp,
                                   raw=raw))
        part.nbytes += len(raw)

    def _start_batch(self, part: _Partition[E], offset: int) -> None:
        part.first = offset
        part.started = time.monotonic()
        part.forced_end = None
        part.replay = part.intent_recorded = False
        for a, b in part.intents:
            if a <= offset <= b:
                # Replaying a range that was (maybe) loaded before a crash: rebuild it exactly.
                part.first, part.forced_end = a, b
                part.replay = part.intent_recorded = True
                self.counters["replayed_batches"] += 1
                break

    def _due(self, part: _Partition[E], now: float | None) -> bool:
        if part.first is None:
            return False
        if part.forced_end is not None:
            # A rebuilt batch closes at its recorded end, never earlier or later: same label.
            return part.last is not None and part.last >= part.forced_end
        if len(part.events) >= self.limits.max_rows or part.nbytes >= self.limits.max_bytes:
            return True
        return now is not None and now - part.started >= self.limits.max_interval_s

    # -- flushing ----------------------------------------------------------------------

    def drop(self, partition: int) -> None:
        """Forget a partition's buffer and hand its events back unacked (a retry gave up)."""
        part = self.parts.pop(partition, None) or self.parked.pop(partition, None)
        events = part.events if part is not None else []
        self.counters["batches_released"] = self.counters.get("batches_released", 0) + 1
        log.warning("doris sink released unacked table=%s partition=%s events=%s (replayed from the committed "
                    "offset under the same intents)", self.sink.table, partition, len(events))
        self.ports.release(partition, events)

    async def tick(self) -> None:
        """Flush every partition whose batch has waited long enough (called by a timer)."""
        now = time.monotonic()
        for partition, part in list(self.parts.items()):
            if self._due(part, now):
                await self.flush(partition)

    async def flush(self, partition: int, *, idle: bool = False) -> bool:
        """Record the batch's intent, load it (retrying), then ack its events: add -> flush -> commit.

        ``idle``: loaded early for an idle partition, which stamps ``idle_loaded_at`` (only if a
        batch was there to load: a size load may have taken it meanwhile). Whether it loaded."""
        async with self.lock:
            part = self.parts.get(partition)
            if part is None or part.first is None or part.last is None:
                return False
            if idle:
                part.idle_loaded_at = time.monotonic()
            first, last = part.first, part.last
            events, items = part.events, part.items

            async def load() -> None:
                if not part.intent_recorded:
                    await self._record_intent(partition, part, (first, last))
                    part.intent_recorded = True
                self.sink.take_batches()  # what a failed attempt left behind is added again
                loaded = self.ports.loaded if self.dedup_trace else None
                keys = [dedup_key(item.value) for item in items] if loaded is not None else []
                rows = items
                if loaded is not None:
                    known = await loaded.known(self.sink.table, [k for k in keys if k])
                    rows = [item for item, k in zip(items, keys, strict=True) if k is None or k not in known]
                    self.counters["duplicates_skipped"] += len(items) - len(rows)
                if rows:
                    self.sink.add_batch(SinkBatch(self.topic, partition, rows, source_range=(first, last),
                                                  replay=part.replay))
                    await flush_with_retry(self.sink, on_rejected=self.ports.dead_letter,
                                           should_stop=self.ports.should_stop)
                if loaded is not None:
                    await loaded.add(self.sink.table, [k for k in keys if k])

            try:
                # Any failure is retried (never acked past); a rebalance or shutdown stops the
                # retry, and the events go back unacked (intents and labels make the replay safe).
                await retry_until_done(load, what=f"doris load table={self.sink.table} partition={partition}",
                                       should_stop=self.ports.should_stop)
            except RetryAborted:
                self.drop(partition)
                return False
            for event in events:
                await self.ports.ack(event)
            part.events, part.items, part.nbytes = [], [], 0
            part.first = part.last = part.forced_end = None
            return True

    async def _record_intent(self, partition: int, part: _Partition[E], rng: Range) -> None:
        part.intents = remember(part.intents, rng, self.ports.committed(partition))
        # The range must be durable before Doris can hold the batch.
        await self.ports.intents.record(self._intent_key(partition), partition, part.intents)
