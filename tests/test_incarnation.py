"""The incarnation id (issue 13 item 4): one id per broker, shared by every worker, new after a reset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from dicomflow.embedded.broker import EmbeddedBroker
from sinks.doris import make_label
from streams.broker import ensure_topics
from streams.incarnation import ID_HEX, read_incarnation
from streams.topology import BY_NAME, INCARNATION


def test_the_topic_is_declared() -> None:
    assert INCARNATION in BY_NAME and not BY_NAME[INCARNATION].consumed


async def test_workers_of_one_broker_share_one_id_and_a_reset_broker_gets_another(
        fresh_broker: EmbeddedBroker, tmp_path: Path) -> None:
    await ensure_topics(fresh_broker.bootstrap, [INCARNATION], 4)
    # Several workers start at once on an empty topic: the first record wins for all of them.
    ids = await asyncio.gather(*(read_incarnation(fresh_broker.bootstrap) for _ in range(4)))
    assert len(set(ids)) == 1 and len(ids[0]) == ID_HEX and int(ids[0], 16) >= 0
    assert await read_incarnation(fresh_broker.bootstrap) == ids[0]  # a restart reads the same id
    # A broker reset (a new, empty broker): offsets start at 0 again, under another id.
    with EmbeddedBroker(log_path=tmp_path / "tansu2.log") as reset:
        await ensure_topics(reset.bootstrap, [INCARNATION], 4)
        other = await read_incarnation(reset.bootstrap)
    assert other != ids[0]
    assert make_label("db", "t", "log_queue", 0, 0, 4999, incarnation=ids[0]) != \
        make_label("db", "t", "log_queue", 0, 0, 4999, incarnation=other)


async def test_the_first_record_wins_and_garbage_is_skipped(fresh_broker: EmbeddedBroker) -> None:
    await ensure_topics(fresh_broker.bootstrap, [INCARNATION], 1)
    producer = AIOKafkaProducer(bootstrap_servers=fresh_broker.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(INCARNATION, b"not json", partition=0)
        await producer.send_and_wait(INCARNATION, orjson.dumps({"id": "00112233445566778899aabbccddeeff"}),
                                     partition=0)
        await producer.send_and_wait(INCARNATION, orjson.dumps({"id": "ffeeddccbbaa99887766554433221100"}),
                                     partition=0)
    finally:
        await producer.stop()
    assert await read_incarnation(fresh_broker.bootstrap) == "00112233445566778899aabbccddeeff"[:ID_HEX]
