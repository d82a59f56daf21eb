"""The incarnation id: which broker's offsets a Doris label counts (issue 13 item 4).

A Stream Load label names an offset range, and Doris keeps labels per database for about
12 h. Offsets alone do not name content forever: a reset broker (the embedded one keeps
nothing), recreated topics, or a second site loading into the same Doris database all
count from offset 0 again. So every label also carries the incarnation id of the broker
whose offsets it counts.

The id lives where the offsets live: the first record of partition 0 of
``dicomflow_incarnation``. A worker that finds the topic empty writes a random id, then
reads the partition again: the first record wins a race between workers, so every worker
of one broker uses the same id, and a new broker (or a recreated topic) gets a new one.

The label carries the first :data:`ID_HEX` hex digits (64 bits). Two incarnations collide
only if their random ids match; for n incarnations that ever load into one database the
chance is about n**2 / 2**65 (1e-11 for ten thousand resets), and a collision only matters
if the same table, topic, partition and offsets are loaded by both within the 12 h a label
lives.

On Kafka/Redpanda, keep the record: create the topic with ``retention.ms=-1`` (or
``cleanup.policy=compact``; each record's key is its id, so compaction keeps them all).
If retention deletes it, the next worker start writes a new id: labels stay unique, but a
replay across that start is no longer recognised by its label.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket

import orjson
from aiokafka import AIOKafkaProducer

from core.errors import BrokerError
from streams.broker import Record, kafka_client_kwargs, read_range
from streams.topology import INCARNATION

__all__ = ["ID_HEX", "read_incarnation", "parse_incarnation"]

log = logging.getLogger(__name__)

#: Hex digits of the id that go into labels (64 bits; see the module docstring).
ID_HEX = 16
_PARTITION = 0


def parse_incarnation(record: Record) -> str | None:
    """The id a record holds (lower-case hex, :data:`ID_HEX` digits), or None if it holds none."""
    try:
        value = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        return None
    raw = value.get("id") if isinstance(value, dict) else None
    if not isinstance(raw, str) or len(raw) < ID_HEX:
        return None
    candidate = raw[:ID_HEX].lower()
    try:
        int(candidate, 16)
    except ValueError:
        return None
    return candidate


async def _first(bootstrap: str, topic: str) -> str | None:
    for record in await read_range(bootstrap, topic, _PARTITION, None, None):
        found = parse_incarnation(record)
        if found is not None:
            return found
        log.warning("incarnation topic=%s offset=%s holds no id: skipped", topic, record.offset)
    return None


async def _propose(bootstrap: str, topic: str) -> None:
    proposal = secrets.token_hex(16)
    value = orjson.dumps({"id": proposal, "host": socket.gethostname(), "pid": os.getpid()})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **kafka_client_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=proposal.encode(), partition=_PARTITION)
    finally:
        await producer.stop()


async def read_incarnation(bootstrap: str, *, topic: str = INCARNATION) -> str:
    """This broker's incarnation id, created on first use (the topic must exist).

    Raises :class:`BrokerError` if the broker holds no readable id even after writing one.
    """
    found = await _first(bootstrap, topic)
    if found is None:
        await _propose(bootstrap, topic)
        found = await _first(bootstrap, topic)  # ours, or the one another worker wrote first
        if found is None:
            raise BrokerError(f"no incarnation id readable from {topic} after writing one")
        log.info("incarnation created topic=%s id=%s", topic, found)
    else:
        log.info("incarnation read topic=%s id=%s", topic, found)
    return found
