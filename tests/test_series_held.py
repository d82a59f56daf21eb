"""Series windows in memory hold their events unacked, and release them in offset order.

Faust commits the highest contiguous acked offset, and faust 0.15.3 commits past a single
unacked offset at the front (faust-streaming#606): an event of an open window must never be
acked, nor any event after it on the same partition.
"""

from __future__ import annotations

import asyncio
import time
from datetime import date
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agents.series_held import HeldSeriesStage, SeriesInstance
from dicomflow.embedded.broker import EmbeddedBroker
from schemas import codec
from schemas.records import DicomStateMeta
from sinks.series_facts import SeriesFacts
from streams.broker import ensure_topics
from streams.topology import STATE
from tables.series import HeldWindows, window_start

P0 = ("storage_queue", 0)
P1 = ("storage_queue", 1)


def _open(held: HeldWindows, key: bytes, firsts: dict[tuple[str, int], int]) -> None:
    held.set_window(key, {"w": 0.0, "firsts": dict(firsts)})


def test_events_wait_for_the_oldest_open_window_of_their_partition() -> None:
    held = HeldWindows()
    _open(held, b"a", {P0: 10})
    for offset in (10, 11, 12):
        held.hold(P0, offset, f"e{offset}")
    _open(held, b"b", {P0: 13})
    held.hold(P0, 13, "e13")
    held.hold(P1, 5, "p1-e5")  # another partition, no open window there
    assert held.releasable(P0) == []
    assert held.releasable(P1) == ["p1-e5"]
    held.delete_window(b"b")  # the younger window flushed first: still nothing may go
    assert held.releasable(P0) == []
    held.delete_window(b"a")
    assert held.releasable(P0) == ["e10", "e11", "e12", "e13"]
    assert held.held_count() == 0


def test_a_window_being_flushed_still_holds_its_events() -> None:
    held = HeldWindows()
    _open(held, b"a", {P0: 1})
    held.hold(P0, 1, "e1")
    held.hold(P0, 2, "e2")
    agg = held.take_for_flush(b"a")
    assert agg is not None and held.get_window(b"a") is None  # a new instance starts a new window
    assert held.releasable(P0) == []
    held.flushed(agg)
    assert held.releasable(P0) == ["e1", "e2"]


def test_a_window_fed_by_two_partitions_holds_both() -> None:
    held = HeldWindows()
    _open(held, b"a", {P0: 4, P1: 9})
    held.hold(P0, 4, "e4")
    held.hold(P1, 9, "f9")
    held.hold(P1, 8, "f8")  # delivered again below what is held: kept in offset order
    assert held.releasable(P0) == [] and held.releasable(P1) == ["f8"]
    assert held.partitions() == {P0, P1}
    held.delete_window(b"a")
    assert held.releasable(P1) == ["f9"] and held.releasable(P0) == ["e4"]


def test_clear_returns_every_held_event() -> None:
    held = HeldWindows()
    _open(held, b"a", {P0: 1})
    held.hold(P0, 1, "e1")
    held.hold(P1, 7, "f7")
    assert sorted(held.clear()) == ["e1", "f7"]
    assert held.open_count() == 0 and held.held_count() == 0 and held.partitions() == set()


# -- quiet close (issue #15 review) --------------------------------------------------------

class _Event:
    def __init__(self, offset: int) -> None:
        self.message = SimpleNamespace(topic=P0[0], partition=P0[1], offset=offset, timestamp=0.0)
        self.acked = False

    def ack(self) -> bool:
        self.acked = True
        return True


class _StateTopic:
    """The app's state queue, sending to a real broker as Faust's ``topic.send`` does (a future)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def send(self, *, key: bytes, value: bytes) -> Any:
        return await self.producer.send(STATE, key=key, value=value, partition=0)


class _App(SimpleNamespace):
    """What the stage uses of the Faust app (weak-referenceable and hashable, as the app is)."""

    __hash__ = object.__hash__


def _instance(offset: int, timestamp: float) -> SeriesInstance:
    state = DicomStateMeta(tenant_id="t-quiet", patient_id="p", study_uid="1.2", series_uid="1.2.3",
                           study_uid_hash="1", series_uid_hash="2", study_date_origin="20240101", study_date=date(2024, 1, 1),
                           accession_number="A")
    msg = {"sop_uid": f"1.2.3.{offset}", "state": codec.to_row(state), "path": None}
    return (P0[0], P0[1], offset, timestamp, b"t-quiet/1.2.3", msg)


async def _states(broker: EmbeddedBroker) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(STATE, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=2000)
        return [orjson.loads(r.value) for records in batch.values() for r in records]
    finally:
        await consumer.stop()


async def test_a_series_whose_window_crossed_a_boundary_still_closes_when_quiet(
        fresh_broker: EmbeddedBroker, pg_dsn: str) -> None:
    """A window flushed at its end (or at 500 instances) is no quiet close, so it must not hold
    back the quiet close of the series' next window: only quiet closes are spaced by a window
    length (they bound what a sender that pauses and resumes costs)."""
    window, quiet = 3600.0, 0.2
    await ensure_topics(fresh_broker.bootstrap, [STATE], 1)
    producer = AIOKafkaProducer(bootstrap_servers=fresh_broker.bootstrap)
    await producer.start()
    facts = SeriesFacts(pg_dsn)
    await facts.start()
    highwater = {P0: 0}
    app = _App(bootstrap=fresh_broker.bootstrap, settings=SimpleNamespace(app_id="quiet-test"),
                          should_stop=False, rebalancing=False, queues=SimpleNamespace(state=_StateTopic(producer)),
                          consumer=SimpleNamespace(highwater=lambda tp: highwater[(tp.topic, tp.partition)]))
    stage = HeldSeriesStage(app, window, facts, quiet)  # type: ignore[arg-type]
    events = [_Event(offset) for offset in range(5)]

    async def feed(offsets: range, timestamp: float) -> None:
        stage.add([_instance(o, timestamp) for o in offsets])
        highwater[P0] = offsets[-1] + 1
        await stage.hold([events[o] for o in offsets])

    async def flushes_reach(n: int, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await stage.flush_closed()
            if stage.counters["flushes"] >= n:
                return True
            await asyncio.sleep(0.05)
        return False

    try:
        now = time.time()
        # Two instances in the previous window (over): flushed at its end, not as a quiet close.
        await feed(range(0, 2), window_start(now, window) - 10)
        assert await flushes_reach(1, 5)
        assert stage.counters["quiet_closes"] == 0
        # Two more in the current window, which ends up to an hour from now: closed once quiet.
        await feed(range(2, 4), now)
        assert await flushes_reach(2, 5), "the second window waited for its end after a boundary flush"
        assert stage.counters["quiet_closes"] == 1
        assert [e.acked for e in events[:4]] == [True] * 4
        # The same window again, quiet again at once: quiet closes stay a window length apart.
        await feed(range(4, 5), now)
        assert not await flushes_reach(3, 4 * quiet + 1)
        assert stage.windows.open_count() == 1 and not events[4].acked
        states = await _states(fresh_broker)
        assert [(s["series_related_instances"], s["version"]) for s in states] == [(2, 1), (4, 2)]
        assert (await facts.record("t-quiet", "1.2", "1.2.3", [])).count == 4
    finally:
        stage.release_held()
        await facts.stop()
        await producer.stop()


class _Message:
    """A consumer message as Faust tracks it: hashable, in the consumer's unacked set."""

    def __init__(self, offset: int) -> None:
        self.topic, self.partition, self.offset, self.timestamp = P0[0], P0[1], offset, time.time()


async def test_events_held_after_the_stop_began_are_given_back_unacked() -> None:
    """CI failure of 2026-12-03: SIGTERM arrived between two ingest batches; the second batch was
    handed to the windows after the stop had given back what they held, so its events stayed in
    Faust's unacked set and the worker's stop waited for them for ever (``wait_empty``). Held
    while stopping, they are given back at once: not acked, so read again after the restart."""
    messages = [_Message(offset) for offset in range(3)]
    unacked = set(messages)
    app = _App(bootstrap="127.0.0.1:1", settings=SimpleNamespace(app_id="stop-test"), should_stop=True,
               rebalancing=False,
               consumer=SimpleNamespace(_unacked_messages=unacked, highwater=lambda tp: None))
    stage = HeldSeriesStage(app, 120.0, facts=None)  # type: ignore[arg-type]
    events = [SimpleNamespace(message=m, ack=lambda: pytest.fail("acked while its window is open"))
              for m in messages]
    stage.add([_instance(m.offset, m.timestamp) for m in messages])
    await stage.hold(events)  # type: ignore[arg-type]
    assert not unacked, "held events still block the stop"
    assert stage.windows.open_count() == 1  # the window itself is not flushed: nothing was written
