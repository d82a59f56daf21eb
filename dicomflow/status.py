"""``dicomflow status``: what a data engineer checks first.

Per topic and partition: end offset, the app's committed offset and the lag
(aiokafka admin client); dead letters by error code; and the stack's addresses.
Note: on the embedded Tansu broker end offsets can be off after multi-record batches
(faust-pitfalls §4.1); dicomflow's own producers send one record per batch there.
"""

from __future__ import annotations

from typing import Any

from streams.broker import bootstrap_of, committed_offsets, count_codes, end_offsets
from streams.topology import TOPICS, consumed_topics

__all__ = ["collect_status", "sink_counters"]


async def collect_status(broker_url: str, group: str, *, doris: bool) -> dict[str, Any]:
    bootstrap = bootstrap_of(broker_url)
    consumed = consumed_topics(doris)
    letters = [t.name for t in TOPICS if t.dead_letters]
    ends = await end_offsets(bootstrap, [*consumed_topics(True), *letters])
    committed = await committed_offsets(bootstrap, group, [tp for tp in ends if tp.topic in consumed])
    topics: dict[str, list[dict[str, Any]]] = {}
    total_lag = 0
    for tp in sorted(ends, key=lambda t: (t.topic, t.partition)):
        end = ends[tp]
        entry: dict[str, Any] = {"partition": tp.partition, "end_offset": end}
        if tp.topic in consumed:
            entry["committed_offset"] = committed.get(tp)
            entry["lag"] = max(0, end - committed.get(tp, 0))
            total_lag += entry["lag"]
        topics.setdefault(tp.topic, []).append(entry)
    return {
        "broker": broker_url,
        "group": group,
        "topics": topics,
        "total_lag": total_lag,
        "dead_letters": {name: await count_codes(bootstrap, name) for name in letters},
    }


def sink_counters(metrics_urls: list[str], timeout: float = 3.0) -> dict[str, Any]:
    """Sink and stage counters scraped from the workers' /metrics (summed over workers).

    Counters live in the worker processes; ``status`` runs elsewhere, so it reads what
    Prometheus would. Unreachable workers are listed under ``unreachable``.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    sinks: dict[str, dict[str, float]] = {}
    unreachable: list[str] = []
    for url in metrics_urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
                text = resp.read().decode()
        except OSError:
            unreachable.append(url)
            continue
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("dicomflow_sink_"):
                continue
            what = family.name.removeprefix("dicomflow_sink_")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                entry = sinks.setdefault(sample.labels.get("sink", "?"), {})
                entry[what] = entry.get(what, 0.0) + sample.value
    return {"sinks": sinks, "unreachable": unreachable}
