"""Explicit topic creation with aiokafka's admin client.

Every topic is created with its partition count before any client uses it: Tansu
auto-creates unknown topics with 4 partitions, and Faust then crash-loops with
PartitionsMismatch. An existing topic with a different partition count is an error
that names the topic, never silently accepted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from core.errors import BrokerError, ConfigError

__all__ = ["bootstrap_of", "ensure_topics"]

log = logging.getLogger(__name__)


def bootstrap_of(url: str) -> str:
    """``kafka://h:p;h2:p2`` -> ``h:p,h2:p2`` (aiokafka's bootstrap form)."""
    for prefix in ("kafka://", "aiokafka://"):
        if url.startswith(prefix):
            url = url[len(prefix):]
    return url.replace(";", ",")


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int, *,
                        replication: int = 1, timeout: float = 30.0) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
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
