"""The relay as a process (``dicomflow relay``, run by ``up``): its parts wired from settings.

Publisher, lag probe, settled-workers probe, dead-letter archive and the pruning of the Doris
loaded keys at drained points; runs until SIGINT/SIGTERM, then drains.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime

from core.settings import Settings
from feeders.dlq_archive import DeadLetterArchive
from feeders.publisher import EventPublisher
from feeders.relay import BrokerLag, Relay, WorkersSettled
from sinks.doris_loaded import LoadedKeys
from streams.broker import bootstrap_of
from streams.incarnation import read_incarnation
from streams.topology import TOPICS, consumed_topics

__all__ = ["run_relay"]

log = logging.getLogger(__name__)

#: The loaded keys are looked at no more often than this (at drained points).
PRUNE_EVERY_S = 3600.0


class _LoadedPruner:
    """Keys of events before the checkpoint are never needed again, the rest only within the retention."""

    def __init__(self, keys: LoadedKeys, retention_s: float) -> None:
        self.keys = keys
        self.retention_s = retention_s
        self.pruned_at = 0.0

    async def __call__(self, pending_since: float) -> None:
        now = time.time()
        if now - self.pruned_at < PRUNE_EVERY_S:
            return
        self.pruned_at = now
        # A key is recorded after its event was journaled: keys older than the oldest event that
        # may still be published again are never needed, and none goes before the retention.
        horizon = min(pending_since, now - self.retention_s)
        try:
            n = await self.keys.prune(datetime.fromtimestamp(horizon, UTC))
            log.info("pruned %d Doris loaded keys", n)
        except Exception as exc:  # pruning must never stop the relay
            log.warning("pruning the Doris loaded keys failed: %s", exc)


async def run_relay(settings: Settings, worker_metrics: Callable[[], list[str]], *,
                    stop_asked: Callable[[], bool] = lambda: False) -> bool:
    """Relay until a signal, then drain; True when the pipeline drained (``up`` may then recycle).

    ``stop_asked``: whether a stop signal came before this ran (then it drains at once).
    """
    loaded = LoadedKeys(settings.postgres_dsn) if settings.postgres_dsn is not None else None
    publisher = EventPublisher(settings.broker_url, settings.profile, partitions=settings.partitions)
    await publisher.start()
    try:
        archive = DeadLetterArchive(settings.home / "deadletters", bootstrap_of(settings.broker_url), publisher,
                                    [t.name for t in TOPICS if t.dead_letters])
        lag = BrokerLag(settings.broker_url, settings.app_id, list(consumed_topics(settings.doris_enabled)))
        relay = Relay(settings.journal_dir, publisher, lag,
                      settle_s=settings.series_window_seconds + 2.0, workers=WorkersSettled(worker_metrics),
                      archive=archive, max_ahead=settings.relay_max_ahead,
                      on_checkpoint=_LoadedPruner(loaded, settings.doris_loaded_retention_hours * 3600)
                      if loaded is not None else None,
                      incarnation=functools.partial(read_incarnation, bootstrap_of(settings.broker_url)))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if stop_asked():
            stop.set()
        try:
            await relay.run(stop)
            return await relay.drain(settings.relay_drain_seconds)
        finally:
            await lag.close()
    finally:
        await publisher.stop()
        if loaded is not None:
            await loaded.stop()
