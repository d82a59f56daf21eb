"""Prometheus metrics of the worker, served at ``/metrics`` on its web port.

Faust's own sensor provides events in/out per topic, commit latency and the end and
committed offsets; it has no lag gauge and knows nothing of dicomflow, so this module
adds dead letters by code, sink counters (batches, rows, rejected rows, retries,
latency), series-window flushes, and ``dicomflow_consumer_lag`` (end offset minus the
group's committed offset, refreshed by a timer).

Stages publish their plain counter dicts with :func:`register_counters`; they are
read at scrape time, so sinks stay free of any metrics dependency.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics", "setup_metrics"]

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


class Metrics:
    """dicomflow's metrics; created with the app, registered once."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.stages: dict[str, Mapping[str, float]] = {}
        self.lag: dict[tuple[str, int], int] = {}
        self.dead_letters = Counter("dicomflow_dead_letters_total", "Dead letters by stage and error code",
                                    ["stage", "code"], registry=registry)
        registry.register(_StageCollector(self))

    def register_counters(self, name: str, counters: Mapping[str, float]) -> None:
        self.stages[name] = counters


def setup_metrics(app: Any) -> Metrics:
    """Faust's Prometheus sensor at ``/metrics`` plus dicomflow's collector, in a registry of
    this app's own (an app is a value now: two apps in one process must not collide)."""
    from faust.sensors.prometheus import setup_prometheus_sensors

    registry = CollectorRegistry()
    setup_prometheus_sensors(app, pattern="/metrics", registry=registry, name_prefix="dicomflow_faust")
    return Metrics(registry)
