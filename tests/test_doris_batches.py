"""DorisBatcher with fake ports against the Stream Load emulator: the exactly-once rules without Faust."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from schemas.codec import to_row
from sinks.base import Rejected
from sinks.dedupe import DedupWindow, dedup_key, dedup_keys
from sinks.doris import DorisTableSink, StreamLoadClient, make_label
from sinks.doris_batches import BatchLimits, DorisBatcher, DorisPorts
from sinks.doris_intents import INTENTS_KEPT, decode_intents, encode_intents, latest_intents, remember
from tests.doris_emulator import DorisEmulator
from tests.test_doris_sink import records

DB = "dicomflow"
OBJECT = "dicom_object_meta"
TOPIC = "log_queue"


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: float = 0.0


class Ports:
    """In-memory ports; ``log`` records the order of intents, loads (via the emulator) and acks."""

    def __init__(self, emulator: DorisEmulator, source: dict[int, bytes] | None = None) -> None:
        self.emulator = emulator
        self.intents: dict[tuple[bytes, int], list[tuple[int, int]]] = {}
        self.source = source or {}
        self.acked: list[int] = []
        self.dead: list[Rejected[dict[str, Any]]] = []
        self.log: list[str] = []
        self.rows_at_intent: list[int] = []

    async def read(self, key: bytes, partition: int) -> list[tuple[int, int]]:
        return list(self.intents.get((key, partition), []))

    async def record(self, key: bytes, partition: int, ranges: Sequence[tuple[int, int]]) -> None:
        self.intents[(key, partition)] = list(ranges)
        self.rows_at_intent.append(len(self.emulator.rows(OBJECT)))
        self.log.append(f"intent {ranges[-1][0]}..{ranges[-1][1]}")

    async def read_source(self, partition: int, start: int, end: int) -> list[bytes]:
        return [v for o, v in sorted(self.source.items()) if start <= o < end]

    async def ack(self, event: int) -> None:
        self.acked.append(event)

    async def dead_letter(self, rejected: Sequence[Rejected[dict[str, Any]]]) -> None:
        self.dead.extend(rejected)

    def ports(self) -> DorisPorts[int]:
        return DorisPorts(intents=self, read_source=self.read_source, ack=self.ack, dead_letter=self.dead_letter,
                          should_stop=lambda: False)


@pytest.fixture
async def client(doris_emulator: DorisEmulator) -> AsyncIterator[StreamLoadClient]:
    c = StreamLoadClient(doris_emulator.fe_url, doris_emulator.user, doris_emulator.password)
    await c.start()
    yield c
    await c.stop()


def batcher(client: StreamLoadClient, ports: Ports, *, max_rows: int = 3, dedup: bool = True,
            window: int = 100) -> DorisBatcher[int]:
    sink = DorisTableSink(client, db=DB, table=OBJECT)
    limits = BatchLimits(max_rows=max_rows, max_bytes=1 << 30, max_interval_s=3600.0, dedup_window=window)
    return DorisBatcher(sink, TOPIC, ports.ports(), limits, kind="object", dedup_trace=dedup)


def rows(n: int) -> list[bytes]:
    return [orjson.dumps(to_row(e.object)) for e in records(n)]


def rec(offset: int, value: bytes, partition: int = 0) -> Rec:
    return Rec(TOPIC, partition, offset, b"k", value)


async def test_batches_record_their_intent_load_then_ack(doris_emulator: DorisEmulator,
                                                         client: StreamLoadClient) -> None:
    ports = Ports(doris_emulator)
    b = batcher(client, ports, max_rows=3)
    values = rows(7)
    for offset, value in enumerate(values):
        await b.on_event(rec(offset, value), offset)
    # Two full batches loaded; the seventh event waits for its batch.
    assert ports.acked == [0, 1, 2, 3, 4, 5]
    assert ports.log == ["intent 0..2", "intent 3..5"]
    assert ports.rows_at_intent == [0, 3]  # each intent written before its load
    assert len(doris_emulator.rows(OBJECT)) == 6
    for first, last in [(0, 2), (3, 5)]:
        assert doris_emulator.label_state(make_label(DB, OBJECT, TOPIC, 0, first, last)) is not None
    await b.flush(0)
    assert ports.acked == list(range(7)) and len(doris_emulator.rows(OBJECT)) == 7


async def test_a_restart_rebuilds_the_recorded_range_and_loads_nothing_twice(doris_emulator: DorisEmulator,
                                                                           client: StreamLoadClient) -> None:
    values = rows(5)
    first = Ports(doris_emulator)
    b1 = batcher(client, first, max_rows=5)
    for offset, value in enumerate(values):
        await b1.on_event(rec(offset, value), offset)
    assert len(doris_emulator.rows(OBJECT)) == 5
    # "Crash" before the commit: a successor with other limits replays from offset 0.
    second = Ports(doris_emulator)
    second.intents = dict(first.intents)
    b2 = batcher(client, second, max_rows=2)
    for offset, value in enumerate(values):
        await b2.on_event(rec(offset, value), offset)
    assert second.acked == list(range(5)) and second.log == []  # same range, no new intent
    assert b2.counters["replayed_batches"] == 1 and b2.sink.counters["label_already_finished"] == 1
    assert len(doris_emulator.rows(OBJECT)) == 5


async def test_recovered_records_close_an_intent_rebuilt_batch_first(doris_emulator: DorisEmulator,
                                                                     client: StreamLoadClient) -> None:
    values = rows(6)
    ports = Ports(doris_emulator)
    ports.intents[(b"dicom_object_meta:0", 0)] = [(0, 2)]
    b = batcher(client, ports, max_rows=100)
    # Faust skipped 0..3; the guard recovered them and the event at 4 revealed the gap.
    missing = [rec(o, values[o]) for o in range(4)]
    await b.on_event(rec(4, values[4]), 4, missing=missing)
    assert doris_emulator.label_state(make_label(DB, OBJECT, TOPIC, 0, 0, 2)) is not None
    assert ports.log == []  # 0..2 was rebuilt from its intent; 3..4 is still buffered
    assert len(doris_emulator.rows(OBJECT)) == 3
    await b.flush(0)
    assert ports.log == ["intent 3..4"] and len(doris_emulator.rows(OBJECT)) == 5


async def test_repeated_trace_is_skipped_and_the_window_is_reread_on_open(doris_emulator: DorisEmulator,
                                                                          client: StreamLoadClient) -> None:
    values = rows(3)
    # Offsets 0..9 were loaded by a predecessor; offset 5 held values[0].
    source = {o: values[0] if o == 5 else b"not json" for o in range(10)}
    ports = Ports(doris_emulator, source)
    b = batcher(client, ports, max_rows=100)
    await b.on_event(rec(10, values[0]), 10)  # a replayed copy of offset 5
    await b.on_event(rec(11, values[1]), 11)
    await b.on_event(rec(12, values[1]), 12)  # a copy within this run
    await b.on_event(rec(13, values[2]), 13)
    await b.flush(0)
    loaded = doris_emulator.rows(OBJECT)
    assert sorted(r["trace_id"] for r in loaded) == ["trace-0001", "trace-0002"]
    assert b.counters["duplicates_skipped"] == 2
    assert ports.acked == [10, 11, 12, 13]  # duplicates are acked with their batch
    assert ports.log == ["intent 10..13"]  # the label covers the skipped offsets too


async def test_delivered_again_is_acked_without_loading(doris_emulator: DorisEmulator,
                                                        client: StreamLoadClient) -> None:
    ports = Ports(doris_emulator)
    b = batcher(client, ports, max_rows=100)
    values = rows(1)
    await b.on_event(rec(0, values[0]), 0, again=True)
    assert ports.acked == [0] and doris_emulator.rows(OBJECT) == []
    await b.on_event(rec(1, values[0]), 1)
    await b.on_event(rec(1, values[0]), 101, again=True)  # redelivered while a batch is open
    assert ports.acked == [0]
    await b.flush(0)
    assert ports.acked == [0, 1, 101] and len(doris_emulator.rows(OBJECT)) == 1


async def test_undecodable_row_is_dead_lettered_and_its_offset_acked(doris_emulator: DorisEmulator,
                                                                     client: StreamLoadClient) -> None:
    ports = Ports(doris_emulator)
    b = batcher(client, ports, max_rows=100)
    values = rows(1)
    await b.on_event(rec(0, b"{broken"), 0)
    await b.on_event(rec(1, b"[1, 2]"), 1)
    await b.on_event(rec(2, values[0]), 2)
    await b.flush(0)
    assert [d.item.offset for d in ports.dead] == [0, 1]
    assert "undecodable row" in ports.dead[0].error.message and ports.dead[0].item.key == "k"
    assert ports.acked == [0, 1, 2] and ports.log == ["intent 0..2"]


async def test_revoked_buffers_are_parked_and_restored_or_forgotten(doris_emulator: DorisEmulator,
                                                                    client: StreamLoadClient) -> None:
    ports = Ports(doris_emulator)
    b = batcher(client, ports, max_rows=100)
    values = rows(2)
    await b.on_event(rec(0, values[0], partition=0), 0)
    await b.on_event(rec(0, values[1], partition=1), 100)
    await b.revoke([(TOPIC, 0), (TOPIC, 1), ("other", 0)])
    assert set(b.parked) == {0, 1} and b.parts == {}
    assert b.assign([(TOPIC, 0), ("other", 1)]) == [1]  # partition 1 went to another worker
    assert set(b.parts) == {0} and b.parked == {}
    await b.flush(0)
    assert ports.acked == [0] and len(doris_emulator.rows(OBJECT)) == 1


async def test_tick_flushes_a_batch_that_waited_long_enough(doris_emulator: DorisEmulator,
                                                            client: StreamLoadClient) -> None:
    ports = Ports(doris_emulator)
    sink = DorisTableSink(client, db=DB, table=OBJECT)
    b: DorisBatcher[int] = DorisBatcher(sink, TOPIC, ports.ports(), BatchLimits(100, 1 << 30, 0.0, 100),
                                        kind="object", dedup_trace=True)
    await b.on_event(rec(0, rows(1)[0]), 0)
    assert ports.acked == []
    await b.tick()
    assert ports.acked == [0]


def test_intent_records_and_dedup_keys() -> None:
    assert decode_intents(encode_intents([(1, 2), (3, 9)])) == [(1, 2), (3, 9)]
    recs = [(b"t:0", encode_intents([(0, 1)])), (b"u:0", encode_intents([(5, 6)])), (b"t:0", encode_intents([(2, 3)]))]
    assert latest_intents(recs, b"t:0") == [(2, 3)] and latest_intents(recs, b"x") == []
    kept = remember([(i, i) for i in range(INTENTS_KEPT)], (999, 999))
    assert len(kept) == INTENTS_KEPT + 1 and kept[-1] == (999, 999)  # nothing known committed: all kept
    assert remember([(0, 4), (5, 9)], (10, 12), committed=5) == [(5, 9), (10, 12)]
    assert dedup_key({"trace_id": "t", "transfer_status": "SUCCESS"}) == "t|SUCCESS"
    assert dedup_key({"trace_id": 5}) is None
    assert dedup_keys([b'{"trace_id": "a"}', b"nope", b"[]", b""]) == ["a|None"]
    w = DedupWindow(2)
    for k in "abc":
        w.remember(k)
    assert "a" not in w and "c" in w and len(w) == 2


# -- issue #14, item 4: intents --------------------------------------------------------------


async def test_every_intent_above_the_committed_offset_survives_many_flushes(doris_emulator: DorisEmulator,
                                                                              client: StreamLoadClient) -> None:
    """More flushes than INTENTS_KEPT without a commit: a replay still rebuilds every range."""
    n = INTENTS_KEPT + 6
    values = [orjson.dumps(dict(orjson.loads(v), trace_id=f"t-{i}")) for i, v in enumerate(rows(1) * n)]
    first = Ports(doris_emulator)
    b1 = batcher(client, first, max_rows=1, dedup=False)
    for offset, value in enumerate(values):
        await b1.on_event(rec(offset, value), offset)
    assert len(doris_emulator.rows(OBJECT)) == n
    # Crash before any commit; the successor batches differently and replays from 0.
    second = Ports(doris_emulator)
    second.intents = dict(first.intents)
    b2 = batcher(client, second, max_rows=4, dedup=False)
    for offset, value in enumerate(values):
        await b2.on_event(rec(offset, value), offset)
    await b2.flush(0)
    assert len(doris_emulator.rows(OBJECT)) == n  # no range got a new label
    assert second.acked == list(range(n))


async def test_intents_below_the_committed_offset_are_dropped(doris_emulator: DorisEmulator,
                                                              client: StreamLoadClient) -> None:
    ports = Ports(doris_emulator)
    committed = {0: 0}
    b = DorisBatcher(DorisTableSink(client, db=DB, table=OBJECT), TOPIC,
                     DorisPorts(intents=ports, read_source=ports.read_source, ack=ports.ack,
                                dead_letter=ports.dead_letter, should_stop=lambda: False,
                                committed=committed.get),
                     BatchLimits(1, 1 << 30, 3600.0, 100), kind="object", dedup_trace=False)
    values = rows(5)
    for offset in range(3):
        await b.on_event(rec(offset, values[offset]), offset)
    committed[0] = 2  # Faust committed up to (not including) offset 2
    for offset in range(3, 5):
        await b.on_event(rec(offset, values[offset]), offset)
    assert ports.intents[(b"dicom_object_meta:0", 0)] == [(2, 2), (3, 3), (4, 4)]


# -- issue #14, item 5: a retrying load gives up on revoke/shutdown without acking -------------


class Stopping(Ports):
    def __init__(self, emulator: DorisEmulator) -> None:
        super().__init__(emulator)
        self.stop = False
        self.released: list[tuple[int, list[int]]] = []

    def release(self, partition: int, events: Sequence[int]) -> None:
        self.released.append((partition, list(events)))

    def ports(self) -> DorisPorts[int]:
        return DorisPorts(intents=self, read_source=self.read_source, ack=self.ack, dead_letter=self.dead_letter,
                          should_stop=lambda: self.stop, release=self.release)


async def test_a_retrying_load_stops_on_revoke_without_acking(doris_emulator: DorisEmulator,
                                                             client: StreamLoadClient) -> None:
    import asyncio

    ports = Stopping(doris_emulator)
    sink = DorisTableSink(client, db=DB, table=OBJECT)
    b: DorisBatcher[int] = DorisBatcher(sink, TOPIC, ports.ports(), BatchLimits(100, 1 << 30, 0.0, 100),
                                        kind="object", dedup_trace=True)
    values = rows(2)
    await b.on_event(rec(0, values[0]), 0)
    await b.on_event(rec(1, values[1]), 1)
    doris_emulator.inject("http500", count=10_000)  # Doris keeps failing
    task = asyncio.ensure_future(b.tick())
    await doris_emulator.wait_until(lambda: sink.counters["retries"] >= 1, timeout=10)
    ports.stop = True  # a rebalance started (or the worker is stopping)
    await asyncio.wait_for(task, timeout=15)  # returns, does not raise into the agent
    assert ports.acked == [] and doris_emulator.rows(OBJECT) == []
    assert ports.released == [(0, [0, 1])]  # handed back unacked; the partition restarts from its commit
    assert b.parts == {} and not b.lock.locked()
    # Once Doris is back, the replay loads the same range under the same label.
    doris_emulator.faults.clear()
    ports.stop = False
    await b.on_event(rec(0, values[0]), 0)
    await b.on_event(rec(1, values[1]), 1)
    await b.flush(0)
    assert ports.acked == [0, 1] and len(doris_emulator.rows(OBJECT)) == 2
    assert ports.log == ["intent 0..1"]
