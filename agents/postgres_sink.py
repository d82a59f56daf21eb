"""PostgreSQL sink stage: dicom_state_queue -> dicom_state_meta (the series index).

Runs when DICOMFLOW_POSTGRES_DSN is set (``dicomflow up`` sets it to the embedded
server). Upserts are idempotent and newest-wins, so replays and duplicates from the
series stage are harmless.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from faust.types import StreamT

from agents.sink_support import batches, sink_batch
from schemas import codec
from schemas.records import DicomStateMeta
from sinks.postgres import PostgresSink
from streams.app import app, settings
from streams.topics import state

log = logging.getLogger(__name__)

BATCH = 500
BATCH_WITHIN_S = 0.5


def _decode(raw: bytes) -> DicomStateMeta:
    return codec.from_row(DicomStateMeta, orjson.loads(raw))


if settings.postgres_dsn is not None:
    postgres = PostgresSink(settings.postgres_dsn)

    @app.agent(state, name="postgres_sink")
    async def postgres_sink(stream: StreamT[Any]) -> None:
        async for events in batches(stream, BATCH, BATCH_WITHIN_S):
            await sink_batch(postgres, events, _decode, stage="postgres")

    app.close_on_shutdown(postgres.stop)
    app.metrics.register_counters("postgres", postgres.counters)
else:
    log.warning("DICOMFLOW_POSTGRES_DSN is not set: the PostgreSQL sink is off")
