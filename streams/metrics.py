"""Prometheus metrics of the worker, served at ``/metrics`` on its web port.

Faust's own sensor provides events in/out per topic, commit latency and the end and
committed offsets; it has no lag gauge and knows nothing of dicomflow, so this module
adds dead letters by code, sink counters (batches, rows, rejected rows, retries,
latency), series-window flushes, and ``dicomflow_consumer_lag`` (end offset minus the
group's committed offset, refreshed by a timer).

For the alert rules (ops/prometheus/alerts.yml) it also exports the series window as
gauges: windows open, the configured window, when a window last flushed and how long
instances have waited in open windows without a flush (:class:`FlushWatch`, observed by a
1 s timer of agents/live_page.py and at every scrape). An alert on counters alone cannot
say "no flush for 3 windows": a 5 s window is shorter than most scrape intervals.

Stages publish their plain counter dicts with :func:`register_counters`; they are
read at scrape time, so sinks stay free of any metrics dependency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics", "FlushWatch", "setup_metrics"]

log = logging.getLogger(__name__)


class _StageCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        sink_series = {
            "batches": ("dicomflow_sink_batches_total", "Batches written by a sink"),
            "rows": ("dicomflow_sink_rows_total", "Rows written by a sink"),
            "rejected": ("dicomflow_sink_rejected_total", "Rows a sink dead-lettered as bad data"),
            "retries": ("dicomflow_sink_retries_total", "Transient write failures retried by a sink"),
            "latency_s_total": ("dicomflow_sink_latency_seconds_total", "Time spent writing batches"),
        }
        families = {k: CounterMetricFamily(n, h, labels=["sink"]) for k, (n, h) in sink_series.items()}
        extra = CounterMetricFamily("dicomflow_stage_events_total", "Stage-specific counters", labels=["stage", "what"])
        for name, counters in sorted(self.metrics.stages.items()):
            for key, value in counters.items():
                if key in families:
                    families[key].add_metric([name], float(value))
                else:
                    extra.add_metric([name, key], float(value))
        yield from families.values()
        yield extra
        lag = GaugeMetricFamily("dicomflow_consumer_lag", "End offset minus committed offset of the app's group",
                                labels=["topic", "partition"])
        for (topic, partition), value in sorted(self.metrics.lag.items()):
            lag.add_metric([topic, str(partition)], float(value))
        yield lag
        yield from self.metrics.series_gauges(time.time())


class FlushWatch:
    """When the series window last flushed, and since when instances wait in open windows
    without a flush (None: nothing waits). Fed with the stage's counters by :meth:`observe`.

    Under steady traffic a flush comes about one window after the previous one, so the wait
    stays near one window; it grows without bound only when flushes stop while windows hold
    instances. An idle hour followed by one instance starts the wait at that instance.
    """

    def __init__(self, now: float) -> None:
        #: Process start until the first flush: "no flush since start" counts from there.
        self.last_flush = now
        self.waiting_since: float | None = None
        self._flushes: float | None = None

    def observe(self, flushes: float, windows_open: float, now: float) -> None:
        flushed = self._flushes is not None and flushes != self._flushes
        self._flushes = flushes
        if flushed:
            self.last_flush = now
            self.waiting_since = now if windows_open > 0 else None
        elif windows_open <= 0:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now

    def wait_s(self, now: float) -> float:
        return 0.0 if self.waiting_since is None else max(0.0, now - self.waiting_since)


class Metrics:
    """dicomflow's metrics; created with the app, registered once."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, *, series_window_s: float | None = None) -> None:
        #: The registry ``/metrics`` serves (Faust's sensor and this collector), for in-process readers
        #: such as the live page.
        self.registry = registry
        self.series_window_s = series_window_s
        self.flush_watch = FlushWatch(time.time())
        self.stages: dict[str, Mapping[str, float]] = {}
        self.lag: dict[tuple[str, int], int] = {}
        self.dead_letters = Counter("dicomflow_dead_letters_total", "Dead letters by stage and error code",
                                    ["stage", "code"], registry=registry)
        # --- series JSON (issue #16): names the operators' page and dashboards rely on ---
        self.json_documents = Counter("dicomflow_json_documents", "Series JSON documents generated, by result",
                                      ["result"], registry=registry)
        for result in ("ok", "failed"):
            self.json_documents.labels(result)
        self.json_bytes = Counter("dicomflow_json_bytes", "Bytes of series JSON documents written", registry=registry)
        self.json_stale_series = Gauge("dicomflow_json_stale_series",
                                       "Series whose JSON is missing or older than their state (this worker's)",
                                       registry=registry)
        self.json_oldest_stale_seconds = Gauge("dicomflow_json_oldest_stale_seconds",
                                               "Age of the oldest state not yet covered by its series JSON",
                                               registry=registry)
        self.json_generation_seconds = Histogram("dicomflow_json_generation_seconds",
                                                 "Time to generate and write one series JSON document",
                                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                                 registry=registry)
        # --- end series JSON ---
        registry.register(_StageCollector(self))

    def register_counters(self, name: str, counters: Mapping[str, float]) -> None:
        self.stages[name] = counters

    def observe(self, now: float) -> None:
        """Feed :class:`FlushWatch` from the series stage's counters (a timer calls this every second)."""
        window = self.stages.get("series_window")
        if window is not None:
            self.flush_watch.observe(float(window.get("flushes", 0)), float(window.get("windows_unsettled", 0)), now)

    def series_gauges(self, now: float) -> Iterator[Any]:
        window = self.stages.get("series_window")
        if window is None:
            return
        self.observe(now)
        gauges: list[tuple[str, str, float]] = [
            ("dicomflow_series_windows_open", "Series windows holding instances not flushed yet (plus one while "
             "the worker rebalances)", float(window.get("windows_unsettled", 0))),
            ("dicomflow_series_last_flush_timestamp_seconds", "Unix time of the last series-window flush "
             "(process start until the first)", self.flush_watch.last_flush),
            ("dicomflow_series_flush_wait_seconds", "How long instances have waited in open windows without any "
             "flush (0: none waiting)", self.flush_watch.wait_s(now)),
        ]
        if self.series_window_s is not None:
            gauges.append(("dicomflow_series_window_seconds", "The series window (DICOMFLOW_SERIES_WINDOW_SECONDS)",
                           float(self.series_window_s)))
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


def setup_metrics(app: Any) -> Metrics:
    """Faust's Prometheus sensor at ``/metrics`` plus dicomflow's collector, in a registry of
    this app's own (an app is a value now: two apps in one process must not collide)."""
    from faust.sensors.prometheus import setup_prometheus_sensors

    registry = CollectorRegistry()
    setup_prometheus_sensors(app, pattern="/metrics", registry=registry, name_prefix="dicomflow_faust")
    settings = getattr(app, "settings", None)
    return Metrics(registry, series_window_s=getattr(settings, "series_window_seconds", None))
