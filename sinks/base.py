"""Sink contract: configure, start, then add -> flush -> commit (after quixstreams' BatchingSink).

* ``__init__`` stores configuration only: no I/O, no event loop needed.
* :meth:`BatchingSink.start` does the I/O (pools, sessions, schema) and is called
  explicitly once, at worker start (:func:`start_or_defer`). A destination that is not up
  yet must not stop the worker: ``write`` starts the sink itself when ``start`` failed,
  under the flush's retry, so the partition waits instead.
* An agent buffers consumed events with :meth:`BatchingSink.add` (or a whole batch whose
  offsets it fixed with :meth:`BatchingSink.add_batch`), then awaits
  :func:`flush_with_retry`. That returns only once every item is either written or
  rejected as bad data (handed to ``on_rejected``, the dead-letter path).
* Only then does the agent commit (ack) the events, so offsets are never committed past
  unwritten data. A transient failure blocks the partition (backpressure) and is retried
  with capped backoff; it never escapes to the agent.
* ``write(batch)`` is idempotent (a replayed batch changes nothing) and classifies
  failures: :class:`SinkRetryableError` (the same batch may succeed later), rows returned
  as :class:`Rejected` or a :class:`SinkDataError` (bad data, never retried), anything
  else (a bug or misconfiguration) propagates.

Sinks import only settings, errors and schemas: they know nothing of Faust or the broker.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from core.errors import DicomflowError, SinkDataError, SinkError, SinkRetryableError

__all__ = [
    "SinkItem",
    "SinkBatch",
    "Rejected",
    "BatchingSink",
    "Backoff",
    "flush_with_retry",
    "start_or_defer",
    "RetryAborted",
    "retry_until_done",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SinkItem(Generic[T]):
    """One consumed record with its source coordinates (used for labels and dead letters)."""

    value: T
    key: str | None
    topic: str
    partition: int
    offset: int
    timestamp: float = 0.0
    raw: bytes = b""


@dataclass(slots=True)
class SinkBatch(Generic[T]):
    """The items of one source (topic, partition), in offset order."""

    topic: str
    partition: int
    items: list[SinkItem[T]] = field(default_factory=list)
    #: The source offsets this batch stands for, when the caller fixed them (records
    #: inside the range may have been skipped, e.g. as duplicates).
    source_range: tuple[int, int] | None = None
    #: Rebuilt from a recorded intent (a replay): an earlier attempt may already hold its label.
    replay: bool = False

    @property
    def first_offset(self) -> int:
        return self.source_range[0] if self.source_range else self.items[0].offset

    @property
    def last_offset(self) -> int:
        return self.source_range[1] if self.source_range else self.items[-1].offset

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class Rejected(Generic[T]):
    """An item the destination refused as data; it goes to the dead-letter topic."""

    item: SinkItem[T]
    error: DicomflowError


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with jitter."""

    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0
    _next: float = 0.0

    def reset(self) -> None:
        self._next = 0.0

    def next_delay(self, hint: float | None = None) -> float:
        self._next = self.initial if self._next == 0.0 else min(self.maximum, self._next * self.factor)
        delay = max(self._next, hint or 0.0)
        return min(self.maximum, delay) * (0.8 + 0.4 * random.random())


class BatchingSink(abc.ABC, Generic[T]):
    """Buffers items per (topic, partition) and writes them in batches.

    ``__init__`` stores configuration only; I/O starts in :meth:`start`.
    """

    name: str = "sink"

    def __init__(self) -> None:
        self._batches: dict[tuple[str, int], SinkBatch[T]] = {}
        self.counters: dict[str, float] = {"batches": 0, "rows": 0, "rejected": 0, "retries": 0,
                                           "latency_s_total": 0.0}

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections (idempotent); raise SinkRetryableError if the destination is not up yet.

        ``write`` must call it again when an earlier call failed.
        """

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Close connections."""

    def add(self, item: SinkItem[T]) -> None:
        key = (item.topic, item.partition)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = SinkBatch(item.topic, item.partition)
        batch.items.append(item)

    def add_batch(self, batch: SinkBatch[T]) -> None:
        """Queue a whole batch whose boundaries the caller decided (see SinkBatch.source_range)."""
        key = (batch.topic, batch.partition)
        if key in self._batches:
            raise ValueError(f"a batch for {key} is already pending")
        self._batches[key] = batch

    def take_batches(self) -> list[SinkBatch[T]]:
        batches, self._batches = list(self._batches.values()), {}
        return batches

    def pending(self) -> int:
        return sum(len(b) for b in self._batches.values())

    @abc.abstractmethod
    async def write(self, batch: SinkBatch[T]) -> Sequence[Rejected[T]]:
        """Write one batch idempotently.

        Return the items rejected as bad data (possibly none). Raise
        :class:`SinkRetryableError` when the same batch may succeed later.
        """


async def flush_with_retry(
    sink: BatchingSink[T],
    *,
    on_rejected: Callable[[Sequence[Rejected[T]]], Awaitable[None]],
    should_stop: Callable[[], bool] = lambda: False,
    backoff: Backoff | None = None,
) -> int:
    """Write every buffered batch; retry transient failures until they succeed.

    Returns the number of items written. Rejected items are handed to ``on_rejected``
    (the dead-letter path) before this returns. If ``should_stop`` turns true while
    retrying, raises :class:`RetryAborted` so the caller does not ack.
    """
    written = 0
    loop = asyncio.get_running_loop()
    for batch in sink.take_batches():
        bo = backoff or Backoff()
        while True:
            started = loop.time()
            try:
                rejected = await sink.write(batch)
            except SinkRetryableError as exc:
                sink.counters["retries"] += 1
                delay = bo.next_delay(exc.retry_after)
                log.warning("sink=%s topic=%s partition=%s offsets=%s..%s retry_in_s=%.2f error=%s",
                            sink.name, batch.topic, batch.partition, batch.first_offset,
                            batch.last_offset, delay, exc.message)
                if should_stop():
                    raise RetryAborted(f"sink={sink.name} gave up retrying: stopping or rebalancing") from exc
                await asyncio.sleep(delay)
                continue
            except SinkDataError as exc:
                # The whole batch was refused as data and the sink could not isolate rows.
                rejected = [Rejected(item, exc) for item in batch.items]
            sink.counters["batches"] += 1
            sink.counters["latency_s_total"] += loop.time() - started
            sink.counters["rows"] += len(batch) - len(rejected)
            sink.counters["rejected"] += len(rejected)
            written += len(batch) - len(rejected)
            if rejected:
                await on_rejected(rejected)
            if not batch.items:
                break
            log.info("sink=%s topic=%s partition=%s offsets=%s..%s rows=%s rejected=%s elapsed_s=%.3f",
                     sink.name, batch.topic, batch.partition, batch.first_offset, batch.last_offset,
                     len(batch) - len(rejected), len(rejected), loop.time() - started)
            break
    return written



class RetryAborted(Exception):  # noqa: N818 - it is not an error of the batch
    """A retry loop gave up because the worker is stopping or rebalancing; nothing was acked.

    Faust waits for every unacked event before a revocation completes, so a retry must not
    outlive a rebalance. The events are handed back unacked: the partition's next owner
    replays them from the committed offset (idempotent writes, Doris intents and labels).
    """


async def retry_until_done(attempt: Callable[[], Awaitable[T]], *, what: str,
                           should_stop: Callable[[], bool] = lambda: False,
                           on_error: Callable[[BaseException], None] = lambda exc: None,
                           backoff: Backoff | None = None) -> T:
    """``attempt()`` until it returns; any exception is logged, counted and retried with backoff.

    No exception but :class:`RetryAborted` (``should_stop`` turned true) leaves: an agent
    body that lets one escape has its batch acked by Faust. ``attempt`` must be idempotent.
    """
    bo = backoff or Backoff()
    while True:
        try:
            return await attempt()
        except RetryAborted:
            raise
        except Exception as exc:
            on_error(exc)
            delay = bo.next_delay()
            log.error("retrying %s in %.2fs (not acked) error=%s: %s", what, delay, type(exc).__name__,
                      getattr(exc, "message", None) or exc)
            if should_stop():
                raise RetryAborted(f"{what}: gave up retrying, stopping or rebalancing") from exc
            await asyncio.sleep(delay)
            if should_stop():
                raise RetryAborted(f"{what}: gave up retrying, stopping or rebalancing") from exc


async def start_or_defer(sink: BatchingSink[Any]) -> None:
    """Start ``sink`` at worker start; if that fails, leave it to the sink's first write.

    PostgreSQL still starting (or down) must not stop the worker: ``write`` starts the
    sink again under :func:`flush_with_retry`, whose backoff then holds the partition.
    A hard failure (bad credentials, a missing database) is logged here and raised again
    by that first write, as before start-up was explicit: the other stages keep running.
    """
    try:
        await sink.start()
    except SinkRetryableError as exc:
        log.warning("sink=%s not started, will retry on first write error=%s", sink.name, exc.message)
    except SinkError as exc:
        log.error("sink=%s failed to start, its writes will fail until fixed error=%s", sink.name, exc.message)
