"""Ingest stage: storage_queue -> dicom_image_queue, log_queue, series instances (or the DLQ).

At-least-once: Faust acks a batch only after this body returns, and commits an
offset only after the producer has flushed every output of the events before it.
A crash between the two replays the events; the outputs are deterministic, and every
later stage de-duplicates, so a replay never leaves a fan-out half done.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from faust.types import EventT, StreamT

from agents.sink_support import batches
from dicomflow.errors import DicomflowError
from schemas.fanout import Outcome, Output, dead_letter, process
from streams.app import app, settings
from streams.topics import BY_NAME, storage
from streams.topology import DLQ

log = logging.getLogger(__name__)

#: Events per take: large enough to amortise Faust's per-batch cost, small enough that a
#: crash replays little.
BATCH = 200
BATCH_WITHIN_S = 0.05


def _outcome(event: EventT) -> Outcome:
    msg = event.message
    source = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
    raw = event.value if isinstance(event.value, bytes) else bytes(event.value or b"")
    key = event.key if isinstance(event.key, bytes) or event.key is None else str(event.key).encode()
    try:
        return process(raw, key, storage_root=settings.storage_root, worker=settings.worker_id, source=source)
    except Exception as exc:  # a bug must dead-letter the event, never kill the stage or lose it
        log.exception("ingest internal error topic=%s partition=%s offset=%s", msg.topic, msg.partition,
                      msg.offset)
        err = DicomflowError(f"internal error: {type(exc).__name__}: {exc}", code="INTERNAL")
        letter = dead_letter(error=err, stage="ingest", worker=settings.worker_id, raw=raw, source=source,
                             now=datetime.now())
        return Outcome([Output(DLQ, key, letter)], err)


@app.agent(storage)
async def ingest(stream: StreamT[Any]) -> None:
    async for events in batches(stream, BATCH, BATCH_WITHIN_S):
        for event in events:
            outcome = _outcome(event)
            for out in outcome.outputs:
                await BY_NAME[out.topic].send(key=out.key, value=out.value)
            if outcome.error is not None:
                app.metrics.dead_letters.labels("ingest", outcome.error.code).inc()
                log.info("dead-lettered trace_id=%s code=%s field=%s offset=%s", outcome.trace_id,
                         outcome.error.code, outcome.error.field, event.message.offset)
            else:
                log.debug("ingested trace_id=%s offset=%s", outcome.trace_id, event.message.offset)
