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

from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["SeriesTables", "window_start", "marker_key"]


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
