"""The cached partitioner sends every key where Kafka's default partitioner does (issue #15)."""

from __future__ import annotations

import os

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from dicomflow.embedded.broker import EmbeddedBroker
from streams.broker import ensure_topics
from streams.partitioner import CachedPartitioner
from tests.harness import read_all


def test_same_partition_as_the_default_for_every_key_and_partition_count() -> None:
    cached, default = CachedPartitioner(size=64), DefaultPartitioner()
    keys = [f"tenant-{i % 7}/1.2.826.0.1.{i}/1.2.826.0.1.{i}.{i % 13}".encode() for i in range(500)]
    keys += [os.urandom(n) for n in range(0, 200, 7)]
    for parts in (1, 2, 3, 4, 12, 50):
        all_partitions = list(range(parts))
        for key in keys + keys:  # the second pass is served from the cache (and past its bound)
            assert cached(key, all_partitions, all_partitions) == default(key, all_partitions, all_partitions)
    assert len(cached._hashes) <= 64  # noqa: SLF001 - bounded


async def test_records_land_where_the_default_partitioner_puts_them(fresh_broker: EmbeddedBroker) -> None:
    topic = "partitioner_check"
    await ensure_topics(fresh_broker.bootstrap, [topic], 4)
    producer = AIOKafkaProducer(bootstrap_servers=fresh_broker.bootstrap, max_batch_size=1, linger_ms=0,
                                partitioner=CachedPartitioner())
    await producer.start()
    keys = [f"t/1.2.3.{i}/1.2.3.{i}.1".encode() for i in range(40)]
    try:
        for key in keys:
            await (await producer.send(topic, key=key, value=b"v"))
    finally:
        await producer.stop()
    default = DefaultPartitioner()
    got = {(m.key, m.partition) for m in await read_all(fresh_broker.url, topic)}
    assert got == {(k, default(k, [0, 1, 2, 3], [0, 1, 2, 3])) for k in keys}
    assert len({p for _, p in got}) > 1  # the keys really were spread
