"""PostgreSQL sink stage: dicom_state_queue -> dicom_state_meta (the series index).

Runs when DICOMFLOW_POSTGRES_DSN is set (``dicomflow up`` sets it to the embedded
server). Upserts are idempotent and newest-wins, so replays and duplicates from the
series stage are harmless.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from faust.types import StreamT

from agents.sink_support import batches, serve_sink, sink_batch
from schemas import codec
from schemas.records import DicomStateMeta
from sinks.postgres import PostgresSink

if TYPE_CHECKING:
    from core.settings import Settings
    from streams.app import DicomflowApp

__all__ = ["register"]

log = logging.getLogger(__name__)

BATCH = 500
BATCH_WITHIN_S = 0.5


def _decode(raw: bytes) -> DicomStateMeta:
    return codec.from_row(DicomStateMeta, orjson.loads(raw))


def register(app: DicomflowApp, settings: Settings) -> None:
    """The ``postgres_sink`` agent on the state topic, if a DSN is configured."""
    if settings.postgres_dsn is None:
        log.warning("DICOMFLOW_POSTGRES_DSN is not set: the PostgreSQL sink is off")
        return
    sink = PostgresSink(settings.postgres_dsn)

    async def postgres_sink(stream: StreamT[Any]) -> None:
        async for events in batches(stream, BATCH, BATCH_WITHIN_S):
            await sink_batch(app, sink, events, _decode, stage="postgres")

    app.agent(app.queues.state, name="postgres_sink")(postgres_sink)
    serve_sink(app, sink, "postgres")
