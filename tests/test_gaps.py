"""The gap guard against a real broker: where a stage must start, and what it recovers."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from agents import gaps
from core.settings import Settings
from dicomflow.embedded.broker import EmbeddedBroker
from streams.admin import ensure_topics

TOPIC = "gap_guard_test"


@pytest.fixture
async def topic(fresh_broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    settings = Settings.from_env({"DICOMFLOW_HOME": str(tmp_path), "DICOMFLOW_BROKER": fresh_broker.url,
                                  "DICOMFLOW_APP_ID": "gap-guard-test"})
    monkeypatch.setattr(gaps, "settings", settings)
    await ensure_topics(fresh_broker.bootstrap, [TOPIC], 1)
    producer = AIOKafkaProducer(bootstrap_servers=fresh_broker.bootstrap, max_batch_size=1)
    await producer.start()
    try:
        for i in range(10):
            await (await producer.send(TOPIC, value=f"v{i}".encode(), partition=0))
    finally:
        await producer.stop()
    return TOPIC


async def test_without_a_committed_offset_the_guard_expects_the_first_offset(topic: str) -> None:
    # A predecessor killed before its first commit: Faust starts this partition at the
    # beginning, so a first event at offset 5 means 0..4 never arrived.
    guard = gaps.GapGuard(topic)
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
    guard = gaps.GapGuard(topic)
    assert await guard.check(0, 7) == (False, [])
    guard.forget([gaps.TP(topic, 0)])
    again, missing = await guard.check(0, 9)
    assert [r.offset for r in missing] == [7, 8] and not again
