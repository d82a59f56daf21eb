"""The gap guard against a real broker: where a stage must start, and what it recovers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents import gaps
from dicomflow.embedded.broker import EmbeddedBroker
from streams.broker import ensure_topics

TOPIC = "gap_guard_test"


def _app(broker: EmbeddedBroker) -> Any:
    """What the guard reads of an app: the broker and the group."""
    return SimpleNamespace(bootstrap=broker.bootstrap, settings=SimpleNamespace(app_id="gap-guard-test"))


@pytest.fixture
async def topic(fresh_broker: EmbeddedBroker) -> str:
    await ensure_topics(fresh_broker.bootstrap, [TOPIC], 1)
    producer = AIOKafkaProducer(bootstrap_servers=fresh_broker.bootstrap, max_batch_size=1)
    await producer.start()
    try:
        for i in range(10):
            await (await producer.send(TOPIC, value=f"v{i}".encode(), partition=0))
    finally:
        await producer.stop()
    return TOPIC


async def test_without_a_committed_offset_the_guard_expects_the_first_offset(topic: str,
                                                                             fresh_broker: EmbeddedBroker) -> None:
    # A predecessor killed before its first commit: Faust starts this partition at the
    # beginning, so a first event at offset 5 means 0..4 never arrived.
    guard = gaps.GapGuard(_app(fresh_broker), topic)
    again, missing = await guard.check(0, 5)
    assert not again
    assert [r.offset for r in missing] == [0, 1, 2, 3, 4]
    assert [r.value for r in missing] == [b"v0", b"v1", b"v2", b"v3", b"v4"]
    assert guard.stats["gap_records_recovered"] == 5
    assert await guard.check(0, 6) == (False, [])
    assert (await guard.check(0, 3))[0]  # delivered again


async def test_with_a_committed_offset_the_guard_starts_there(topic: str, fresh_broker: EmbeddedBroker) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=fresh_broker.bootstrap, group_id="gap-guard-test",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.commit({tp: 7})
    finally:
        await consumer.stop()
    guard = gaps.GapGuard(_app(fresh_broker), topic)
    assert await guard.check(0, 7) == (False, [])
    guard.forget([(topic, 0)])
    again, missing = await guard.check(0, 9)
    assert [r.offset for r in missing] == [7, 8] and not again
