"""The Faust application factory: ``create_app(settings)`` builds the app and registers every stage.

Nothing is built at import. ``dicomflow worker`` calls :func:`create_app` and
:func:`run_worker`; ``faust -A streams.app worker`` finds a module attribute ``app``,
which is created from the environment on first access (PEP 562), not at import.

The app does not start servers: the embedded broker belongs to ``dicomflow`` (``up`` and
``worker``). Before any Kafka client starts (``on_first_start``) it creates every topic
with its partition count, then starts each registered resource (the sinks) explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.types import TransportT

from core.errors import ConfigError
from core.settings import BrokerProfile, Settings
from streams.broker import bootstrap_of, ensure_topics, faust_credentials
from streams.metrics import Metrics, setup_metrics
from streams.partitioner import CachedPartitioner
from streams.topics import Topics
from streams.topology import ALL_TOPICS
from streams.transport import ProfiledTransport

__all__ = ["DicomflowApp", "create_app", "run_worker", "ensure_home"]

log = logging.getLogger(__name__)


class DicomflowApp(faust.App):
    """faust.App plus dicomflow's settings, topics, metrics and start-up duties."""

    settings: Settings
    profile: BrokerProfile
    #: dicomflow's topic objects (``app.queues.state``, ``app.queues.by_name``). Not ``app.topics``:
    #: that name is Faust's own topic conductor.
    queues: Topics
    metrics: Metrics
    starters: list[Callable[[], Awaitable[None]]]
    closers: list[Callable[[], Awaitable[None]]]
    stoppers: list[Callable[[], None]]

    @property
    def bootstrap(self) -> str:
        """The broker in aiokafka's ``host:port`` form, for the helpers in streams/broker.py."""
        return bootstrap_of(self.settings.broker_url)

    def _new_transport(self) -> TransportT:
        # Faust's aiokafka transport, with the consumer's fetch wait from the broker profile.
        return ProfiledTransport(self.conf.broker_consumer, self)

    def start_with(self, start: Callable[[], Awaitable[None]]) -> None:
        """Await ``start`` once at worker start, after the topics exist and before agents consume."""
        self.starters.append(start)

    def close_on_shutdown(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Register a resource's ``stop`` to run when the worker shuts down."""
        self.closers.append(stop)

    def before_stop(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` as the worker starts to stop, before Faust waits for every event it handed
        out to be acked (a stage holding events unacked on purpose gives them back here)."""
        self.stoppers.append(hook)

    async def on_stop(self) -> None:
        for hook in self.stoppers:
            try:
                hook()
            except Exception:
                log.exception("error in a before-stop hook")
        await super().on_stop()

    async def on_first_start(self) -> None:
        await super().on_first_start()
        s = self.settings
        log.info("dicomflow settings %s", s.describe())
        await ensure_topics(self.bootstrap, ALL_TOPICS, s.partitions, replication=s.replication)
        for start in self.starters:
            await start()

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        for stop in reversed(self.closers):
            try:
                await stop()
            except Exception:
                log.exception("error while closing a resource")


def create_app(settings: Settings) -> DicomflowApp:
    """Build the app for ``settings`` and register its topics, tables and agents."""
    from agents import register_all  # agents sit above streams: imported when an app is built

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
        # Kafka's partitioning, with the hash of recent keys kept (pure-Python murmur2 per record).
        "producer_partitioner": CachedPartitioner(),
        "producer_acks": -1,
        "broker_credentials": faust_credentials(settings.broker_security),
        "consumer_auto_offset_reset": "earliest",
        "web_port": settings.web_port,
        "web_host": "127.0.0.1",
        "web_bind": settings.web_bind,
        "autodiscover": False,
        "origin": "streams.app",
    }
    app = DicomflowApp(settings.app_id, **conf)
    app.settings = settings
    app.profile = profile
    app.starters = []
    app.closers = []
    app.stoppers = []
    app.metrics = setup_metrics(app)
    app.queues = Topics(app, settings.partitions)
    register_all(app, settings)
    return app


def run_worker(app: DicomflowApp) -> None:
    """Run Faust's worker command for ``app`` (what ``app.main()`` does, with explicit arguments).

    uvloop takes roughly 15% of Faust's per-event CPU (faust-pitfalls §3).
    """
    from faust.cli.faust import cli

    s = app.settings
    ensure_home(s)
    app.finalize()
    app.worker_init()
    app.worker_init_post_autodiscover()
    args = ["--loop", "uvloop", "worker", "-l", s.log_level.lower(), "--web-port", str(s.web_port),
            "--web-host", "127.0.0.1", "--web-bind", s.web_bind]
    cli.main(args=args, prog_name="dicomflow worker", app=app)


def ensure_home(settings: Settings) -> None:
    """Create DICOMFLOW_HOME (Faust keeps its data directory inside) or fail with one clear line."""
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"DICOMFLOW_HOME {settings.home} cannot be created: {exc.strerror}",
                          field="DICOMFLOW_HOME") from exc


_lazy: dict[str, DicomflowApp] = {}


def __getattr__(name: str) -> Any:
    # ``faust -A streams.app`` reads ``streams.app.app``: build it on first access only.
    if name == "app":
        if "app" not in _lazy:
            _lazy["app"] = create_app(Settings.from_env())
        return _lazy["app"]
    raise AttributeError(name)
