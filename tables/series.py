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

__all__ = ["SeriesTables", "HeldWindows", "window_start", "marker_key"]


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


class HeldWindows:
    """Series windows kept in this process only, with the source events they hold unacked.

    Used when the per-instance facts live in the index (PostgreSQL or MySQL): a flushed
    window needs nothing kept, and an open one is rebuilt after a crash by replaying its
    events, because none of them is acked before the window that holds it was flushed.
    That replaces the changelog, which rewrote the whole growing aggregate to the broker at
    every instance (about one record and several KB per instance, kept by Tansu forever).

    Acks are released in offset order, per partition, below the first offset of the oldest
    open window of that partition: Faust commits the highest *contiguous* acked offset, and
    faust 0.15.3 commits past a single unacked offset at the front of the acked ones
    (faust-streaming#606), so an out-of-order ack could lose an instance.
    """

    def __init__(self) -> None:
        self._windows: dict[bytes, dict[str, Any]] = {}
        #: partition -> [(offset, event)] in offset order, not acked yet.
        self._held: dict[int, list[tuple[int, Any]]] = {}

    # -- the window store (same surface as SeriesTables) ---------------------------------

    def get_window(self, key: bytes) -> dict[str, Any] | None:
        return self._windows.get(key)

    def set_window(self, key: bytes, agg: dict[str, Any]) -> None:
        self._windows[key] = agg

    def delete_window(self, key: bytes) -> None:
        self._windows.pop(key, None)

    def iter_windows(self) -> Iterator[tuple[bytes, dict[str, Any]]]:
        yield from list(self._windows.items())

    # -- held events -------------------------------------------------------------------

    def hold(self, partition: int, offset: int, event: Any) -> None:
        held = self._held.setdefault(partition, [])
        if held and offset < held[-1][0]:
            # Delivered again below what is held (a re-seek): keep the list in offset order.
            bisect.insort(held, (offset, event), key=lambda pair: pair[0])
        else:
            held.append((offset, event))

    def floor(self, partition: int) -> int | None:
        """The first source offset of the oldest open window on ``partition`` (None: none open)."""
        firsts = [agg["first"] for agg in self._windows.values()
                  if agg.get("dirty") and agg.get("p") == partition and "first" in agg]
        return min(firsts) if firsts else None

    def releasable(self, partition: int) -> list[Any]:
        """Pop the held events no open window needs any more, in offset order."""
        held = self._held.get(partition)
        if not held:
            return []
        floor = self.floor(partition)
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

    def partitions(self) -> set[int]:
        """Partitions with an open window or a held event."""
        return {agg["p"] for agg in self._windows.values()} | set(self._held)

    def forget_partition(self, partition: int) -> list[Any]:
        """Drop a partition's windows and held events; return the events (unacked).

        For a partition that moved to another worker, or whose processing was given up:
        its next owner (maybe this worker again) reads it again from the committed offset,
        which none of these events is past."""
        for key, agg in list(self._windows.items()):
            if agg.get("p") == partition:
                del self._windows[key]
        return [event for _, event in self._held.pop(partition, [])]
