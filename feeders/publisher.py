"""Publishing storage events to ``storage_queue``: the feeders' side of the contract.

``publish`` returns only once the broker has acknowledged the record (acks=all), so
a feeder can answer its own client (the SCP's C-STORE response) truthfully.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core.errors import BrokerError
from core.settings import BrokerProfile, BrokerSecurity
from schemas import codec
from streams.broker import bootstrap_of, ensure_topics, kafka_client_kwargs
from streams.partitioner import CachedPartitioner
from streams.topology import ALL_TOPICS, STORAGE

__all__ = ["EventPublisher"]

log = logging.getLogger(__name__)


class EventPublisher:
    """An aiokafka producer for storage events. I/O only in :meth:`start`.

    ``security`` (TLS/SASL) defaults to what the environment describes.
    """

    def __init__(self, broker_url: str, profile: BrokerProfile, *, partitions: int,
                 topic: str = STORAGE, request_timeout_s: float = 10.0,
                 security: BrokerSecurity | None = None) -> None:
        self.bootstrap = bootstrap_of(broker_url)
        self.profile = profile
        self.partitions = partitions
        self.topic = topic
        self.request_timeout_s = request_timeout_s
        self.security = BrokerSecurity.from_env() if security is None else security
        self._producer: AIOKafkaProducer | None = None

    def new_producer(self) -> AIOKafkaProducer:
        """The (not yet started) producer: acks=all, the profile's batching, TLS/SASL from ``security``."""
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            max_batch_size=max(self.profile.producer_max_batch_size, 1),
            linger_ms=int(self.profile.producer_linger_s * 1000),
            request_timeout_ms=int(self.request_timeout_s * 1000),
            partitioner=CachedPartitioner(),  # Kafka's partitions; the hash of recent keys kept
            **kafka_client_kwargs(self.security),
        )

    async def start(self) -> None:
        await ensure_topics(self.bootstrap, ALL_TOPICS, self.partitions, security=self.security)
        producer = self.new_producer()
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise BrokerError(f"cannot reach broker {self.bootstrap}: {exc}") from exc
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def publish(self, event: dict[str, Any], key: str | None, *, topic: str | None = None) -> None:
        """Send one event and wait for the broker's acknowledgement; BrokerError on failure."""
        await self.publish_raw(codec.dumps(event), key, topic=topic)

    async def publish_raw(self, value: bytes, key: str | None, *, topic: str | None = None) -> None:
        if self._producer is None:
            raise BrokerError("publisher is not started")
        try:
            fut = await self._producer.send(topic or self.topic, value=value,
                                            key=key.encode() if key else None)
            await fut
        except KafkaError as exc:
            raise BrokerError(f"broker did not acknowledge the event: {exc}") from exc
