"""Shared plumbing of the sink agents: consume a batch, flush it, dead-letter refusals.

The body of a sink agent returns only when every event of the batch is written or
dead-lettered, so Faust's ack (and with it the offset commit) never passes unwritten
data; while the destination is down the flush keeps retrying and the partition stalls,
which is the backpressure.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson
from faust import Stream
from faust.types import EventT, StreamT

from core.errors import SinkDataError
from schemas.deadletter import dead_letter
from sinks.base import (
    BatchingSink,
    Rejected,
    RetryAborted,
    SinkItem,
    flush_with_retry,
    retry_until_done,
    start_or_defer,
)

if TYPE_CHECKING:
    from streams.app import DicomflowApp

__all__ = ["sink_batch", "batches", "run_batches", "release", "stopping", "dead_letter_rejected", "serve_sink",
           "event_bytes", "event_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")


def batches(stream: StreamT[Any], size: int, within: float) -> AsyncIterator[Sequence[EventT]]:
    """Batches of events that are never acked by Faust itself (``Stream.noack_take``).

    faust 0.15's ``take_events`` acks the batch in a ``finally`` around its ``yield``: an
    exception out of the body (and the cancellation at shutdown) acked, and soon
    committed, events that were never processed. Use :func:`run_batches`, which acks
    only what it processed.
    """
    return cast(AsyncIterator[Sequence[EventT]], cast(Stream[Any], stream).noack_take(size, within=within))


def stopping(app: DicomflowApp) -> Callable[[], bool]:
    """True while the worker stops or a rebalance is under way: retry loops must give up then,
    since Faust waits for every unacked event before a revocation completes."""
    return lambda: bool(app.should_stop or getattr(app, "rebalancing", False))


def release(app: DicomflowApp, events: Iterable[EventT]) -> None:
    """Give up on events without acking them, so a revocation does not wait for them.

    Faust's ``wait_empty`` waits for every message it handed out (a weak set of unacked
    messages). Not acked, the committed offset stays below them, and the partition's next
    owner (this worker again, or another) replays them from there.
    """
    try:
        unacked = app.consumer._unacked_messages  # type: ignore[attr-defined]  # noqa: SLF001 - see above
    except Exception:  # noqa: BLE001 - no consumer (tests): nothing waits
        return
    for event in events:
        unacked.discard(event.message)


async def run_batches(app: DicomflowApp, stream: StreamT[Any], size: int, within: float, *, stage: str,
                      prepare: Callable[[Sequence[EventT]], Awaitable[P]],
                      handle: Callable[[P], Awaitable[None]],
                      on_abort: Callable[[Sequence[EventT]], None] = lambda events: None,
                      ack: Callable[[Sequence[EventT], Callable[[EventT], Awaitable[Any]]], Awaitable[None]]
                      | None = None) -> None:
    """Consume ``stream`` in batches; ack a batch only once ``handle`` returned for it.

    ``ack`` takes over the acks of a handled batch (given the stream's ack), e.g. to hold
    them until a later stage is done with the events.

    ``prepare`` runs once per batch (e.g. the gap guard, decoding); it raises nothing but
    :class:`RetryAborted`. ``handle`` is retried with backoff on any exception (counter
    ``agent_batch_retries`` of ``stage``, an ERROR log line), so no exception leaves the
    body with events acked. While the worker stops or rebalances the retry gives up: the
    batch is released unacked and ``on_abort`` runs (e.g. the gap guard forgets its
    partitions, so the records are read again from the committed offset).
    """
    s = cast(Stream[Any], stream)
    should_stop = stopping(app)
    counters = _retry_counters(app, stage)

    def on_error(exc: BaseException) -> None:
        counters["agent_batch_retries"] += 1

    async for events in batches(stream, size, within):
        try:
            prepared = await prepare(events)
            await retry_until_done(lambda p=prepared: handle(p), what=f"{stage} batch of {len(events)} events",  # type: ignore[misc]
                                   should_stop=should_stop, on_error=on_error)
        except RetryAborted as exc:
            counters["agent_batches_released"] += 1
            log.warning("%s batch released unacked (replayed from the committed offset) events=%s reason=%s",
                        stage, len(events), exc)
            on_abort(events)
            release(app, events)
            continue
        if ack is not None:
            await ack(events, s.ack)
            continue
        for event in events:
            await s.ack(event)


def _retry_counters(app: DicomflowApp, stage: str) -> dict[str, float]:
    name = f"{stage}_agent"
    counters = app.metrics.stages.get(name)
    if counters is None:
        counters = {"agent_batch_retries": 0, "agent_batches_released": 0}
        app.metrics.register_counters(name, counters)
    return cast(dict[str, float], counters)


def serve_sink(app: DicomflowApp, sink: BatchingSink[Any], name: str) -> None:
    """Start ``sink`` with the worker, stop it at shutdown, publish its counters as ``name``."""

    async def start() -> None:
        await start_or_defer(sink)

    app.start_with(start)
    app.close_on_shutdown(sink.stop)
    app.metrics.register_counters(name, sink.counters)


def event_bytes(event: EventT) -> bytes:
    """The event's value as bytes (values are raw; a tombstone is empty)."""
    return event.value if isinstance(event.value, bytes) else bytes(event.value or b"")


def event_key(event: EventT) -> str | None:
    return event.key.decode() if isinstance(event.key, bytes) else event.key


SinkInput = tuple[list[SinkItem[Any]], list[Rejected[Any]]]


def sink_items(events: Sequence[EventT], decode: Callable[[bytes], Any],
               missing: Sequence[Any] = ()) -> SinkInput:
    """The sink items of ``missing`` records (the gap guard's) and ``events``, and the undecodable ones."""
    items: list[SinkItem[Any]] = []
    undecodable: list[Rejected[Any]] = []
    sources = [(r.topic, r.partition, r.offset, r.timestamp, r.value, r.key) for r in missing]
    sources += [(e.message.topic, e.message.partition, e.message.offset, e.message.timestamp or 0.0,
                 event_bytes(e), e.key) for e in events]
    for topic, partition, offset, timestamp, raw, raw_key in sources:
        key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        item: SinkItem[Any] = SinkItem(value=None, key=key, topic=topic, partition=partition, offset=offset,
                                       timestamp=timestamp, raw=raw)
        try:
            value = decode(raw)
        except Exception as exc:
            undecodable.append(Rejected(item, SinkDataError(f"undecodable message: {exc}")))
            continue
        items.append(SinkItem(value=value, key=key, topic=topic, partition=partition, offset=offset,
                              timestamp=timestamp, raw=raw))
    return items, undecodable


async def write_items(app: DicomflowApp, sink: BatchingSink[T], prepared: SinkInput, stage: str) -> int:
    """Write prepared items with retry and dead-letter refusals; safe to call again after a failure."""
    items, undecodable = prepared
    sink.take_batches()  # whatever a failed attempt left buffered is re-added below
    for item in items:
        sink.add(item)

    async def on_rejected(rejected: Sequence[Rejected[Any]]) -> None:
        await dead_letter_rejected(app, rejected, stage)

    if undecodable:
        await on_rejected(undecodable)
    return await flush_with_retry(sink, on_rejected=on_rejected, should_stop=stopping(app))


async def sink_batch(app: DicomflowApp, sink: BatchingSink[T], events: Sequence[EventT],
                     decode: Callable[[bytes], T], stage: str) -> int:
    """Add the events to ``sink``, flush with retry, dead-letter what the sink refused."""
    return await write_items(app, sink, sink_items(events, decode), stage)


async def dead_letter_rejected(app: DicomflowApp, rejected: Sequence[Rejected[Any]], stage: str) -> None:
    """Put rows a destination refused as data on the sink dead-letter topic, with the reason."""
    for r in rejected:
        letter = dead_letter(error=r.error, stage=stage, worker=app.settings.worker_id, raw=r.item.raw,
                             original=_json(r.item.raw),
                             source={"topic": r.item.topic, "partition": r.item.partition, "offset": r.item.offset})
        await app.queues.sink_dlq.send(key=(r.item.key or "").encode() or None, value=letter)
        app.metrics.dead_letters.labels(stage, r.error.code).inc()
        log.warning("sink refused row stage=%s code=%s field=%s offset=%s message=%s", stage, r.error.code,
                    r.error.field, r.item.offset, r.error.message)


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
