"""The series window: per-series tumbling-window state, closed by dicomflow, not by Faust.

Faust's ``on_window_close`` misses partitions, never fires for restored windows, fires
on the wrong worker after a rebalance and double-counts replays
(../shared/reference/faust-pitfalls.md §1). So the window lives in plain changelogged
tables and is closed by a flush message that travels through the stream: every table
write happens inside stream iteration, on the partition that owns the series.

``series_window``  key ``series key`` -> aggregate::

    {"w": window start (s), "n": distinct SOP instances so far, "off": last applied
     source offset, "p": partition, "dirty": unflushed changes, "state": latest row,
     "created": first created_time}

``series_seen``  key ``series key|sop uid`` -> source offset that first counted it.

Replays are idempotent: an event at or below ``off`` was applied already; an instance
whose marker holds another offset was counted already (a redelivery).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["SeriesTables", "HeldWindows", "TopicPartition", "window_start", "marker_key"]


class SeriesTables:
    """The two changelogged tables of one app. Keys and values are bytes (the app's raw
    serializers); values are orjson documents."""

    def __init__(self, app: Any, partitions: int) -> None:
        self._window: Any = app.Table("series_window", default=None, partitions=partitions, key_type=bytes,
                                      value_type=bytes)
        self._seen: Any = app.Table("series_seen", default=None, partitions=partitions, key_type=bytes,
                                    value_type=bytes)

    def get_window(self, key: bytes) -> dict[str, Any] | None:
        raw = self._window.get(key)
        return orjson.loads(raw) if raw else None

    def set_window(self, key: bytes, agg: dict[str, Any]) -> None:
        """Only from inside stream iteration: the write goes to the current event's partition."""
        self._window[key] = orjson.dumps(agg)

    def delete_window(self, key: bytes) -> None:
        """Only from inside stream iteration, like :meth:`set_window`."""
        if key in self._window:
            del self._window[key]

    def iter_windows(self) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Every aggregate in this worker's local store (active and standby partitions)."""
        for key, raw in list(self._window.items()):
            if raw:
                yield key, orjson.loads(raw)

    def get_marker(self, key: bytes) -> int | None:
        raw = self._seen.get(key)
        return int(raw) if raw else None

    def set_marker(self, key: bytes, offset: int) -> None:
        self._seen[key] = str(offset).encode()

    def changelog_topic(self) -> str:
        return str(self._window.changelog_topic.get_topic_name())


def window_start(timestamp: float, size: float) -> float:
    """Start of the tumbling window (aligned to the epoch) that holds ``timestamp``."""
    return (timestamp // size) * size


def marker_key(series: bytes, sop_uid: str) -> bytes:
    return series + b"|" + sop_uid.encode()


#: A source partition: (topic, partition).
TopicPartition = tuple[str, int]


class HeldWindows:
    """Series windows kept in this process only, with the source events they hold unacked.

    Used when the per-instance facts live in the index (PostgreSQL or MySQL): a flushed
    window needs nothing kept, and an open one is rebuilt after a crash by replaying its
    events, because none of them is acked before the window that holds it was flushed.
    That replaces the changelog, which rewrote the whole growing aggregate to the broker at
    every instance (about one record and several KB per instance, kept by Tansu forever).

    A window records the first source offset it holds per source partition (``firsts``:
    a series normally comes from one partition, but an unkeyed event may bring it from
    another). Acks are released in offset order, per source partition, below the oldest
    first offset of any window still open or being flushed there: Faust commits the
    highest *contiguous* acked offset, and faust 0.15.3 commits past a single unacked
    offset at the front of the acked ones (faust-streaming#606), so an out-of-order ack
    could lose an instance.
    """

    def __init__(self) -> None:
        self._windows: dict[bytes, dict[str, Any]] = {}
        #: Windows taken out of the store while their state row is written.
        self._flushing: list[dict[str, Any]] = []
        #: (topic, partition) -> [(offset, event)] in offset order, not acked yet.
        self._held: dict[TopicPartition, list[tuple[int, Any]]] = {}

    # -- the window store ----------------------------------------------------------------

    def get_window(self, key: bytes) -> dict[str, Any] | None:
        return self._windows.get(key)

    def set_window(self, key: bytes, agg: dict[str, Any]) -> None:
        self._windows[key] = agg

    def delete_window(self, key: bytes) -> None:
        self._windows.pop(key, None)

    def iter_windows(self) -> Iterator[tuple[bytes, dict[str, Any]]]:
        yield from list(self._windows.items())

    def open_count(self) -> int:
        return len(self._windows) + len(self._flushing)

    def take_for_flush(self, key: bytes) -> dict[str, Any] | None:
        """Take a window out of the store for its flush; it keeps holding its events until
        :meth:`flushed`. A new instance of the series meanwhile starts a new window."""
        agg = self._windows.pop(key, None)
        if agg is not None:
            self._flushing.append(agg)
        return agg

    def flushed(self, agg: dict[str, Any]) -> None:
        self._flushing = [a for a in self._flushing if a is not agg]

    # -- held events -------------------------------------------------------------------

    def hold(self, tp: TopicPartition, offset: int, event: Any) -> None:
        held = self._held.setdefault(tp, [])
        if held and offset < held[-1][0]:
            # Delivered again below what is held (a re-seek): keep the list in offset order.
            bisect.insort(held, (offset, event), key=lambda pair: pair[0])
        else:
            held.append((offset, event))

    def floor(self, tp: TopicPartition) -> int | None:
        """The oldest first offset on ``tp`` of a window open or being flushed (None: none)."""
        firsts = [first for agg in (*self._windows.values(), *self._flushing)
                  if (first := agg.get("firsts", {}).get(tp)) is not None]
        return min(firsts) if firsts else None

    def releasable(self, tp: TopicPartition) -> list[Any]:
        """Pop the held events of ``tp`` no window needs any more, in offset order."""
        held = self._held.get(tp)
        if not held:
            return []
        floor = self.floor(tp)
        n = len(held) if floor is None else bisect.bisect_left(held, floor, key=lambda pair: pair[0])
        if n == 0:
            return []
        out = [event for _, event in held[:n]]
        del held[:n]
        return out

    def held_events(self) -> list[Any]:
        return [event for held in self._held.values() for _, event in held]

    def held_count(self) -> int:
        return sum(len(held) for held in self._held.values())

    def partitions(self) -> set[TopicPartition]:
        """Source partitions with a window open or being flushed, or a held event."""
        tps = {tp for agg in (*self._windows.values(), *self._flushing) for tp in agg.get("firsts", {})}
        return tps | {tp for tp, held in self._held.items() if held}

    def clear(self) -> list[Any]:
        """Drop every window and held event; return the events (unacked).

        After an assignment change: a window may hold events of several partitions, so
        everything not flushed is read again from the committed offsets (nothing of it
        was acked), by this worker or by the partition's new owner."""
        events = self.held_events()
        self._windows.clear()
        self._flushing.clear()
        self._held.clear()
        return events
