"""Dead letters outlive the embedded broker: archived on disk, restored into a fresh broker (issue #13)."""

from __future__ import annotations

from pathlib import Path

import orjson

from core.settings import EMBEDDED_PROFILE
from dicomflow.embedded.broker import EmbeddedBroker
from feeders.dlq_archive import DeadLetterArchive
from feeders.publisher import EventPublisher
from streams.broker import end_offsets, read_range
from streams.topology import DLQ, SINK_DLQ


def _letter(trace: str, time: str, worker: str) -> bytes:
    return orjson.dumps({"event": {"trace_id": trace}, "error": {"code": "MISSING_REQUIRED_FIELD"},
                         "stage": "ingest", "time": time, "worker": worker})


async def _letters(broker: EmbeddedBroker) -> list[bytes]:
    out: list[bytes] = []
    for tp in await end_offsets(broker.bootstrap, [DLQ]):
        out += [r.value for r in await read_range(broker.bootstrap, DLQ, tp.partition, None, None)]
    return sorted(out)


async def test_letters_are_archived_once_and_restored_into_a_fresh_broker(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "a.log") as first:
        publisher = EventPublisher(first.url, EMBEDDED_PROFILE, partitions=2)
        await publisher.start()
        try:
            archive = DeadLetterArchive(tmp_path / "deadletters", first.bootstrap, publisher, [DLQ, SINK_DLQ])
            archive.start()
            await publisher.publish_raw(_letter("t1", "2026-12-02T10:00:00", "w1"), "k1", topic=DLQ)
            # the same event refused again after a replay: another time, another worker
            await publisher.publish_raw(_letter("t1", "2026-12-02T10:05:00", "w2"), "k1", topic=DLQ)
            await publisher.publish_raw(_letter("t2", "2026-12-02T10:00:01", "w1"), "k2", topic=DLQ)
            assert await archive.sync() == 2
            assert await archive.sync() == 0  # nothing new
        finally:
            await publisher.stop()
    lines = (tmp_path / "deadletters" / "archive.jsonl").read_bytes().splitlines()
    assert len(lines) == 2
    with EmbeddedBroker(log_path=tmp_path / "b.log") as fresh:
        publisher = EventPublisher(fresh.url, EMBEDDED_PROFILE, partitions=2)
        await publisher.start()
        try:
            again = DeadLetterArchive(tmp_path / "deadletters", fresh.bootstrap, publisher, [DLQ, SINK_DLQ])
            again.start()
            assert len(again) == 2
            await again.sync()
            restored = await _letters(fresh)
            assert len(restored) == 2
            assert {orjson.loads(v)["event"]["trace_id"] for v in restored} == {"t1", "t2"}
            await again.sync()  # a second round restores nothing twice
            assert len(await _letters(fresh)) == 2
        finally:
            await publisher.stop()


async def test_the_relays_lag_probe_reads_a_real_broker_with_one_client(fresh_broker: EmbeddedBroker) -> None:
    from aiokafka import TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    from feeders.relay import BrokerLag
    from streams.broker import ensure_topics, new_consumer
    from streams.topology import IMAGE, STORAGE

    await ensure_topics(fresh_broker.bootstrap, [STORAGE, IMAGE], 1)
    publisher = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=1)
    await publisher.start()
    try:
        for i in range(3):
            await publisher.publish_raw(b"{}", f"k{i}", topic=STORAGE)
        await publisher.publish_raw(b"{}", "k", topic=IMAGE)
    finally:
        await publisher.stop()
    committer = new_consumer(fresh_broker.bootstrap, "g-lag")
    await committer.start()
    try:
        committer.assign([TopicPartition(STORAGE, 0)])
        await committer.commit({TopicPartition(STORAGE, 0): OffsetAndMetadata(1, "")})
    finally:
        await committer.stop()
    lag = BrokerLag(fresh_broker.url, "g-lag", [STORAGE, IMAGE])
    try:
        assert await lag.input_lag() == 2  # only what ingest has not read yet
        assert await lag.total_lag() == 3
        first = lag._client
        assert await lag.input_lag() == 2 and lag._client is first  # the same client every time
    finally:
        await lag.close()
