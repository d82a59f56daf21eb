"""``dicomflow status``: what a data engineer checks first.

Per topic and partition: end offset, the app's committed offset and the lag
(aiokafka admin client); dead letters by error code; and the stack's addresses.
Note: on the embedded Tansu broker end offsets can be off after multi-record batches
(faust-pitfalls §4.1); dicomflow's own producers send one record per batch there.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.admin import bootstrap_of
from streams.topology import DLQ, IMAGE, LOG, SERIES_INSTANCES, SINK_DLQ, STATE, STORAGE

__all__ = ["collect_status", "end_offsets", "committed_offsets", "CONSUMED_TOPICS", "CONSUMED_WITHOUT_DORIS"]

#: Topics the app's consumer group reads (lag is meaningful for these); image and log
#: are read only by the Doris sink.
CONSUMED_TOPICS = (STORAGE, SERIES_INSTANCES, STATE, IMAGE, LOG)
CONSUMED_WITHOUT_DORIS = (STORAGE, SERIES_INSTANCES, STATE)


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
        return dict(await consumer.end_offsets(tps)) if tps else {}
    finally:
        await consumer.stop()


async def _dead_letter_codes(bootstrap: str, topic: str) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    counts: Counter[str] = Counter()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
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
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The group's committed offsets (OffsetFetch), without joining the group.

    aiokafka's admin ``list_consumer_group_offsets`` sends an OffsetFetch version that
    Tansu answers by closing the connection; the consumer's ``committed()`` works on
    both Tansu and Kafka/Redpanda, and never subscribes, so it cannot cause a rebalance.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        out: dict[TopicPartition, int] = {}
        for tp in tps:
            offset = await consumer.committed(tp)
            if offset is not None and offset >= 0:
                out[tp] = offset
        return out
    finally:
        await consumer.stop()


async def collect_status(broker_url: str, group: str, consumed: tuple[str, ...] = CONSUMED_TOPICS) -> dict[str, Any]:
    bootstrap = bootstrap_of(broker_url)
    ends = await end_offsets(bootstrap, [*CONSUMED_TOPICS, DLQ, SINK_DLQ])
    committed = await committed_offsets(bootstrap, group, [tp for tp in ends if tp.topic in consumed])
    topics: dict[str, list[dict[str, Any]]] = {}
    total_lag = 0
    for tp in sorted(ends, key=lambda t: (t.topic, t.partition)):
        end = ends[tp]
        entry: dict[str, Any] = {"partition": tp.partition, "end_offset": end}
        if tp.topic in consumed:
            entry["committed_offset"] = committed.get(tp)
            entry["lag"] = max(0, end - committed.get(tp, 0))
            total_lag += entry["lag"]
        topics.setdefault(tp.topic, []).append(entry)
    return {
        "broker": broker_url,
        "group": group,
        "topics": topics,
        "total_lag": total_lag,
        "dead_letters": {DLQ: await _dead_letter_codes(bootstrap, DLQ),
                         SINK_DLQ: await _dead_letter_codes(bootstrap, SINK_DLQ)},
    }


def sink_counters(metrics_urls: list[str], timeout: float = 3.0) -> dict[str, Any]:
    """Sink and stage counters scraped from the workers' /metrics (summed over workers).

    Counters live in the worker processes; ``status`` runs elsewhere, so it reads what
    Prometheus would. Unreachable workers are listed under ``unreachable``.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    sinks: dict[str, dict[str, float]] = {}
    unreachable: list[str] = []
    for url in metrics_urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
                text = resp.read().decode()
        except OSError:
            unreachable.append(url)
            continue
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("dicomflow_sink_"):
                continue
            what = family.name.removeprefix("dicomflow_sink_")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                entry = sinks.setdefault(sample.labels.get("sink", "?"), {})
                entry[what] = entry.get(what, 0.0) + sample.value
    return {"sinks": sinks, "unreachable": unreachable}
