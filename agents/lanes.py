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
    """``add`` records as they are ready; ``drain`` waits until every one is handed to the producer."""

    def __init__(self, send: Callable[[T], Awaitable[object]], lane_of: Callable[[T], Lane]) -> None:
        self._send = send
        self._lane_of = lane_of
        self._queues: dict[Lane, deque[T]] = {}
        self._running: dict[Lane, asyncio.Task[None]] = {}
        self._finished: list[asyncio.Task[None]] = []
        self._failed = False

    def add(self, record: T) -> None:
        if self._failed:
            return  # drain() raises the error; sending later records would break their lane's order
        lane = self._lane_of(record)
        queue = self._queues.get(lane)
        if queue is None:
            queue = self._queues[lane] = deque()
        queue.append(record)
        if lane not in self._running:
            self._running[lane] = asyncio.ensure_future(self._serve(lane, queue))

    async def _serve(self, lane: Lane, queue: deque[T]) -> None:
        try:
            while queue:
                await self._send(queue.popleft())
        except BaseException:
            self._failed = True
            queue.clear()
            raise
        finally:
            # No await between the emptiness check and this removal: add() either saw
            # this task running (and its record is sent above) or starts a new one.
            task = self._running.pop(lane)
            self._finished.append(task)

    async def drain(self) -> None:
        """Wait for every lane; the first send error is raised after all lanes stop."""
        while self._running:
            await asyncio.wait(list(self._running.values()))
        finished, self._finished = self._finished, []
        errors = [t.exception() for t in finished if not t.cancelled() and t.exception() is not None]
        self._queues.clear()
        self._failed = False
        if errors:
            raise errors[0]  # type: ignore[misc]

    @property
    def lanes(self) -> int:
        return len(self._queues)
