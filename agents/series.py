"""Series stage: per-instance DicomStateMeta -> one debounced DicomStateMeta per series per window.

With a series index (PostgreSQL or MySQL) the stage is :mod:`agents.series_held`: windows
in memory, fed by ingest in-process, counts from the per-instance facts. This module is
the stage without an index, where the counts come from the broker: ingest sends each
instance to ``dicomflow_series_instances``, and the window lives in changelogged tables.

See tables/series.py for the state and why Faust's own window close is not used. A
timer finds windows that have closed on partitions this worker actively owns and asks
for their flush by sending ``{"flush": w, "off": off}`` through the same topic and
key; the flush itself happens when that message is consumed, inside the stream.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import orjson
from faust import Stream
from faust.types import TP, EventT, StreamT

from agents import series_held
from agents.gaps import GapGuard
from agents.sink_support import release, stopping
from schemas import codec
from schemas.records import DicomStateMeta
from sinks.base import RetryAborted, retry_until_done
from sinks.series_facts import open_facts
from streams.broker import Record
from streams.topology import SERIES_INSTANCES
from tables.series import SeriesTables, marker_key, window_start

if TYPE_CHECKING:
    from core.settings import Settings
    from streams.app import DicomflowApp

__all__ = ["SeriesStage", "register"]

log = logging.getLogger(__name__)


class SeriesStage:
    """The window logic and the timer's non-durable bookkeeping (rebuilt from the table when
    the assignment changes)."""

    def __init__(self, app: DicomflowApp, window_s: float) -> None:
        self.app = app
        self.window_s = window_s
        #: How often the timer looks for closed windows; bounds the flush delay after a close.
        self.scan_interval_s = min(0.25, window_s / 2)
        self.tables = SeriesTables(app, app.settings.partitions)
        self.guard = GapGuard(app, SERIES_INSTANCES)
        self._requested: dict[bytes, tuple[float, int]] = {}
        self._dirty: dict[bytes, tuple[float, int, int]] = {}
        self._seen_actives: frozenset[TP] = frozenset()
        self.counters = {"flushes": 0, "instances": 0, "redeliveries": 0, "replays_skipped": 0,
                         "windows_unsettled": 0}

    async def _emit(self, key: bytes, agg: dict[str, Any]) -> None:
        row = dict(agg["state"])
        row["series_related_instances"] = agg["n"]
        row["created_time"] = agg["created"]
        # UTC, informational: states are ordered by their version, not by a wall clock.
        row["updated_time"] = codec.format_datetime(datetime.now(UTC).replace(tzinfo=None))
        record = codec.from_row(DicomStateMeta, row)
        await self.app.queues.state.send(key=key, value=codec.dumps(record))
        self.counters["flushes"] += 1
        log.info("series flush key=%s window=%s instances=%s offset=%s", key.decode(errors="replace"), agg["w"],
                 agg["n"], agg["off"])

    def _mark_clean(self, key: bytes, agg: dict[str, Any]) -> None:
        agg["dirty"] = False
        self.tables.set_window(key, agg)
        self._dirty.pop(key, None)
        self._requested.pop(key, None)

    async def _on_instance(self, offset: int, partition: int, timestamp: float | None, key: bytes,
                           msg: dict[str, Any]) -> None:
        t = self.tables
        agg: dict[str, Any] | None = t.get_window(key)
        mkey = marker_key(key, msg["sop_uid"])
        marker = t.get_marker(mkey)
        if agg is not None and offset <= agg["off"]:
            # Replay of an event already applied. Its marker may have been lost in the crash
            # (two changelogs are not written atomically): restore it so a later redelivery
            # of the same instance is still recognised.
            if marker is None:
                t.set_marker(mkey, offset)
            self.counters["replays_skipped"] += 1
            return
        new_instance = marker is None or marker == offset
        if marker is None:
            t.set_marker(mkey, offset)
        w = window_start(timestamp or time.time(), self.window_s)
        if agg is None:
            agg = {"w": w, "n": 0, "off": offset, "p": partition, "dirty": False, "state": msg["state"],
                   "created": msg["state"].get("created_time")}
        elif agg["dirty"] and w > agg["w"]:
            # A newer window started while the previous one was still pending: close it here.
            await self._emit(key, agg)
            agg["dirty"] = False
        if not agg["dirty"]:
            agg["w"] = w
        agg["n"] += 1 if new_instance else 0
        agg["off"] = offset
        agg["p"] = partition
        agg["state"] = msg["state"]
        agg["dirty"] = True
        t.set_window(key, agg)
        self._dirty[key] = (agg["w"], offset, partition)
        self.counters["instances" if new_instance else "redeliveries"] += 1

    async def _on_flush(self, key: bytes, msg: dict[str, Any]) -> None:
        agg: dict[str, Any] | None = self.tables.get_window(key)
        if agg is None or not agg["dirty"] or agg["w"] != msg["flush"]:
            return  # flushed already, or a newer window took over (it gets its own request)
        try:
            await self._emit(key, agg)
        except BaseException:
            self._requested.pop(key, None)  # ask again: the window is still pending
            raise
        self._mark_clean(key, agg)

    async def handle(self, offset: int, partition: int, timestamp: float | None, key: bytes, value: bytes) -> None:
        try:
            msg = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.error("series: undecodable message partition=%s offset=%s", partition, offset)
            return
        if "flush" in msg:
            await self._on_flush(key, msg)
        else:
            await self._on_instance(offset, partition, timestamp, key, msg)

    async def consume(self, stream: StreamT[Any]) -> None:
        """Every event is acked only after it was handled: faust's ``events()`` acks in a
        ``finally``, so an exception (PostgreSQL or the broker unavailable) would otherwise
        ack an instance that no window holds. Failures are retried; a stop or rebalance
        gives up without acking (the next owner replays from the committed offset)."""
        manual = cast(Stream[Any], stream).noack()
        should_stop = stopping(self.app)
        async for event in manual.events():
            m = event.message
            try:
                _, missing = await retry_until_done(partial(self.guard.check, m.partition, m.offset),
                                                    what="series gap check", should_stop=should_stop)
                # Idempotent: an event at or below a window's last applied offset is skipped.
                await retry_until_done(partial(self._handle_event, event, missing),
                                       what=f"series event offset={m.offset}", should_stop=should_stop)
            except RetryAborted as exc:
                log.warning("series event released unacked partition=%s offset=%s reason=%s", m.partition,
                            m.offset, exc)
                self.guard.forget([TP(SERIES_INSTANCES, m.partition)])
                release(self.app, [event])
                continue
            await manual.ack(event)

    async def _handle_event(self, event: EventT, missing: list[Record]) -> None:
        for r in missing:  # same partition: table writes land on the right changelog partition
            await self.handle(r.offset, r.partition, r.timestamp, r.key or b"", r.value)
        m = event.message
        key = event.key if isinstance(event.key, bytes) else str(event.key).encode()
        await self.handle(m.offset, m.partition, m.timestamp, key, event.value)

    def _active_partitions(self) -> frozenset[int]:
        actives = self.app.assignor.assigned_actives()
        changelog = self.tables.changelog_topic()
        return frozenset(tp.partition for tp in actives if tp.topic in (SERIES_INSTANCES, changelog))

    async def request_flushes(self) -> None:
        actives = frozenset(self.app.assignor.assigned_actives())
        if actives != self._seen_actives:
            # Assignment changed (start, restart, rebalance): windows restored from the
            # changelog are unknown to this process until we look at the table itself.
            self._seen_actives = actives
            self._requested.clear()
            self._dirty.clear()
            for key, agg in self.tables.iter_windows():
                if agg.get("dirty"):
                    self._dirty[key] = (agg["w"], agg["off"], agg["p"])
        # For the relay's drained check: a worker between assignment and its first look at the
        # table, or with a window not yet flushed, is not settled.
        self.counters["windows_unsettled"] = len(self._dirty) + (1 if getattr(self.app, "rebalancing", False) else 0)
        owned = self._active_partitions()
        now = time.time()
        for key, (w, off, partition) in list(self._dirty.items()):
            if partition not in owned or now < w + self.window_s:
                continue
            if self._requested.get(key) == (w, off):
                continue
            self._requested[key] = (w, off)
            await self.app.queues.series_instances.send(key=key, value=orjson.dumps({"flush": w, "off": off}))


def register(app: DicomflowApp, settings: Settings) -> None:
    if settings.index_dsn is not None:
        # The facts live with the series index (PostgreSQL or MySQL, sinks/series_facts.py).
        series_held.register(app, open_facts(settings.index_dsn))
        return
    stage = SeriesStage(app, settings.series_window_seconds)
    stage.guard.watch_revocations(app)
    app.metrics.register_counters("series_window", stage.counters)
    app.metrics.register_counters("series_gaps", stage.guard.stats)
    app.agent(app.queues.series_instances, name="series")(stage.consume)
    app.timer(stage.scan_interval_s, name="request_flushes")(stage.request_flushes)
