"""Topic names and the broker profile: shared by the Faust app, the feeders and the tools.

Plain data, no Faust import, so feeders and `dicomflow status` stay light.
"""

from __future__ import annotations

__all__ = ["STORAGE", "STATE", "IMAGE", "LOG", "DLQ", "SERIES_INSTANCES", "SINK_DLQ", "DORIS_INTENTS", "ALL_TOPICS"]

STORAGE = "storage_queue"
STATE = "dicom_state_queue"
IMAGE = "dicom_image_queue"
LOG = "log_queue"
DLQ = "storage_queue_dlq"
#: Internal: per-instance DicomStateMeta from ingest to the series window, keyed by series.
SERIES_INSTANCES = "dicomflow_series_instances"
#: Dead letters of the sinks: rows PostgreSQL or Doris refused as data.
SINK_DLQ = "dicomflow_sink_dlq"

#: Durable record of each Doris batch's offset range, written before the load, so that a
#: restarted sink rebuilds exactly the same batches (and labels). Keyed ``table:partition``
#: and written to the partition of the source it describes.
DORIS_INTENTS = "dicomflow_doris_intents"

ALL_TOPICS = (STORAGE, STATE, IMAGE, LOG, DLQ, SERIES_INSTANCES, SINK_DLQ, DORIS_INTENTS)


