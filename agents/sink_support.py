"""Shared plumbing of the sink agents: consume a batch, flush it, dead-letter refusals.

The body of a sink agent returns only when every event of the batch is written or
dead-lettered, so Faust's ack (and with it the offset commit) never passes unwritten
data; while the destination is down the flush keeps retrying and the partition stalls,
which is the backpressure.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson
from faust import Stream
from faust.types import EventT, StreamT

from core.errors import SinkDataError
from schemas.deadletter import dead_letter
from sinks.base import BatchingSink, Rejected, SinkItem, flush_with_retry, start_or_defer

if TYPE_CHECKING:
    from streams.app import DicomflowApp

__all__ = ["sink_batch", "batches", "dead_letter_rejected", "serve_sink", "event_bytes", "event_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def batches(stream: StreamT[Any], size: int, within: float) -> AsyncIterator[Sequence[EventT]]:
    """``Stream.take_events``, which the StreamT protocol does not declare."""
    return cast(AsyncIterator[Sequence[EventT]], cast(Stream[Any], stream).take_events(size, within=within))


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


async def sink_batch(app: DicomflowApp, sink: BatchingSink[T], events: Sequence[EventT],
                     decode: Callable[[bytes], T], stage: str) -> int:
    """Add the events to ``sink``, flush with retry, dead-letter what the sink refused."""
    undecodable: list[Rejected[Any]] = []
    for event in events:
        msg = event.message
        raw = event_bytes(event)
        key = event_key(event)
        item: SinkItem[Any] = SinkItem(value=None, key=key, topic=msg.topic, partition=msg.partition,
                                       offset=msg.offset, timestamp=msg.timestamp or 0.0, raw=raw)
        try:
            value = decode(raw)
        except Exception as exc:
            undecodable.append(Rejected(item, SinkDataError(f"undecodable message: {exc}")))
            continue
        sink.add(SinkItem(value=value, key=key, topic=msg.topic, partition=msg.partition, offset=msg.offset,
                          timestamp=msg.timestamp or 0.0, raw=raw))

    async def on_rejected(rejected: Sequence[Rejected[Any]]) -> None:
        await dead_letter_rejected(app, rejected, stage)

    if undecodable:
        await on_rejected(undecodable)
    return await flush_with_retry(sink, on_rejected=on_rejected, should_stop=lambda: bool(app.should_stop))


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
