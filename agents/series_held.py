"""Series stage with the facts in the index: windows in memory, fed by ingest in-process.

With an index (PostgreSQL or MySQL), the per-instance facts count the series exactly and
de-duplicate replays, so a window is disposable: it lives in this process only
(:class:`tables.series.HeldWindows`), and the source events of its instances are not acked
before it was flushed, so a crash replays them. Ingest hands each instance's series row to
:meth:`HeldSeriesStage.add` directly, and this stage holds the ingest's ``storage_queue``
events: no internal topic, no changelog, no flush message through the broker (about two
broker records and two Faust events per instance fewer, issue #15).

Records still on ``dicomflow_series_instances`` (written by an older version, or by a
worker without an index) are consumed the same way, holding that topic's events.

A window also closes before its end once its series has gone quiet (no instance for
``DICOMFLOW_SERIES_QUIET_SECONDS``) and every source partition it came from is read to the
partition's high watermark: the sender has finished, and waiting for the window's end would
only delay the series row (by up to the window length; issue #15). At most once per window
length per series, so a sender that pauses and resumes costs one extra write, not one per pause.

A timer flushes windows whose time is over: it takes the window out of the store (a new
instance of the series starts a new window meanwhile), records its instances and reads the
count and the next version in one index transaction, sends the state row, and then
releases the acks the window held, in offset order per source partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import orjson
from faust import Stream
from faust.types import TP, EventT, StreamT

from agents.gaps import GapGuard
from agents.sink_support import release, stopping
from schemas import codec
from schemas.records import DicomStateMeta
from sinks.base import RetryAborted, retry_until_done
from sinks.series_facts import FactsBase
from streams.broker import Record
from streams.topology import SERIES_INSTANCES
from tables.series import HeldWindows, TopicPartition, window_start

if TYPE_CHECKING:
    from streams.app import DicomflowApp

__all__ = ["HeldSeriesStage", "SeriesInstance", "stage_of", "MAX_WINDOW_INSTANCES"]

log = logging.getLogger(__name__)

#: Instances after which a window is flushed before its time (its aggregate carries their UIDs).
MAX_WINDOW_INSTANCES = 500
#: Held events beyond which the feeding stage waits (the index is down, say): bounded memory.
MAX_HELD = 20_000

#: One instance for a window: (source topic, partition, offset, timestamp, series key, message).
SeriesInstance = tuple[str, int, int, float | None, bytes, dict[str, Any]]

Ack = Callable[[EventT], Awaitable[Any]]

_STAGES: weakref.WeakKeyDictionary[Any, HeldSeriesStage] = weakref.WeakKeyDictionary()


def stage_of(app: DicomflowApp) -> HeldSeriesStage | None:
    """The app's held-window series stage, if its series index is configured."""
    try:
        return _STAGES.get(app)
    except TypeError:  # not weak-referenceable (a test's stand-in app): no stage registered for it
        return None


class HeldSeriesStage:
    """Windows in memory, their events held unacked until the window's state row is out."""

    def __init__(self, app: DicomflowApp, window_s: float, facts: FactsBase, quiet_s: float = 0.0) -> None:
        self.app = app
        self.window_s = window_s
        #: Quiet this long (and read to the end): the window closes early (0: off).
        self.quiet_s = quiet_s if 0 < quiet_s < window_s else 0.0
        if quiet_s >= window_s:
            log.info("series quiet close off: DICOMFLOW_SERIES_QUIET_SECONDS=%s is not below the window "
                     "(%s s), so windows close at their end only", quiet_s, window_s)
        #: The highest source offset handed to this stage per partition (monotonic "read to").
        self._read_to: dict[TopicPartition, int] = {}
        #: The latest event time (broker timestamp, s) read per source partition: a window whose
        #: end it passed has seen every instance it will get from that partition.
        self._event_time: dict[TopicPartition, float] = {}
        #: When each series last closed quiet (monotonic): spaces the quiet closes. Closes at a
        #: window's end or at its size limit are not counted: they must not delay the next window's.
        self._quiet_at: dict[bytes, float] = {}
        self.facts = facts
        #: How often the timer looks for closed windows; bounds the flush delay after a close.
        self.scan_interval_s = min(0.25, window_s / 2)
        self.windows = HeldWindows()
        self.guard = GapGuard(app, SERIES_INSTANCES)
        #: How each source topic's events are acked (its agent's manual-ack stream).
        self.ackers: dict[str, Ack] = {}
        #: Who must forget a source partition's expected offset when its held events are dropped.
        self.forgetters: list[Callable[[Iterable[tuple[str, int]]], None]] = [self.guard.forget]
        #: Windows whose time ended early (a newer window of the series, or too many instances).
        self._due: list[tuple[bytes, dict[str, Any]]] = []
        self.counters = {"flushes": 0, "instances": 0, "windows_unsettled": 0, "events_held": 0,
                         "windows_dropped": 0, "quiet_closes": 0}
        _STAGES[app] = self

    # -- instances in ------------------------------------------------------------------

    def add(self, instances: Sequence[SeriesInstance]) -> None:
        """Put instances into their series' windows (synchronous: nothing interleaves)."""
        now = time.time()
        for topic, partition, offset, timestamp, key, msg in instances:
            w = window_start(timestamp or now, self.window_s)
            agg = self.windows.get_window(key)
            if agg is not None and w > agg["w"]:
                # A newer window started while this one was still open: it closes now.
                self._close_early(key)
                agg = None
            if agg is None:
                agg = {"w": w, "state": msg["state"], "created": msg["state"].get("created_time"), "sops": [],
                       "paths": {}, "firsts": {}}
                self.windows.set_window(key, agg)
            firsts: dict[TopicPartition, int] = agg["firsts"]
            tp = (topic, partition)
            firsts[tp] = min(firsts.get(tp, offset), offset)
            sops: list[str] = agg["sops"]
            if msg["sop_uid"] not in sops:
                sops.append(msg["sop_uid"])
            if msg.get("path"):
                # Where the file is (storage-root relative), recorded with the facts for the series JSON.
                agg["paths"][msg["sop_uid"]] = msg["path"]
            agg["state"] = msg["state"]
            agg["touched"] = time.monotonic()
            self.counters["instances"] += 1
            if len(sops) >= MAX_WINDOW_INSTANCES:
                self._close_early(key)  # the aggregate carries every UID: keep it bounded

    async def wait_room(self) -> None:
        """Backpressure for the feeding stage: while the index is down, windows cannot flush and
        their events pile up here; past :data:`MAX_HELD` events, ingest waits."""
        should_stop = stopping(self.app)
        while self.windows.held_count() >= MAX_HELD and not should_stop():
            await asyncio.sleep(0.1)

    def _close_early(self, key: bytes) -> None:
        agg = self.windows.take_for_flush(key)
        if agg is not None:
            self._due.append((key, agg))

    async def hold(self, events: Sequence[EventT], ack: Ack | None = None) -> None:
        """Hold events whose instances were added (or that carried none); ack what no window needs.

        ``ack``: how their topic's events are acked (the agent's manual-ack stream)."""
        touched: set[TopicPartition] = set()
        for event in events:
            m = event.message
            tp = (m.topic, m.partition)
            if ack is not None:
                self.ackers.setdefault(m.topic, ack)
            self.windows.hold(tp, m.offset, event)
            self._read_to[tp] = max(self._read_to.get(tp, -1), m.offset)
            if m.timestamp:  # every event read, with or without an instance (a dead letter)
                self._event_time[tp] = max(self._event_time.get(tp, 0.0), m.timestamp)
            touched.add(tp)
        for tp in touched:
            await self._release(tp)
        if getattr(self.app, "should_stop", False):
            # Handed here after the stop gave back what the windows held (a batch in flight when
            # the signal came): Faust's stop waits for every unacked event, so give these back too.
            # Not acked, they are read again after the restart.
            self.release_held()

    async def _release(self, tp: TopicPartition) -> None:
        ack = self.ackers.get(tp[0])
        for event in self.windows.releasable(tp):
            if ack is not None:
                await ack(event)
            else:
                event.ack()
        self.counters["events_held"] = self.windows.held_count()

    # -- flushing ----------------------------------------------------------------------

    async def flush_closed(self) -> None:
        """The timer: flush every window whose time is over (and those closed early)."""
        if getattr(self.app, "rebalancing", False):
            # Faust's revocation waits until every message it handed out is acked; these are
            # acked only after their window's flush. Let it go on: they stay held here.
            release(self.app, self.windows.held_events())
        self.counters["windows_unsettled"] = (self.windows.open_count() + len(self._due)
                                              + (1 if getattr(self.app, "rebalancing", False) else 0))
        now, mono = time.time(), time.monotonic()
        for key, agg in self.windows.iter_windows():
            if self._over(agg, now):
                self._close_early(key)
            elif self._quiet(key, agg, mono):
                self.counters["quiet_closes"] += 1
                self._quiet_at[key] = mono
                self._close_early(key)
        while self._due:
            if getattr(self.app, "rebalancing", False):
                release(self.app, self.windows.held_events())
                return  # flushed after the rebalance (or dropped by it)
            key, agg = self._due[0]
            try:
                await self._emit(key, agg)
            except RetryAborted:
                return  # stopping or rebalancing: the window's events stay unacked, replayed later
            except Exception as exc:  # the broker refusing the state row, say: again at the next tick
                log.error("series flush failed key=%s (retried): %s", key.decode(errors="replace"), exc)
                return
            self._due.pop(0)
            self.windows.flushed(agg)
            for tp in agg["firsts"]:
                await self._release(tp)
        self.counters["windows_unsettled"] = self.windows.open_count() + len(self._due)
        if len(self._quiet_at) > 1024:  # only the last window length matters
            cutoff = time.monotonic() - self.window_s
            self._quiet_at = {k: t for k, t in self._quiet_at.items() if t >= cutoff}

    def _over(self, agg: dict[str, Any], now: float) -> bool:
        """The window's time is over, and it has seen every instance it will get.

        A worker catching up (started after the instances were published, or behind) reads
        windows whose wall-clock time is long over: closing them at once would write a series
        once per batch read, not once per window. So a window whose time is over closes when
        each partition it came from is read past the window's end (a later event was read) or
        to the partition's end. Never when too many events are held: a lagging window must not
        stop the reading that would close it."""
        end = agg["w"] + self.window_s
        if now < end:
            return False
        if self.windows.held_count() >= MAX_HELD // 2:
            return True
        for tp in agg["firsts"]:
            if self._event_time.get(tp, 0.0) >= end:
                continue
            if self._caught_up(tp) is False:
                return False
        return True

    def _caught_up(self, tp: TopicPartition) -> bool | None:
        """Read to the partition's high watermark (None: not known, no consumer yet)."""
        try:
            highwater = self.app.consumer.highwater(TP(*tp))
        except Exception:  # noqa: BLE001 - no consumer (yet)
            return None
        if highwater is None:
            return None
        return self._read_to.get(tp, -1) + 1 >= highwater

    def _quiet(self, key: bytes, agg: dict[str, Any], mono: float) -> bool:
        """The series went quiet with its partitions read to the end, and did not close quiet in
        the last window length (the spacing that bounds what a pausing sender costs)."""
        if not self.quiet_s or mono - agg.get("touched", mono) < self.quiet_s:
            return False
        if mono - self._quiet_at.get(key, float("-inf")) < self.window_s:
            return False
        # Unknown (no consumer yet) is not read to the end: no early close.
        return all(self._caught_up(tp) for tp in agg["firsts"])

    async def _emit(self, key: bytes, agg: dict[str, Any]) -> None:
        row = dict(agg["state"])
        fact = await self.facts.record_with_retry(
            row["tenant_id"], row["study_uid"], row["series_uid"], agg["sops"], agg["created"],
            should_stop=stopping(self.app), paths=agg["paths"])
        row["series_related_instances"], row["version"] = fact.count, fact.version
        # The series' first created_time, kept with the facts: windows come and go.
        row["created_time"] = codec.format_datetime(fact.created) if fact.created else agg["created"]
        # UTC, informational: states are ordered by their version, not by a wall clock.
        row["updated_time"] = codec.format_datetime(datetime.now(UTC).replace(tzinfo=None))
        record = codec.from_row(DicomStateMeta, row)
        fut = await self.app.queues.state.send(key=key, value=codec.dumps(record))
        await fut  # the state row is in the broker before the window's events are acked
        self.counters["flushes"] += 1
        log.info("series flush key=%s window=%s instances=%s count=%s version=%s", key.decode(errors="replace"),
                 agg["w"], len(agg["sops"]), fact.count, fact.version)

    def drop_all(self) -> None:
        """Partitions were revoked: drop everything not flushed. Faust seeks every partition it
        keeps back to its committed offset, and the gap guards restart from there, so all of it
        is read again (nothing of it was acked), by this worker or by the partition's new owner.
        A window may hold events of several partitions: nothing less than all would do."""
        tps = self.windows.partitions() | {tp for _, agg in self._due for tp in agg["firsts"]}
        dropped = self.windows.clear()
        self._due.clear()
        # Every partition kept is read again from its committed offset (not only those with
        # windows): what was read to is unknown until it is handed here again.
        self._read_to.clear()
        self._event_time.clear()
        release(self.app, dropped)
        for forget in self.forgetters:
            forget(tps)
        if tps:
            self.counters["windows_dropped"] += 1
            log.info("series windows dropped at a rebalance: partitions=%s events=%s (read again from the "
                     "committed offsets)", sorted(tps), len(dropped))

    def release_held(self) -> None:
        """Hand the held events back to Faust unacked (stopping: they are replayed at the next start)."""
        release(self.app, self.windows.held_events())

    # -- the internal topic (records of an older version, or of a worker without an index) ----

    async def consume(self, stream: StreamT[Any]) -> None:
        manual = cast(Stream[Any], stream).noack()
        self.ackers[SERIES_INSTANCES] = manual.ack
        should_stop = stopping(self.app)
        async for event in manual.events():
            m = event.message
            try:
                _, missing = await retry_until_done(partial(self.guard.check, m.partition, m.offset),
                                                    what="series gap check", should_stop=should_stop)
            except RetryAborted:
                self.guard.forget([TP(SERIES_INSTANCES, m.partition)])
                release(self.app, [event])
                continue
            records = [*missing, Record(m.topic, m.partition, m.offset, event.key, event.value,
                                        m.timestamp or 0.0)]
            instances: list[SeriesInstance] = []
            for r in records:
                try:
                    msg = orjson.loads(r.value)
                except orjson.JSONDecodeError:
                    log.error("series: undecodable message partition=%s offset=%s", r.partition, r.offset)
                    continue
                if "flush" in msg:
                    continue  # a flush request of the changelog design: the timer flushes here
                key = r.key if isinstance(r.key, bytes) else str(r.key or "").encode()
                instances.append((SERIES_INSTANCES, r.partition, r.offset, r.timestamp or None, key, msg))
            self.add(instances)
            await self.hold([event])


def register(app: DicomflowApp, facts: FactsBase) -> HeldSeriesStage:
    stage = HeldSeriesStage(app, app.settings.series_window_seconds, facts, app.settings.series_quiet_seconds)
    app.close_on_shutdown(facts.stop)
    app.metrics.register_counters("series_facts", facts.counters)
    app.metrics.register_counters("series_window", stage.counters)
    app.metrics.register_counters("series_gaps", stage.guard.stats)
    stage.guard.watch_revocations(app)

    async def on_revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        stage.drop_all()

    app.on_partitions_revoked.connect(on_revoked)  # type: ignore[arg-type]
    app.before_stop(stage.release_held)
    app.agent(app.queues.series_instances, name="series")(stage.consume)
    app.timer(stage.scan_interval_s, name="series_flush")(stage.flush_closed)
    return stage
