"""Topic names and the broker profile: shared by the Faust app, the feeders and the tools.

Plain data, no Faust import, so feeders and `dicomflow status` stay light.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["STORAGE", "STATE", "IMAGE", "LOG", "DLQ", "SERIES_INSTANCES", "SINK_DLQ", "DORIS_INTENTS", "ALL_TOPICS",
           "BrokerProfile", "EMBEDDED_PROFILE", "PRODUCTION_PROFILE"]

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


@dataclass(frozen=True)
class BrokerProfile:
    """Client settings that depend on the broker implementation.

    The embedded Tansu broker needs two measured workarounds
    (../shared/reference/faust-pitfalls.md): group joins take half the session
    timeout, so the session timeout is short; and its end offset is wrong after a
    multi-record produce batch, which silently truncates table recovery, so every
    produce batch carries one record.
    """

    session_timeout_s: float
    heartbeat_interval_s: float
    producer_max_batch_size: int
    producer_linger_s: float
    #: How long the worker's consumer lets the broker hold an empty fetch (Faust: 1.5 s).
    consumer_fetch_max_wait_s: float = 1.5


# Tansu holds an empty fetch for the whole wait even when data arrives: keep it short. Shorter
# than 0.5 s measured slower ingest (smaller batches downstream on the same event loop).
EMBEDDED_PROFILE = BrokerProfile(session_timeout_s=6.0, heartbeat_interval_s=1.0,
                                 producer_max_batch_size=1, producer_linger_s=0.0,
                                 consumer_fetch_max_wait_s=0.5)
PRODUCTION_PROFILE = BrokerProfile(session_timeout_s=30.0, heartbeat_interval_s=3.0,
                                   producer_max_batch_size=16384, producer_linger_s=0.005)
