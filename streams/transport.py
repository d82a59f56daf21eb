"""Faust's aiokafka transport with the consumer's fetch wait taken from the broker profile.

Faust creates its worker consumer with ``fetch_max_wait_ms=1500`` and no setting to
change it. A real Kafka or Redpanda broker answers a waiting fetch as soon as data
arrives, so the value only bounds idle polling there. Tansu holds every fetch for the
full wait, so on the embedded broker each hop of the pipeline added up to 1.5 s
(0.75 s on average) between a record being produced and consumed.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as faust_aiokafka

__all__ = ["ProfiledTransport"]


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        wait_s = getattr(getattr(self.app, "profile", None), "consumer_fetch_max_wait_s", None)
        if wait_s is not None:
            # Read by AIOKafkaConsumer.start() when it builds its Fetcher, which has not happened yet.
            consumer._fetch_max_wait_ms = int(wait_s * 1000)  # noqa: SLF001 - no public setter
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class ProfiledTransport(faust_aiokafka.Transport):
    Consumer = _Consumer
