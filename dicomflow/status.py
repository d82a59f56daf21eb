"""``dicomflow status``: what a data engineer checks first.

Per topic and partition: end offset, the app's committed offset and the lag
(aiokafka admin client); dead letters by error code; and the stack's addresses.
Note: on the embedded Tansu broker end offsets can be off after multi-record batches
(faust-pitfalls §4.1); dicomflow's own producers send one record per batch there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from streams.broker import bootstrap_of, committed_offsets, count_codes, end_offsets
from streams.topology import TOPICS, consumed_topics

__all__ = ["collect_status", "sink_counters", "health", "judge_health"]


async def collect_status(broker_url: str, group: str, *, doris: bool, dead_letters: bool = True) -> dict[str, Any]:
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
        # Counting reads whole topics: a health check (``--health``) leaves it out.
        "dead_letters": {name: await count_codes(bootstrap, name) for name in letters} if dead_letters else {},
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
    # Series JSON (#16): series whose JSON is older than their state, summed over workers; the oldest.
    json_stale: dict[str, float] = {"stale_series": 0.0, "oldest_stale_seconds": 0.0}
    for url in metrics_urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
                text = resp.read().decode()
        except OSError:
            unreachable.append(url)
            continue
        for family in text_string_to_metric_families(text):
            if family.name in ("dicomflow_json_stale_series", "dicomflow_json_oldest_stale_seconds"):
                what = family.name.removeprefix("dicomflow_json_")
                for sample in family.samples:
                    json_stale[what] = (json_stale[what] + sample.value if what == "stale_series"
                                        else max(json_stale[what], sample.value))
                continue
            if not family.name.startswith("dicomflow_sink_"):
                continue
            what = family.name.removeprefix("dicomflow_sink_")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                entry = sinks.setdefault(sample.labels.get("sink", "?"), {})
                entry[what] = entry.get(what, 0.0) + sample.value
    return {"sinks": sinks, "unreachable": unreachable, "json": json_stale}


# -- health (``status --health``, #18 item 6) --
# A stage is stuck when its lag has not moved for N minutes, a sink failing when it retried
# and wrote no batch over those minutes. One `status` run sees one moment, so each run
# appends what it saw to a small history file and judges against the newest observation at
# least N minutes old (a health check running every minute keeps it fed).

#: Observations kept in the history file at most (a check every 10 s for 80 minutes).
HISTORY_MAX = 500


def _observation(report: dict[str, Any], now: float) -> dict[str, Any]:
    committed: dict[str, int | None] = {}
    lag: dict[str, int] = {}
    for topic, parts in report.get("topics", {}).items():
        for p in parts:
            if "lag" in p:
                key = f"{topic}/{p['partition']}"
                committed[key] = p.get("committed_offset")
                lag[key] = int(p["lag"])
    sinks = {name: {"batches": float(v.get("batches", 0.0)), "retries": float(v.get("retries", 0.0))}
             for name, v in report.get("sinks", {}).items()}
    return {"t": now, "committed": committed, "lag": lag, "sinks": sinks}


def judge_health(current: dict[str, Any], history: list[dict[str, Any]], stuck_s: float) -> dict[str, Any]:
    """Stuck partitions and failing sinks, from ``current`` and the newest observation of
    ``history`` at least ``stuck_s`` older (none yet: nothing can be judged, healthy)."""
    base = next((o for o in reversed(history) if o["t"] <= current["t"] - stuck_s), None)
    if base is None:
        return {"ok": True, "judged_over_s": None, "stuck": [], "failing_sinks": []}
    stuck = [{"topic": key.rsplit("/", 1)[0], "partition": int(key.rsplit("/", 1)[1]), "lag": lag,
              "committed_offset": current["committed"].get(key)}
             for key, lag in sorted(current["lag"].items())
             if lag > 0 and base["lag"].get(key, 0) > 0 and key in base["committed"]
             and base["committed"][key] == current["committed"].get(key)]
    failing = [name for name, now in sorted(current["sinks"].items())
               if (then := base["sinks"].get(name)) is not None
               and now["retries"] > then["retries"] and now["batches"] <= then["batches"]]
    return {"ok": not stuck and not failing, "judged_over_s": round(current["t"] - base["t"], 1),
            "stuck": stuck, "failing_sinks": failing}


def health(report: dict[str, Any], history_file: Path, stuck_s: float, now: float | None = None) -> dict[str, Any]:
    """Judge ``report`` against the history in ``history_file``, then record it there."""
    current = _observation(report, time.time() if now is None else now)
    try:
        history = [o for o in json.loads(history_file.read_text()) if isinstance(o, dict) and "t" in o]
    except (OSError, ValueError, TypeError):
        history = []
    verdict = judge_health(current, history, stuck_s)
    # Keep what a later judgement may need: everything younger than two windows, and the
    # newest observation older than that (the baseline of a check that comes late).
    horizon = current["t"] - 2 * stuck_s
    older = [o for o in history if o["t"] < horizon][-1:]
    kept = (older + [o for o in history if o["t"] >= horizon] + [current])[-HISTORY_MAX:]
    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = history_file.with_name(f".{history_file.name}.tmp")
        tmp.write_text(json.dumps(kept))
        tmp.replace(history_file)
    except OSError:
        verdict["history_not_saved"] = str(history_file)
    return verdict
# -- end health --
