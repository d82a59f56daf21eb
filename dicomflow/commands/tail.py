"""``dicomflow tail TOPIC``: print a topic's records as they arrive, like kcat.

One line per record, in kcat's ``-f '%t p%p @%o key=%k %s\\n'`` form (the value is the
record's JSON text as the pipeline wrote it), or one JSON object per record with
``--json`` (the value decoded). It reads with no consumer group, so looking never moves
anyone's offsets. docs/operations.md lists the equivalent kcat command lines, and
tests/test_tail_cli.py checks them against the embedded broker.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import click
import orjson

__all__ = ["COMMANDS", "follow", "render"]


async def follow(bootstrap: str, topic: str, *, from_beginning: bool, partition: int | None,
                 key: bytes | None, stop_at_end: bool) -> AsyncIterator[Any]:
    """The topic's records (aiokafka ConsumerRecords), oldest first per partition, forever
    unless ``stop_at_end`` (then up to the ends read at the start, as kcat's ``-e``)."""
    from aiokafka import TopicPartition

    from core.errors import ConfigError
    from streams.broker import new_consumer

    consumer = new_consumer(bootstrap)
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or [])
        if not partitions:
            raise ConfigError(f"topic {topic!r} does not exist on {bootstrap}", field="topic")
        if partition is not None and partition not in partitions:
            raise ConfigError(f"topic {topic} has partitions {partitions}, not {partition}", field="partition")
        tps = [TopicPartition(topic, p) for p in (partitions if partition is None else [partition])]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        ends = await consumer.end_offsets(tps) if stop_at_end else {}
        while True:
            if stop_at_end and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                return
            batch = await consumer.getmany(*tps, timeout_ms=500)
            for tp, records in sorted(batch.items(), key=lambda item: item[0].partition):
                for record in records:
                    if stop_at_end and record.offset >= ends[tp]:
                        continue
                    if key is None or record.key == key:
                        yield record
    finally:
        await consumer.stop()


def render(record: Any, *, as_json: bool) -> str:
    """kcat's ``%t p%p @%o key=%k %s`` line, or a JSON object with the value decoded."""
    value: bytes = record.value or b""
    if not as_json:
        key = (record.key or b"").decode("utf-8", errors="replace")
        return f"{record.topic} p{record.partition} @{record.offset} key={key} " + value.decode("utf-8", "replace")
    try:
        decoded: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        decoded = value.decode("utf-8", errors="replace")
    return orjson.dumps({"topic": record.topic, "partition": record.partition, "offset": record.offset,
                         "timestamp_ms": record.timestamp,
                         "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
                         "value": decoded}).decode()


@click.command()
@click.argument("topic")
@click.option("--from-beginning", is_flag=True, help="Start at each partition's first record (default: new ones only).")
@click.option("--partition", "-p", type=int, default=None, help="Only this partition.")
@click.option("--key", "-k", default=None, help="Only records with this key (e.g. tenant/study_uid/series_uid).")
@click.option("--exit", "-e", "stop_at_end", is_flag=True, help="Stop at the end of the partitions (kcat -e).")
@click.option("--count", "-c", type=click.IntRange(min=1), default=None, help="Stop after this many records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record, the value decoded.")
@click.option("--broker", help="kafka://host:port (default: DICOMFLOW_BROKER, else the running stack's).")
def tail(topic: str, from_beginning: bool, partition: int | None, key: str | None, stop_at_end: bool,
         count: int | None, as_json: bool, broker: str | None) -> None:
    """Print TOPIC's records as they arrive (Ctrl-C stops), like kcat -C."""
    from core.errors import DicomflowError
    from dicomflow.commands.dlq import broker_bootstrap

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        seen = 0
        async for record in follow(broker_bootstrap(broker), topic, from_beginning=from_beginning,
                                   partition=partition, key=key.encode() if key is not None else None,
                                   stop_at_end=stop_at_end):
            click.echo(render(record, as_json=as_json))
            seen += 1
            if count is not None and seen >= count:
                return

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    except DicomflowError as exc:
        click.secho(f"error: {exc.code}: {exc.message}", fg="red", err=True)
        sys.exit(2)


COMMANDS = [tail]
