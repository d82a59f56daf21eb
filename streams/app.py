"""The one Faust application, built from settings.

``faust -A streams.app worker`` and ``dicomflow worker`` both run it. Before any
Kafka client starts (``on_first_start``), it starts the embedded Tansu broker when
DICOMFLOW_BROKER is unset, and creates every topic with its partition count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.types import TransportT

from core.settings import BrokerProfile, Settings
from dicomflow.embedded.broker import EmbeddedBroker
from dicomflow.embedded.ports import wait_for_port
from streams.admin import bootstrap_of, ensure_topics
from streams.metrics import Metrics, setup_metrics
from streams.topology import ALL_TOPICS
from streams.transport import ProfiledTransport

__all__ = ["DicomflowApp", "create_app", "app", "settings"]

log = logging.getLogger(__name__)


class DicomflowApp(faust.App):
    """faust.App plus dicomflow's start-up duties."""

    dicomflow: Settings
    profile: BrokerProfile
    closers: list[Callable[[], Awaitable[None]]]
    metrics: Metrics
    _embedded_broker: EmbeddedBroker | None = None

    def _new_transport(self) -> TransportT:
        # Faust's aiokafka transport, with the consumer's fetch wait from the broker profile.
        return ProfiledTransport(self.conf.broker_consumer, self)

    def close_on_shutdown(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Register a sink's ``stop`` to run when the worker shuts down."""
        self.closers.append(stop)

    async def on_first_start(self) -> None:
        await super().on_first_start()
        s = self.dicomflow
        log.info("dicomflow settings %s", s.describe())
        if s.embedded_broker and not wait_for_port("127.0.0.1", s.embedded_broker_port, 0.2):
            broker = EmbeddedBroker(port=s.embedded_broker_port, log_path=s.home / "tansu.log")
            s.home.mkdir(parents=True, exist_ok=True)
            await asyncio.get_running_loop().run_in_executor(None, broker.start)
            self._embedded_broker = broker
        await ensure_topics(bootstrap_of(s.broker_url), ALL_TOPICS, s.partitions, replication=s.replication)

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        for stop in reversed(self.closers):
            try:
                await stop()
            except Exception:
                log.exception("error while closing a sink")
        if self._embedded_broker is not None:
            self._embedded_broker.stop()
            self._embedded_broker = None


def create_app(settings: Settings) -> DicomflowApp:
    profile = settings.profile
    conf: dict[str, Any] = {
        "broker": settings.broker_url,
        "store": "memory://",
        "datadir": str(settings.home / "faust"),
        "key_serializer": "raw",
        "value_serializer": "raw",
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication,
        "broker_session_timeout": profile.session_timeout_s,
        "broker_heartbeat_interval": profile.heartbeat_interval_s,
        "producer_max_batch_size": profile.producer_max_batch_size,
        "producer_linger": profile.producer_linger_s,
        "producer_acks": -1,
        "consumer_auto_offset_reset": "earliest",
        "web_port": settings.web_port,
        "web_host": "127.0.0.1",
        "autodiscover": ["agents", "tables"],
        "origin": "streams.app",
    }
    app = DicomflowApp(settings.app_id, **conf)
    app.dicomflow = settings
    app.closers = []
    app.profile = profile
    app.metrics = setup_metrics(app)
    return app


settings = Settings.from_env()
app = create_app(settings)
