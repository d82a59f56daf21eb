"""Series windows in memory hold their events unacked, and release them in offset order.

Faust commits the highest contiguous acked offset, and faust 0.15.3 commits past a single
unacked offset at the front (faust-streaming#606): an event of an open window must never be
acked, nor any event after it on the same partition.
"""

from __future__ import annotations

from tables.series import HeldWindows


def _open(held: HeldWindows, key: bytes, partition: int, first: int) -> None:
    held.set_window(key, {"w": 0.0, "p": partition, "dirty": True, "first": first, "off": first})


def test_events_wait_for_the_oldest_open_window_of_their_partition() -> None:
    held = HeldWindows()
    _open(held, b"a", 0, 10)
    for offset in (10, 11, 12):
        held.hold(0, offset, f"e{offset}")
    _open(held, b"b", 0, 13)
    held.hold(0, 13, "e13")
    held.hold(1, 5, "p1-e5")  # another partition, no open window there
    assert held.releasable(0) == []
    assert held.releasable(1) == ["p1-e5"]
    held.delete_window(b"b")  # the younger window flushed first: still nothing may go
    assert held.releasable(0) == []
    held.delete_window(b"a")
    assert held.releasable(0) == ["e10", "e11", "e12", "e13"]
    assert held.held_count() == 0


def test_release_stops_below_the_floor_and_keeps_offset_order() -> None:
    held = HeldWindows()
    for offset in (1, 2, 3):
        held.hold(0, offset, f"e{offset}")
    _open(held, b"a", 0, 3)
    held.hold(0, 0, "e0")  # delivered again below what is held
    assert held.releasable(0) == ["e0", "e1", "e2"]
    assert held.held_count() == 1
    held.set_window(b"a", {"p": 0, "dirty": False, "first": 3})  # flushed, kept clean
    assert held.releasable(0) == ["e3"]


def test_forgetting_a_partition_drops_its_windows_and_returns_its_events() -> None:
    held = HeldWindows()
    _open(held, b"a", 0, 1)
    _open(held, b"b", 1, 7)
    held.hold(0, 1, "e1")
    held.hold(1, 7, "f7")
    assert held.partitions() == {0, 1}
    assert held.forget_partition(0) == ["e1"]
    assert held.get_window(b"a") is None and held.get_window(b"b") is not None
    assert held.partitions() == {1}
    assert held.held_events() == ["f7"]
