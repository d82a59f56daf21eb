"""Topic declarations. Values and keys are raw bytes: the codecs are orjson, applied by
the stages themselves, so that a message that is not even JSON reaches the ingest
agent (and its dead-letter path) instead of crashing Faust's deserializer."""

from __future__ import annotations

from faust.types import TopicT

from streams import topology
from streams.app import app, settings

__all__ = ["storage", "state", "image", "log", "dlq", "series_instances", "sink_dlq", "doris_intents", "BY_NAME"]


def _topic(name: str) -> TopicT:
    return app.topic(name, partitions=settings.partitions, key_type=bytes, value_type=bytes,
                     key_serializer="raw", value_serializer="raw")


storage = _topic(topology.STORAGE)
state = _topic(topology.STATE)
image = _topic(topology.IMAGE)
log = _topic(topology.LOG)
dlq = _topic(topology.DLQ)
series_instances = _topic(topology.SERIES_INSTANCES)
sink_dlq = _topic(topology.SINK_DLQ)
doris_intents = _topic(topology.DORIS_INTENTS)

#: Topic objects by name, for stages whose outputs are computed as (topic name, key, value).
BY_NAME: dict[str, TopicT] = {t.get_topic_name(): t for t in
                              (storage, state, image, log, dlq, series_instances, sink_dlq,
                               doris_intents)}
