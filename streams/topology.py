"""The topology: the one list of dicomflow's topics, and what flows on each.

Everything that needs a topic list reads it from here: topic creation, the Faust topic
objects (streams/topics.py), the ingest fan-out's routing, the Doris sink stages, the
lag gauge and ``dicomflow status``. Internal topics are declared here.

The output topics come from the records themselves (``schemas.records.OUTPUT_RECORDS``:
each declares its topic and Doris table kind), so a new output is declared once, with its
record. Plain data, no Faust import, so feeders and ``dicomflow status`` stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.records import OUTPUT_RECORDS, DicomImageMeta, DicomObjectMeta, DicomStateMeta, Route

__all__ = ["TopicSpec", "TOPICS", "ALL_TOPICS", "BY_NAME", "DORIS_OUTPUTS", "consumed_topics",
           "STORAGE", "STATE", "IMAGE", "LOG", "DLQ", "SERIES_INSTANCES", "SINK_DLQ", "DORIS_INTENTS",
           "INCARNATION"]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic: its name, what its key and value are, and who reads it."""

    name: str
    #: What the message key is (the series key keeps one series in one partition).
    key: str
    #: The record a value holds (a ``schemas.records`` class name, or an envelope's name).
    value: str
    #: Read by the app's consumer group (so its lag is meaningful).
    consumed: bool = False
    #: Read only when the Doris sink is on.
    consumed_by_doris: bool = False
    #: Doris table kind loaded from this topic (``settings.doris_tables[kind]``), if any.
    doris_kind: str | None = None
    #: Transfer-log rows may repeat after an ingest replay: de-duplicate by trace id.
    dedup_trace: bool = False
    #: A dead-letter topic (``status`` counts its letters by error code).
    dead_letters: bool = False
    why: str = ""


STORAGE = "storage_queue"
SERIES_INSTANCES = "dicomflow_series_instances"
STATE = DicomStateMeta.ROUTE.topic
IMAGE = DicomImageMeta.ROUTE.topic
LOG = DicomObjectMeta.ROUTE.topic
DLQ = "storage_queue_dlq"
SINK_DLQ = "dicomflow_sink_dlq"
DORIS_INTENTS = "dicomflow_doris_intents"
INCARNATION = "dicomflow_incarnation"


def _output(record: Any) -> TopicSpec:
    """An output topic, as its record declares it (schemas/records.py)."""
    route: Route = record.ROUTE
    return TopicSpec(route.topic, "series key" if route.per_series else "series key (trace id for failures)",
                     record.__name__, consumed=route.per_series, consumed_by_doris=not route.per_series,
                     doris_kind=route.doris_kind, dedup_trace=route.dedup_trace,
                     why=(record.__doc__ or "").strip().splitlines()[0])


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(STORAGE, "series key (or none)", "StorageEvent", consumed=True,
              why="storage events from the feeders: the pipeline's input"),
    TopicSpec(SERIES_INSTANCES, "series key", "series instance", consumed=True,
              why="internal: per-instance DicomStateMeta from ingest to the series window"),
    *(_output(record) for record in OUTPUT_RECORDS),
    TopicSpec(DLQ, "event key", "dead letter", dead_letters=True,
              why="storage events the pipeline refused, with the reason"),
    TopicSpec(SINK_DLQ, "series key", "dead letter", dead_letters=True,
              why="rows PostgreSQL or Doris refused as data"),
    TopicSpec(DORIS_INTENTS, "table:partition", "offset ranges",
              why="each Doris batch's offset range, written before the load, so a restarted sink "
                  "rebuilds the same batches and labels; written to the partition it describes"),
    TopicSpec(INCARNATION, "the id", "incarnation id",
              why="the broker's incarnation id (first record of partition 0), part of every Doris label: "
                  "a reset broker counts offsets from 0 again under a new id (streams/incarnation.py)"),
)

BY_NAME: dict[str, TopicSpec] = {t.name: t for t in TOPICS}
ALL_TOPICS: tuple[str, ...] = tuple(t.name for t in TOPICS)
#: The topics the Doris sink loads, one stage each.
DORIS_OUTPUTS: tuple[TopicSpec, ...] = tuple(t for t in TOPICS if t.doris_kind is not None)


def consumed_topics(doris: bool) -> tuple[str, ...]:
    """The topics the app's consumer group reads, with or without the Doris sink."""
    return tuple(t.name for t in TOPICS if t.consumed or (doris and t.consumed_by_doris))
