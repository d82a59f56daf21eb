"""Series windows in memory hold their events unacked, and release them in offset order.

Faust commits the highest contiguous acked offset, and faust 0.15.3 commits past a single
unacked offset at the front (faust-streaming#606): an event of an open window must never be
acked, nor any event after it on the same partition.
"""

from __future__ import annotations

from tables.series import HeldWindows

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
