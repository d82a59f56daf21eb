"""Lag gauge: end offset minus the group's committed offset, for every consumed partition.

Faust's sensor exports both offsets but not their difference; data engineers alert on
the difference. Refreshed on a timer with the same helpers ``dicomflow status`` uses.
"""

from __future__ import annotations

import logging

from dicomflow.status import CONSUMED_TOPICS, CONSUMED_WITHOUT_DORIS, committed_offsets, end_offsets
from streams.admin import bootstrap_of
from streams.app import app, settings

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 10.0


@app.timer(LAG_INTERVAL_S)
async def refresh_lag() -> None:
    consumed = CONSUMED_TOPICS if settings.doris_enabled else CONSUMED_WITHOUT_DORIS
    bootstrap = bootstrap_of(settings.broker_url)
    try:
        ends = await end_offsets(bootstrap, list(consumed))
        committed = await committed_offsets(bootstrap, settings.app_id, list(ends))
    except Exception as exc:  # monitoring must never take the worker down
        log.warning("lag refresh failed: %s", exc)
        return
    app.metrics.lag = {(tp.topic, tp.partition): max(0, end - committed.get(tp, 0)) for tp, end in ends.items()}
