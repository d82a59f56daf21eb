"""Series stage: per-instance DicomStateMeta -> one debounced DicomStateMeta per series per window.

See tables/series.py for the state and why Faust's own window close is not used. A
timer finds windows that have closed on partitions this worker actively owns and asks
for their flush by sending ``{"flush": w, "off": off}`` through the same topic and
key; the flush itself happens when that message is consumed, inside the stream.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

import orjson
from faust.types import TP, StreamT

from agents.gaps import GapGuard
from schemas import codec
from schemas.records import DicomStateMeta
from streams.app import app, settings
from streams.topics import series_instances, state
from streams.topology import SERIES_INSTANCES
from tables.series import (
    changelog_topic,
    get_marker,
    get_window,
    iter_windows,
    marker_key,
    set_marker,
    set_window,
    window_start,
)

log = logging.getLogger(__name__)

WINDOW_S = settings.series_window_seconds
#: How often the timer looks for closed windows; bounds the flush delay after a close.
SCAN_INTERVAL_S = min(0.25, WINDOW_S / 2)

# Non-durable bookkeeping of the timer (rebuilt from the table when assignment changes).
_requested: dict[bytes, tuple[float, int]] = {}
_dirty: dict[bytes, tuple[float, int, int]] = {}
_seen_actives: frozenset[TP] = frozenset()
counters = {"flushes": 0, "instances": 0, "redeliveries": 0, "replays_skipped": 0}
app.metrics.register_counters("series_window", counters)


async def _emit(key: bytes, agg: dict[str, Any]) -> None:
    row = dict(agg["state"])
    row["series_related_instances"] = agg["n"]
    row["created_time"] = agg["created"]
    row["updated_time"] = codec.format_datetime(datetime.now())
    record = codec.from_row(DicomStateMeta, row)
    await state.send(key=key, value=codec.dumps(record))
    counters["flushes"] += 1
    log.info("series flush key=%s window=%s instances=%s offset=%s", key.decode(errors="replace"), agg["w"],
             agg["n"], agg["off"])


def _mark_clean(key: bytes, agg: dict[str, Any]) -> None:
    agg["dirty"] = False
    set_window(key, agg)
    _dirty.pop(key, None)
    _requested.pop(key, None)


async def _on_instance(offset: int, partition: int, timestamp: float | None, key: bytes, msg: dict[str, Any]) -> None:
    agg: dict[str, Any] | None = get_window(key)
    mkey = marker_key(key, msg["sop_uid"])
    marker = get_marker(mkey)
    if agg is not None and offset <= agg["off"]:
        # Replay of an event already applied. Its marker may have been lost in the crash
        # (two changelogs are not written atomically): restore it so a later redelivery
        # of the same instance is still recognised.
        if marker is None:
            set_marker(mkey, offset)
        counters["replays_skipped"] += 1
        return
    new_instance = marker is None or marker == offset
    if marker is None:
        set_marker(mkey, offset)
    w = window_start(timestamp or time.time(), WINDOW_S)
    if agg is None:
        agg = {"w": w, "n": 0, "off": offset, "p": partition, "dirty": False, "state": msg["state"],
               "created": msg["state"].get("created_time")}
    elif agg["dirty"] and w > agg["w"]:
        # A newer window started while the previous one was still pending: close it here.
        await _emit(key, agg)
        agg["dirty"] = False
    if not agg["dirty"]:
        agg["w"] = w
    agg["n"] += 1 if new_instance else 0
    agg["off"] = offset
    agg["p"] = partition
    agg["state"] = msg["state"]
    agg["dirty"] = True
    set_window(key, agg)
    _dirty[key] = (agg["w"], offset, partition)
    counters["instances" if new_instance else "redeliveries"] += 1


async def _on_flush(key: bytes, msg: dict[str, Any]) -> None:
    agg: dict[str, Any] | None = get_window(key)
    if agg is None or not agg["dirty"] or agg["w"] != msg["flush"]:
        return  # flushed already, or a newer window took over (it gets its own request)
    await _emit(key, agg)
    _mark_clean(key, agg)


async def _handle(offset: int, partition: int, timestamp: float | None, key: bytes, value: bytes) -> None:
    try:
        msg = orjson.loads(value)
    except orjson.JSONDecodeError:
        log.error("series: undecodable message partition=%s offset=%s", partition, offset)
        return
    if "flush" in msg:
        await _on_flush(key, msg)
    else:
        await _on_instance(offset, partition, timestamp, key, msg)


guard = GapGuard(series_instances.get_topic_name())
guard.watch_revocations(app)
app.metrics.register_counters("series_gaps", guard.stats)


@app.agent(series_instances)
async def series(stream: StreamT[Any]) -> None:
    async for event in stream.events():
        m = event.message
        _, missing = await guard.check(m.partition, m.offset)
        for r in missing:  # same partition: table writes still land on the right changelog partition
            await _handle(r.offset, r.partition, r.timestamp, r.key or b"", r.value)
        key = event.key if isinstance(event.key, bytes) else str(event.key).encode()
        await _handle(m.offset, m.partition, m.timestamp, key, event.value)


def _active_partitions() -> frozenset[int]:
    actives = app.assignor.assigned_actives()
    changelog = changelog_topic()
    return frozenset(tp.partition for tp in actives if tp.topic in (SERIES_INSTANCES, changelog))


@app.timer(SCAN_INTERVAL_S)
async def request_flushes() -> None:
    global _seen_actives
    actives = frozenset(app.assignor.assigned_actives())
    if actives != _seen_actives:
        # Assignment changed (start, restart, rebalance): windows restored from the
        # changelog are unknown to this process until we look at the table itself.
        _seen_actives = actives
        _requested.clear()
        _dirty.clear()
        for key, agg in iter_windows():
            if agg.get("dirty"):
                _dirty[key] = (agg["w"], agg["off"], agg["p"])
    owned = _active_partitions()
    now = time.time()
    for key, (w, off, partition) in list(_dirty.items()):
        if partition not in owned or now < w + WINDOW_S:
            continue
        if _requested.get(key) == (w, off):
            continue
        _requested[key] = (w, off)
        await series_instances.send(key=key, value=orjson.dumps({"flush": w, "off": off}))
