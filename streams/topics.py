"""The Faust topic objects of one app, made from the topology's single list.

Values and keys are raw bytes: the codecs are orjson, applied by the stages themselves,
so that a message that is not even JSON reaches the ingest agent (and its dead-letter
path) instead of crashing Faust's deserializer.
"""

from __future__ import annotations

from typing import Any

from faust.types import TopicT

from streams import topology

__all__ = ["Topics"]


class Topics:
    """Every topic of :data:`streams.topology.TOPICS`, by attribute and by name."""

    storage: TopicT
    state: TopicT
    image: TopicT
    log: TopicT
    dlq: TopicT
    series_instances: TopicT
    sink_dlq: TopicT
    doris_intents: TopicT

    def __init__(self, app: Any, partitions: int) -> None:
        self.by_name: dict[str, TopicT] = {
            spec.name: app.topic(spec.name, partitions=partitions, key_type=bytes, value_type=bytes,
                                 key_serializer="raw", value_serializer="raw")
            for spec in topology.TOPICS}
        self.storage = self.by_name[topology.STORAGE]
        self.state = self.by_name[topology.STATE]
        self.image = self.by_name[topology.IMAGE]
        self.log = self.by_name[topology.LOG]
        self.dlq = self.by_name[topology.DLQ]
        self.series_instances = self.by_name[topology.SERIES_INSTANCES]
        self.sink_dlq = self.by_name[topology.SINK_DLQ]
        self.doris_intents = self.by_name[topology.DORIS_INTENTS]
