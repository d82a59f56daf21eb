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

from streams.app import app, settings

__all__ = ["get_window", "set_window", "iter_windows", "get_marker", "set_marker", "window_start",
           "marker_key", "changelog_topic"]

# Keys and values are bytes (the app's raw serializers); values are orjson documents.
_window: Any = app.Table("series_window", default=None, partitions=settings.partitions, key_type=bytes,
                         value_type=bytes)
_seen: Any = app.Table("series_seen", default=None, partitions=settings.partitions, key_type=bytes,
                       value_type=bytes)


def get_window(key: bytes) -> dict[str, Any] | None:
    raw = _window.get(key)
    return orjson.loads(raw) if raw else None


def set_window(key: bytes, agg: dict[str, Any]) -> None:
    """Only from inside stream iteration: the write goes to the current event's partition."""
    _window[key] = orjson.dumps(agg)


def iter_windows() -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Every aggregate in this worker's local store (active and standby partitions)."""
    for key, raw in list(_window.items()):
        if raw:
            yield key, orjson.loads(raw)


def get_marker(key: bytes) -> int | None:
    raw = _seen.get(key)
    return int(raw) if raw else None


def set_marker(key: bytes, offset: int) -> None:
    _seen[key] = str(offset).encode()


def changelog_topic() -> str:
    return str(_window.changelog_topic.get_topic_name())


def window_start(timestamp: float, size: float) -> float:
    """Start of the tumbling window (aligned to the epoch) that holds ``timestamp``."""
    return (timestamp // size) * size


def marker_key(series: bytes, sop_uid: str) -> bytes:
    return series + b"|" + sop_uid.encode()
