"""LaneSender: every (topic, key) lane keeps its order, lanes overlap, and a send error is raised."""

from __future__ import annotations

import asyncio

import pytest

from agents.lanes import LaneSender

Record = tuple[str, bytes, int]


async def test_lanes_keep_order_and_overlap() -> None:
    sent: list[Record] = []
    in_flight = 0
    peak = 0

    async def send(record: Record) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)  # a broker round trip
        in_flight -= 1
        sent.append(record)

    sender: LaneSender[Record] = LaneSender(send, lambda r: (r[0], r[1]))
    records = [(topic, key, i) for i in range(20) for topic in ("a", "b") for key in (b"k1", b"k2", b"k3")]
    for r in records[:60]:
        sender.add(r)
    await asyncio.sleep(0)
    for r in records[60:]:  # added while the first ones are in flight
        sender.add(r)
    assert sender.lanes == 6
    await sender.drain()
    assert sorted(sent) == sorted(records)
    for lane in {(t, k) for t, k, _ in records}:
        assert [i for t, k, i in sent if (t, k) == lane] == list(range(20))
    assert peak == 6  # one record of every lane in flight at once


async def test_a_send_error_stops_its_lane_and_is_raised() -> None:
    sent: list[Record] = []

    async def send(record: Record) -> None:
        await asyncio.sleep(0)
        if record == ("a", b"bad", 1):
            raise RuntimeError("broker said no")
        sent.append(record)

    sender: LaneSender[Record] = LaneSender(send, lambda r: (r[0], r[1]))
    for i in range(4):
        sender.add(("a", b"bad", i))
        sender.add(("a", b"good", i))
    with pytest.raises(RuntimeError, match="broker said no"):
        await sender.drain()
    # Nothing after the failed record of its lane was sent out of order.
    assert [i for t, k, i in sent if k == b"bad"] == [0]
    # The sender is reusable for the next batch.
    sender.add(("a", b"bad", 9))
    await sender.drain()
    assert sent[-1] == ("a", b"bad", 9)


async def test_a_cancelled_send_fails_the_batch() -> None:
    sent: list[Record] = []

    async def send(record: Record) -> None:
        await asyncio.sleep(0)
        if record[1] == b"b":
            raise asyncio.CancelledError  # e.g. the producer stopping under it
        sent.append(record)

    sender: LaneSender[Record] = LaneSender(send, lambda r: (r[0], r[1]))
    sender.add(("t", b"a", 1))
    sender.add(("t", b"b", 1))
    await asyncio.sleep(0.01)
    sender.add(("t", b"a", 2))  # after the failure: dropped, not sent out of order
    with pytest.raises(asyncio.CancelledError):
        await sender.drain()
    assert sent == [("t", b"a", 1)]


async def test_drain_returns_when_a_lane_is_cancelled_before_it_ran() -> None:
    async def send(record: Record) -> None:
        await asyncio.sleep(0)

    sender: LaneSender[Record] = LaneSender(send, lambda r: (r[0], r[1]))
    sender.add(("t", b"a", 1))
    sender.cancel()  # before the lane's task took its first step
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(sender.drain(), 5)
