"""Send many records concurrently while keeping each key's order.

aiokafka keeps at most one open batch per topic-partition and makes ``send`` wait
until that batch is drained into a request. On the embedded broker every batch holds
one record (Tansu's high-watermark workaround), so sending a stage's outputs one after
another costs a broker round trip per record whenever two in a row share a partition,
which consecutive instances of one series always do. Here every (topic, key) lane
sends on its own task: one request then carries the next record of every lane, and a
key's records still go out in the order they were added.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["LaneSender"]

T = TypeVar("T")
Lane = tuple[str, bytes | None]


class LaneSender(Generic[T]):
    """``add`` records as they are ready; ``drain`` waits until every one is handed to the producer.

    A failed or cancelled send fails the whole sender: its lane stops (later records of that
    key would otherwise overtake it), records added afterwards are dropped, and ``drain``
    raises, so the caller never treats the batch as sent.
    """

    def __init__(self, send: Callable[[T], Awaitable[object]], lane_of: Callable[[T], Lane]) -> None:
        self._send = send
        self._lane_of = lane_of
        self._queues: dict[Lane, deque[T]] = {}
        self._running: dict[Lane, asyncio.Task[None]] = {}
        self._finished: list[asyncio.Task[None]] = []
        self._failed = False

    def add(self, record: T) -> None:
        if self._failed:
            return  # drain() raises; sending later records would break their lane's order
        lane = self._lane_of(record)
        queue = self._queues.get(lane)
        if queue is None:
            queue = self._queues[lane] = deque()
        queue.append(record)
        if lane not in self._running:
            self._start(lane, queue)

    def _start(self, lane: Lane, queue: deque[T]) -> None:
        task = asyncio.ensure_future(self._serve(queue))
        self._running[lane] = task
        task.add_done_callback(lambda t: self._done(lane, queue, t))

    def _done(self, lane: Lane, queue: deque[T], task: asyncio.Task[None]) -> None:
        # A done callback, not a finally: it also runs for a task cancelled before its first step.
        if self._running.get(lane) is task:
            del self._running[lane]
        self._finished.append(task)
        if task.cancelled() or task.exception() is not None:
            self._failed = True
            queue.clear()
        elif queue and not self._failed:
            self._start(lane, queue)  # added after the task's last look at its queue

    async def _serve(self, queue: deque[T]) -> None:
        while queue:
            await self._send(queue.popleft())

    def cancel(self) -> None:
        """Stop every lane (the caller is failing or shutting down); nothing more is sent."""
        self._failed = True
        for task in list(self._running.values()):
            task.cancel()

    async def drain(self) -> None:
        """Wait for every lane; raise the first send error, or CancelledError for a cancelled send."""
        while self._running:
            await asyncio.wait(list(self._running.values()))
        finished, self._finished = self._finished, []
        failed, self._failed = self._failed, False
        self._queues.clear()
        errors = [t.exception() for t in finished if not t.cancelled() and t.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        if failed:
            raise asyncio.CancelledError("a send was cancelled before the batch was handed to the producer")

    @property
    def lanes(self) -> int:
        return len(self._queues)
