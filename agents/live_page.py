"""The live page on the worker's web port: ``/`` (HTML), ``/live.html`` (its body, which the page
polls every few seconds) and ``/live.json`` (the same data for scripts).

What it shows: lag per topic and partition (computed like ``dicomflow status``: the broker's end
offsets against the group's committed offsets); events per second per stage over the last
15 minutes, from a small in-memory ring of counter samples; dead letters by code and the last
ten, read incrementally from the dead-letter topics; the sinks' loads and failures; open
series windows and stale JSON documents.

Lag and dead letters are the whole group's (read from the broker, whichever worker serves the
page); the counters are this worker's own, as in its ``/metrics``. Broker reads happen only
while someone looks (at most once per :data:`CACHE_S`), so an unwatched page costs nothing but
the 1 s sampling timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import TopicPartition

from agents.live_view import render_body, render_page
from streams.broker import beginning_offsets, committed_offsets, end_offsets, read_range
from streams.topology import SERIES_INSTANCES, STORAGE, TOPICS, consumed_topics

if TYPE_CHECKING:
    from faust.web import Request, Response, View

    from core.settings import Settings
    from streams.app import DicomflowApp
    from streams.metrics import Metrics

__all__ = ["register", "LiveSource", "DeadLetterTail", "CounterRing", "stage_totals"]

log = logging.getLogger(__name__)

#: The ring: one sample every RING_STEP_S over RING_SPAN_S (181 samples of a few numbers each).
RING_STEP_S = 5.0
RING_SPAN_S = 15 * 60.0
#: How often the timer samples (the ring, and the series flush watch behind the alert gauges).
SAMPLE_S = 1.0
#: Broker reads (offsets, new dead letters) are shared by every viewer for this long.
CACHE_S = 2.0
#: A broker that does not answer must not hold the page: it shows the last known figures instead.
BROKER_TIMEOUT_S = 8.0
#: Dead letters read per partition per refresh: a huge topic is counted over several refreshes.
LETTER_CHUNK = 5000
LAST_LETTERS = 10
#: Metrics of the JSON generator (another stage); shown when this worker exports them.
JSON_STALE_SERIES = "dicomflow_json_stale_series"
JSON_OLDEST_STALE = "dicomflow_json_oldest_stale_seconds"


def stage_totals(metrics: Metrics) -> tuple[dict[str, float], dict[str, float]]:
    """(events per stage so far, other gauges by metric name) from the registry ``/metrics`` serves.

    Stages: ``ingest`` and ``series`` count the records their agents received (Faust's sensor);
    each sink counts the rows it wrote.
    """
    received: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for family in metrics.registry.collect():
        if family.name == "dicomflow_faust_messages_received_per_topic":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    received[sample.labels.get("topic", "")] = sample.value
        elif family.name in (JSON_STALE_SERIES, JSON_OLDEST_STALE):
            values = [s.value for s in family.samples if not s.name.endswith("_created")]
            if values:
                gauges[family.name] = max(values) if family.name == JSON_OLDEST_STALE else sum(values)
    totals = {"ingest": received.get(STORAGE, 0.0), "series": received.get(SERIES_INSTANCES, 0.0)}
    for name, counters in sorted(metrics.stages.items()):
        if "batches" in counters:
            totals[f"sink {name}"] = float(counters.get("rows", 0))
    return totals, gauges


class CounterRing:
    """Cumulative stage totals sampled every :data:`RING_STEP_S`; rates are differences."""

    def __init__(self, step_s: float = RING_STEP_S, span_s: float = RING_SPAN_S) -> None:
        self.step_s = step_s
        self.span_s = span_s
        self.samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=int(span_s / step_s) + 1)

    def add(self, now: float, totals: dict[str, float]) -> bool:
        """Keep ``totals`` if a step has passed since the last kept sample."""
        if self.samples and now - self.samples[-1][0] < self.step_s:
            return False
        self.samples.append((now, dict(totals)))
        return True

    def rates(self, now: float) -> dict[str, list[tuple[float, float]]]:
        """Per stage: (seconds before ``now``, events per second over the step ending then)."""
        out: dict[str, list[tuple[float, float]]] = {}
        pairs = list(zip(list(self.samples)[:-1], list(self.samples)[1:], strict=True))
        for (t0, a), (t1, b) in pairs:
            if t1 <= t0:
                continue
            for stage, value in b.items():
                # A counter that went down (the sink was rebuilt) restarts from zero.
                delta = value - a.get(stage, 0.0)
                out.setdefault(stage, []).append((now - t1, max(0.0, delta if delta >= 0 else value) / (t1 - t0)))
        return out


@dataclass
class DeadLetterTail:
    """Dead letters by code and the most recent ones, read incrementally from the dead-letter topics."""

    topics: tuple[str, ...]
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    recent: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.positions.clear()
        self.counts.clear()
        self.recent.clear()

    async def advance(self, bootstrap: str, ends: dict[TopicPartition, int]) -> bool:
        """Read what is new up to ``ends``; True when every partition is counted to its end."""
        mine = {tp: end for tp, end in ends.items() if tp.topic in self.topics}
        if any(end < self.positions.get(tp, 0) for tp, end in mine.items()):
            self.reset()  # a reset broker starts its offsets again: count from scratch
        unknown = [tp for tp in mine if tp not in self.positions]
        if unknown:
            self.positions.update(await beginning_offsets(bootstrap, unknown))
        complete = True
        for tp, end in sorted(mine.items(), key=lambda i: (i[0].topic, i[0].partition)):
            start = self.positions[tp]
            if start >= end:
                continue
            stop = min(end, start + LETTER_CHUNK)
            for record in await read_range(bootstrap, tp.topic, tp.partition, start, stop):
                self._take(record.topic, record.partition, record.offset, record.value, record.timestamp)
            self.positions[tp] = stop
            complete = complete and stop >= end
        for topic in self.topics:
            self.counts.setdefault(topic, Counter())
        return complete

    def _take(self, topic: str, partition: int, offset: int, value: bytes, timestamp: float) -> None:
        # Codes are counted exactly as `dicomflow status` counts them (streams.broker.count_codes).
        try:
            letter = orjson.loads(value or b"{}")
            code = str(letter.get("error", {}).get("code", "UNKNOWN"))
        except (orjson.JSONDecodeError, AttributeError):
            letter, code = {}, "UNDECODABLE"
        self.counts.setdefault(topic, Counter())[code] += 1
        error = letter.get("error") if isinstance(letter.get("error"), dict) else {}
        original = letter.get("original") if isinstance(letter.get("original"), dict) else {}
        self.recent.append({
            "topic": topic, "partition": partition, "offset": offset, "timestamp": timestamp,
            "time": letter.get("time"), "code": code, "field": error.get("field"), "message": error.get("message"),
            "stage": letter.get("stage"), "tenant": original.get("tenant_id"), "trace_id": original.get("trace_id"),
            "file_path": original.get("file_path"),
        })
        self.recent.sort(key=lambda r: (r["timestamp"], r["topic"], r["partition"], r["offset"]))
        del self.recent[:-LAST_LETTERS]


class LiveSource:
    """Everything the page shows, gathered on demand and cached for :data:`CACHE_S`."""

    def __init__(self, app: DicomflowApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.ring = CounterRing()
        self.letters = DeadLetterTail(tuple(t.name for t in TOPICS if t.dead_letters))
        self.started = time.time()
        self._cache: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self._lag: dict[str, Any] = {"topics": {}, "total_lag": 0}
        self._letters_complete = False

    async def sample(self) -> None:
        """The 1 s timer: the series flush watch (alert gauges) and, every step, the ring."""
        now = time.time()
        self.app.metrics.observe(now)
        if not self.ring.samples or now - self.ring.samples[-1][0] >= self.ring.step_s:
            totals, _ = stage_totals(self.app.metrics)
            self.ring.add(now, totals)

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            now = time.time()
            if self._cache is not None and now - self._cache[0] < CACHE_S:
                return self._cache[1]
            broker_error = None
            try:
                await asyncio.wait_for(self._refresh_broker(), BROKER_TIMEOUT_S)
            except TimeoutError:
                broker_error = f"no answer within {BROKER_TIMEOUT_S:g} s"
                log.warning("live page: broker read failed: %s", broker_error)
            except Exception as exc:  # the page must show what it has, never take the worker down
                broker_error = f"{type(exc).__name__}: {exc}"
                log.warning("live page: broker read failed: %s", broker_error)
            data = self._assemble(time.time(), broker_error)
            self._cache = (now, data)
            return data

    async def _refresh_broker(self) -> None:
        # The same reads as dicomflow/status.py (collect_status), so the two agree.
        bootstrap = self.app.bootstrap
        consumed = consumed_topics(self.settings.doris_enabled)
        ends = await end_offsets(bootstrap, [*consumed_topics(True), *self.letters.topics])
        group = self.settings.app_id
        committed = await committed_offsets(bootstrap, group, [tp for tp in ends if tp.topic in consumed])
        topics: dict[str, list[dict[str, Any]]] = {}
        total = 0
        for tp in sorted(ends, key=lambda t: (t.topic, t.partition)):
            entry: dict[str, Any] = {"partition": tp.partition, "end_offset": ends[tp]}
            if tp.topic in consumed:
                entry["committed_offset"] = committed.get(tp)
                entry["lag"] = max(0, ends[tp] - committed.get(tp, 0))
                total += entry["lag"]
            topics.setdefault(tp.topic, []).append(entry)
        self._lag = {"topics": topics, "total_lag": total}
        self._letters_complete = await self.letters.advance(bootstrap, ends)

    def _assemble(self, now: float, broker_error: str | None) -> dict[str, Any]:
        metrics = self.app.metrics
        totals, gauges = stage_totals(metrics)
        rates = self.ring.rates(now)
        sinks: dict[str, dict[str, float]] = {}
        for name, counters in sorted(metrics.stages.items()):
            if "batches" in counters:
                entry = {k: float(v) for k, v in counters.items()}
                entry["latency_seconds"] = entry.pop("latency_s_total", 0.0)
                sinks[name] = entry
        window = metrics.stages.get("series_window", {})
        watch = metrics.flush_watch
        return {
            "generated_at": now,
            "worker": self.settings.worker_id,
            "group": self.settings.app_id,
            "broker": self.settings.broker_url,
            "broker_error": broker_error,
            "topics": self._lag["topics"],
            "total_lag": self._lag["total_lag"],
            "rates": {"step_s": self.ring.step_s, "span_s": self.ring.span_s,
                      "stages": {s: [[round(ago, 1), round(r, 3)] for ago, r in points] for s, points in rates.items()},
                      "totals": totals},
            "dead_letters": {t: dict(sorted(c.items())) for t, c in self.letters.counts.items()},
            "dead_letters_complete": self._letters_complete,
            "last_dead_letters": list(reversed(self.letters.recent)),
            "sinks": sinks,
            "series": {"windows_open": float(window.get("windows_unsettled", 0)),
                       "flushes": float(window.get("flushes", 0)), "instances": float(window.get("instances", 0)),
                       "window_seconds": metrics.series_window_s,
                       "last_flush_age_seconds": round(now - watch.last_flush, 1),
                       "flush_wait_seconds": round(watch.wait_s(now), 1)},
            "json": {"stale_series": gauges.get(JSON_STALE_SERIES),
                     "oldest_stale_seconds": gauges.get(JSON_OLDEST_STALE)},
        }


def register(app: DicomflowApp, settings: Settings) -> None:
    source = LiveSource(app, settings)
    app.timer(SAMPLE_S, name="live_sample")(source.sample)
    headers = {"Cache-Control": "no-store"}

    # Registered when the app is built, before Faust's web server applies its blueprints, so
    # this view answers "/" ahead of Faust's production index ({"status": "OK"}) mounted there too.
    @app.page("/", name="live_page")
    async def page(view: View, request: Request) -> Response:
        return view.html(render_page(await source.snapshot()), headers=dict(headers))

    @app.page("/live.html", name="live_body")
    async def body(view: View, request: Request) -> Response:
        return view.html(render_body(await source.snapshot()), headers=dict(headers))

    @app.page("/live.json", name="live_json")
    async def data(view: View, request: Request) -> Response:
        return view.bytes(orjson.dumps(await source.snapshot()), content_type="application/json",
                          headers=dict(headers))
