"""Lag gauge: end offset minus the group's committed offset, for every consumed partition.

Faust's sensor exports both offsets but not their difference; data engineers alert on
the difference. Refreshed on a timer with the same helpers ``dicomflow status`` uses.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from streams.broker import committed_offsets, end_offsets
from streams.topology import consumed_topics

if TYPE_CHECKING:
    from core.settings import Settings
    from streams.app import DicomflowApp

__all__ = ["register"]

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 10.0


def register(app: DicomflowApp, settings: Settings) -> None:
    consumed = list(consumed_topics(settings.doris_enabled))

    async def refresh_lag() -> None:
        try:
            ends = await end_offsets(app.bootstrap, consumed)
            committed = await committed_offsets(app.bootstrap, settings.app_id, list(ends))
        except Exception as exc:  # monitoring must never take the worker down
            log.warning("lag refresh failed: %s", exc)
            return
        app.metrics.lag = {(tp.topic, tp.partition): max(0, end - committed.get(tp, 0)) for tp, end in ends.items()}

    app.timer(LAG_INTERVAL_S, name="refresh_lag")(refresh_lag)
