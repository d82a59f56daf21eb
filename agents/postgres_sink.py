"""Series-index sink stage: dicom_state_queue -> dicom_state_meta (PostgreSQL or MySQL/MariaDB).

Runs when a series index is configured: DICOMFLOW_INDEX_DSN (``postgresql://`` or
``mysql://``), else DICOMFLOW_POSTGRES_DSN (``dicomflow up`` sets it to the embedded
server). Upserts are idempotent and newest-wins, so replays and duplicates from the
series stage are harmless. The agent keeps its name ``postgres_sink`` (consumer offsets
and metrics stay where they were); its counters are published as the provider's name.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from faust.types import EventT, StreamT

from agents.gaps import GapGuard
from agents.sink_support import SinkInput, run_batches, serve_sink, sink_items, stopping, write_items
from schemas import codec
from schemas.records import DicomStateMeta
from sinks.base import retry_until_done
from sinks.index import open_index
from sinks.mysql import MySQLIndex
from streams.topology import STATE

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
    """The ``postgres_sink`` agent on the state topic, if a series index is configured."""
    sink = open_index(settings)
    if sink is None:
        log.warning("neither DICOMFLOW_INDEX_DSN nor DICOMFLOW_POSTGRES_DSN is set: the series index sink is off")
        return
    if isinstance(sink, MySQLIndex):
        # A server that answers the DSN with a refusal (credentials, unknown database) stops the
        # worker before it starts, with one line naming the variable and the server's answer
        # (ConfigError). A server that is not up yet is waited for, as the sink contract says.
        sink.preflight()
    # Faust 0.15.3 skips records here too (see agents/gaps.py): this stage had no guard.
    guard = GapGuard(app, STATE)
    guard.watch_revocations(app)
    app.metrics.register_counters("postgres_gaps", guard.stats)

    async def prepare(events: Sequence[EventT]) -> SinkInput:
        missing = []
        for e in events:
            _, gap = await retry_until_done(functools.partial(guard.check, e.message.partition, e.message.offset),
                                            what="postgres gap guard", should_stop=stopping(app))
            missing.extend(gap)
        return sink_items(events, _decode, missing)

    async def handle(prepared: SinkInput) -> None:
        await write_items(app, sink, prepared, sink.name)

    async def postgres_sink(stream: StreamT[Any]) -> None:
        await run_batches(app, stream, BATCH, BATCH_WITHIN_S, stage="postgres", prepare=prepare, handle=handle,
                          on_abort=lambda events: guard.forget({(e.message.topic, e.message.partition)
                                                                for e in events}))

    app.agent(app.queues.state, name="postgres_sink")(postgres_sink)
    serve_sink(app, sink, sink.name)
