"""Re-publish dead letters to ``storage_queue`` once their cause is fixed.

Reads ``storage_queue_dlq`` from the beginning up to its current end (no consumer
group: a replay never hides letters from a later one). Re-publishing is safe to
repeat: the events keep their trace ids, and every stage de-duplicates on them.

With ``resume_group`` a run starts where the last run with the same group ended and,
once every re-published event is acknowledged, records its end as that group's
committed offsets: each letter is replayed once. A cause that is still not fixed adds one
new letter per run (the replayed event fails again), which the next run replays once.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from feeders.deadletters import Letter, LetterFilter
from feeders.publisher import EventPublisher
from streams.broker import Record, kafka_client_kwargs
from streams.topology import DLQ

__all__ = ["ReplaySummary", "replay_dead_letters"]

log = logging.getLogger(__name__)


@dataclass
class ReplaySummary:
    scanned: int = 0
    replayed: int = 0
    by_code: dict[str, int] = field(default_factory=dict)
    #: With a resume group: letters before this run's start, replayed by earlier runs.
    already_done: int = 0
    #: Letters whose original was too large to keep whole (capped): they cannot be replayed.
    truncated: int = 0


async def replay_dead_letters(bootstrap: str, publisher: EventPublisher, *, code: str | None = None,
                              stage: str = "ingest", resume_group: str | None = None,
                              where: LetterFilter | None = None) -> ReplaySummary:
    """Re-publish the letters of ``stage`` (and ``code``, and ``where``: the filters of ``dlq list``)."""
    summary = ReplaySummary()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=resume_group, **kafka_client_kwargs())
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(DLQ) or set()
        tps = [TopicPartition(DLQ, p) for p in sorted(partitions)]
        if not tps:
            return summary
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        if resume_group is not None:
            for tp in tps:
                done = await consumer.committed(tp)
                if done:
                    consumer.seek(tp, min(done, ends[tp]))
                    summary.already_done += min(done, ends[tp])
        remaining = {tp for tp in tps if ends[tp] > await consumer.position(tp)}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, messages in batch.items():
                for msg in messages:
                    summary.scanned += 1
                    letter = Letter.of(Record(DLQ, tp.partition, msg.offset, msg.key, msg.value or b"",
                                              (msg.timestamp or 0) / 1000.0))
                    if where is None or where.matches(letter):
                        await _replay_one(msg.value, msg.key, publisher, code, stage, summary)
                    if msg.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        if resume_group is not None:
            # Every publish above waited for its acknowledgement: the letters up to here are done.
            await consumer.commit({tp: ends[tp] for tp in tps if ends[tp] > 0})
    finally:
        await consumer.stop()
    return summary


async def _replay_one(value: bytes | None, key: bytes | None, publisher: EventPublisher, code: str | None,
                      stage: str, summary: ReplaySummary) -> None:
    try:
        letter = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return
    if not isinstance(letter, dict) or letter.get("stage") != stage:
        return
    letter_code = (letter.get("error") or {}).get("code")
    if code is not None and letter_code != code:
        return
    if letter.get("original_truncated"):
        summary.truncated += 1  # only a prefix was kept: re-publishing it would be a different event
        return
    if letter.get("original") is not None:
        raw = orjson.dumps(letter["original"])
    elif letter.get("original_raw_base64"):
        raw = base64.b64decode(letter["original_raw_base64"])
    else:
        return
    await publisher.publish_raw(raw, key.decode() if key else None)
    summary.replayed += 1
    summary.by_code[str(letter_code)] = summary.by_code.get(str(letter_code), 0) + 1
