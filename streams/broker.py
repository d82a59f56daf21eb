"""Broker helpers, in one place: topic creation, offsets, lag inputs and reading ranges.

Every reader of offsets (the gap guard, the lag gauge, ``dicomflow status``, the Doris
sink's intents) goes through here, with a short-lived aiokafka client that never joins
a group, so looking can never cause a rebalance.

Every topic is created with its partition count before any client uses it: Tansu
auto-creates unknown topics with 4 partitions, and Faust then crash-loops with
PartitionsMismatch. An existing topic with a different partition count is an error
that names the topic, never silently accepted.

Every Kafka client of dicomflow takes its TLS/SASL settings from :func:`kafka_client_kwargs`
(the Faust app through :func:`faust_credentials`, the feeders' producer, and the clients
here). A caller that passes no :class:`~core.settings.BrokerSecurity` gets the one the
environment describes, so helpers called with only a bootstrap string are covered too.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from core.errors import BrokerError, ConfigError
from core.settings import BrokerSecurity

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

__all__ = ["kafka_client_kwargs", "faust_credentials", "new_admin", "new_consumer", "bootstrap_of", "ensure_topics",
           "Record", "end_offsets", "beginning_offsets", "committed_offsets",
           "start_offset", "read_range", "read_last", "count_codes"]

log = logging.getLogger(__name__)


def bootstrap_of(url: str) -> str:
    """``kafka://h:p;h2:p2`` -> ``h:p,h2:p2`` (aiokafka's bootstrap form)."""
    for prefix in ("kafka://", "aiokafka://"):
        if url.startswith(prefix):
            url = url[len(prefix):]
    return url.replace(";", ",")


def _ssl_context(security: BrokerSecurity) -> ssl.SSLContext:
    """Verifies the broker's certificate and host name (against ``ssl_ca`` or the system CAs)."""
    try:
        ctx = ssl.create_default_context(cafile=str(security.ssl_ca) if security.ssl_ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the broker CA bundle {security.ssl_ca}: {exc}",
                          field="DICOMFLOW_BROKER_SSL_CA") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def kafka_client_kwargs(security: BrokerSecurity | None = None) -> dict[str, Any]:
    """aiokafka keyword arguments for TLS/SASL (``security_protocol``, ``ssl_context``, ``sasl_*``).

    ``security`` None: read from the environment (:meth:`BrokerSecurity.from_env`).
    """
    security = BrokerSecurity.from_env() if security is None else security
    kwargs: dict[str, Any] = {"security_protocol": security.protocol}
    if security.tls:
        kwargs["ssl_context"] = _ssl_context(security)
    if security.sasl:
        kwargs.update(sasl_mechanism=security.sasl_mechanism, sasl_plain_username=security.sasl_username,
                      sasl_plain_password=security.sasl_password.get())
    return kwargs


def faust_credentials(security: BrokerSecurity | None = None) -> CredentialsT | None:
    """The same settings as Faust's ``broker_credentials`` (None for plaintext)."""
    import faust

    kwargs = kafka_client_kwargs(security)
    if "sasl_mechanism" in kwargs:
        return faust.SASLCredentials(username=kwargs["sasl_plain_username"],
                                     password=kwargs["sasl_plain_password"],
                                     mechanism=kwargs["sasl_mechanism"], ssl_context=kwargs.get("ssl_context"))
    if "ssl_context" in kwargs:
        return faust.SSLCredentials(kwargs["ssl_context"])
    return None


def new_admin(bootstrap: str, timeout: float, security: BrokerSecurity | None = None) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000),
                               **kafka_client_kwargs(security))


def new_consumer(bootstrap: str, group: str | None = None,
                 security: BrokerSecurity | None = None) -> AIOKafkaConsumer:
    """A consumer that never subscribes or auto-commits: looking cannot cause a rebalance."""
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                            **kafka_client_kwargs(security))


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int, *,
                        replication: int = 1, timeout: float = 30.0, security: BrokerSecurity | None = None) -> None:
    admin = new_admin(bootstrap, timeout, security)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await admin.start()
            break
        except KafkaError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerError(f"broker {bootstrap} unreachable: {exc}") from exc
            await asyncio.sleep(0.5)
    try:
        wanted = list(dict.fromkeys(names))
        existing = set(await admin.list_topics())
        missing = [n for n in wanted if n not in existing]
        if missing:
            try:
                await admin.create_topics([NewTopic(n, partitions, replication) for n in missing])
            except TopicAlreadyExistsError:
                pass  # a concurrent worker won the race; checked below
            log.info("created topics=%s partitions=%s", ",".join(missing), partitions)
        described = await admin.describe_topics(wanted)
        for topic in described:
            name = topic.get("topic")
            count = len(topic.get("partitions") or [])
            if count and count != partitions:
                raise ConfigError(
                    f"topic {name} has {count} partitions but DICOMFLOW_PARTITIONS={partitions}; "
                    "set DICOMFLOW_PARTITIONS to match (partition counts cannot shrink)",
                    field="DICOMFLOW_PARTITIONS")
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class Record:
    """A record read straight from the broker (e.g. one Faust skipped, or an intent)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: float


@asynccontextmanager
async def _consumer(bootstrap: str, group: str | None = None) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = new_consumer(bootstrap, group)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


def _partitions(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[TopicPartition, int]:
    async with _consumer(bootstrap) as consumer:
        tps = _partitions(consumer, topics)
        return dict(await consumer.end_offsets(tps)) if tps else {}


async def beginning_offsets(bootstrap: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    async with _consumer(bootstrap) as consumer:
        return {tp: int(o) for tp, o in (await consumer.beginning_offsets(tps)).items()} if tps else {}


async def committed_offsets(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The group's committed offsets (OffsetFetch), without joining the group.

    aiokafka's admin ``list_consumer_group_offsets`` sends an OffsetFetch version that
    Tansu answers by closing the connection; the consumer's ``committed()`` works on
    both Tansu and Kafka/Redpanda, and never subscribes, so it cannot cause a rebalance.
    """
    async with _consumer(bootstrap, group) as consumer:
        out: dict[TopicPartition, int] = {}
        for tp in tps:
            offset = await consumer.committed(tp)
            if offset is not None and offset >= 0:
                out[tp] = offset
        return out


async def start_offset(bootstrap: str, group: str, topic: str, partition: int) -> int:
    """Where ``group`` resumes a partition: its committed offset, else the partition's first."""
    tp = TopicPartition(topic, partition)
    committed = (await committed_offsets(bootstrap, group, [tp])).get(tp)
    if committed is not None:
        return committed
    return (await beginning_offsets(bootstrap, [tp]))[tp]


async def read_range(bootstrap: str, topic: str, partition: int, start: int | None, end: int | None) -> list[Record]:
    """Records ``start <= offset < end`` of one partition (whole partition when None)."""
    async with _consumer(bootstrap) as consumer:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        if start is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, start)
        stop = end if end is not None else (await consumer.end_offsets([tp]))[tp]
        out: list[Record] = []
        while await consumer.position(tp) < stop:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for r in batch.get(tp, []):
                if r.offset < stop:
                    out.append(Record(topic, partition, r.offset, r.key, r.value or b"", (r.timestamp or 0) / 1000.0))
        return out


async def read_last(bootstrap: str, topic: str, partition: int, key: bytes, *,
                    chunk: int = 256) -> tuple[Record | None, int]:
    """The last record of one partition with ``key``, read backwards chunk by chunk from the end.

    Returns it (or None) and how many records were read: a key written recently costs
    one chunk, however long the partition is.
    """
    async with _consumer(bootstrap) as consumer:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        read = 0
        while end > begin:
            start = max(begin, end - chunk)
            consumer.seek(tp, start)
            found: Record | None = None
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                for r in batch.get(tp, []):
                    if r.offset < end:
                        read += 1
                        if r.key == key:
                            found = Record(topic, partition, r.offset, r.key, r.value or b"",
                                           (r.timestamp or 0) / 1000.0)
            if found is not None:
                return found, read
            end = start
        return None, read


async def count_codes(bootstrap: str, topic: str, timeout: float = 30.0) -> dict[str, int]:
    """Dead letters of ``topic`` counted by their error code (the whole topic, bounded in time)."""
    counts: Counter[str] = Counter()
    async with _consumer(bootstrap) as consumer:
        tps = _partitions(consumer, [topic])
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                break
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for r in records:
                    if r.offset >= ends[tp]:
                        continue
                    try:
                        code = orjson.loads(r.value or b"{}").get("error", {}).get("code", "UNKNOWN")
                    except (orjson.JSONDecodeError, AttributeError):
                        code = "UNDECODABLE"
                    counts[str(code)] += 1
    return dict(counts)
