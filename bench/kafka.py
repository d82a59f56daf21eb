"""Cheap topic probes for polling: message counts from end offsets (no consuming)."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.broker import bootstrap_of

__all__ = ["OffsetProbe"]


class OffsetProbe:
    """Counts messages in topics by their offsets; one client reused across polls."""

    def __init__(self, broker_url: str) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_of(broker_url), enable_auto_commit=False)
        self._parts: dict[str, list[TopicPartition]] = {}

    async def __aenter__(self) -> OffsetProbe:
        await self._consumer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._consumer.stop()

    async def _partitions(self, topic: str, timeout: float = 30.0) -> list[TopicPartition]:
        if topic in self._parts:
            return self._parts[topic]
        deadline = time.monotonic() + timeout
        while True:
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                tps = self._parts[topic] = [TopicPartition(topic, p) for p in sorted(parts)]
                return tps
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} does not exist")
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.2)

    async def count(self, topic: str) -> int:
        """Messages currently in ``topic`` (end minus beginning offsets, over all partitions)."""
        tps = await self._partitions(topic)
        ends = await self._consumer.end_offsets(tps)
        starts = await self._consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)

    async def counts(self, *topics: str) -> dict[str, int]:
        return {t: await self.count(t) for t in topics}
