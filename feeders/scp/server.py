"""The SCP as a component of an asyncio application (:class:`StorageSCP`), and standalone (:func:`serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import _config, evt
from pynetdicom import dimse_messages as _dimse_messages

from core.errors import ConfigError
from feeders.scp import reactor
from feeders.scp.acceptor import SPOOL_DIR, Acceptor
from feeders.scp.association import (
    build_ae,
    handle_association_request,
    on_connection_open,
    peer,
    peer_certificate_cn,
    server_ssl_context,
)
from feeders.scp.bridge import LoopBridge, Publisher
from feeders.scp.config import ScpConfig
from feeders.scp.store import NOT_AUTHORISED, StoreDeps, handle_store
from feeders.storage import InstanceStore
from feeders.tenancy import TenantRefused

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

    from core.settings import BrokerProfile, Settings

__all__ = ["SPOOL_DIR", "StorageSCP", "serve"]

log = logging.getLogger(__name__)



def _store_or_refuse(event: Any, deps: StoreDeps) -> int:
    """EVT_C_STORE: :func:`handle_store`, answering 0x0124 when the tenant choice is refused.

    The refusal comes from the tenancy check, before anything is written or published.
    With client certificates, the tenancy is bound to this association's verified CN first.
    """
    cert_cn = peer_certificate_cn(event.assoc)
    if cert_cn is not None:
        deps = replace(deps, tenancy=deps.tenancy.for_peer(cert_cn))
    try:
        return handle_store(event, deps)
    except TenantRefused as exc:
        calling, called, ip = peer(event.assoc)
        log.warning("store refused reason=%s calling_ae=%s called_ae=%s source_ip=%s tenant=%s detail=%s",
                    exc.reason, calling, called, ip, exc.tenant, exc)
        return NOT_AUTHORISED


def _wake_reactors(event: Any) -> None:
    """EVT_CONN_OPEN: this association's reactors wait for work instead of polling (feeders.scp.reactor)."""
    reactor.attach(event.assoc)


def _free_wakers(event: Any) -> None:
    reactor.detach(event.assoc)


class StorageSCP:
    """The SCP as a component of an asyncio application.

    ``start()`` binds and returns at once (pynetdicom serves on its own threads);
    publishes run on the loop ``start()`` was given or called from. ``stop()``
    blocks until associations end, so from a coroutine use ``await aclose()``.

    ``spool_to_disk`` sets pynetdicom's process-wide ``STORE_RECV_CHUNKED_DATASET``
    while the SCP runs (restored by ``stop()``), and spools into
    ``{storage_root}/.spool`` rather than the system temp directory: on the storage
    filesystem the final placement is a hard link, not a copy (readers of the storage
    root skip dot-entries).
    """

    def __init__(self, config: ScpConfig, publisher: Publisher) -> None:
        self.config = config
        self.publisher = publisher
        self._server: ThreadedAssociationServer | None = None
        self._saved_chunked: bool | None = None
        self._saved_spool: Any = None
        self._bridge: LoopBridge | None = None
        #: The asyncio engine's acceptor, the loop and thread it serves on, and its bound address.
        self._acceptor: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when the config asked for 0."""
        if self._address is not None:
            return self._address
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def running(self) -> bool:
        return self._server is not None or self._acceptor is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Bind and serve in background threads. Without ``loop``, the running loop is used."""
        if self.running:
            raise RuntimeError("the SCP is already started")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError("StorageSCP.start() needs loop= when called outside a coroutine") \
                    from None
        config = self.config
        self._bridge = LoopBridge(loop, config.publish_timeout_s)
        ssl_context = (server_ssl_context(config.tls_cert, config.tls_key, config.tls_ca)
                       if config.tls_cert and config.tls_key else None)
        deps = StoreDeps(
            store=InstanceStore(config.storage_root),
            tenancy=config.tenancy,
            publisher=self.publisher,
            bridge=self._bridge,
            worker_node_id=config.worker_node_id,
        )
        config.storage_root.mkdir(parents=True, exist_ok=True)
        if config.engine == "asyncio":
            self._start_acceptor(loop, deps, ssl_context)
            return
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, on_connection_open),
            (evt.EVT_CONN_OPEN, _wake_reactors),
            (evt.EVT_CONN_CLOSE, _free_wakers),
            (evt.EVT_REQUESTED, handle_association_request, [config.tenancy]),
            (evt.EVT_C_STORE, _store_or_refuse, [deps]),
        ]
        ae = build_ae(config)
        self._saved_chunked = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = config.spool_to_disk
        if config.spool_to_disk:
            self._spool_into(config.storage_root / SPOOL_DIR)
        reactor.install()
        try:
            server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers,
                                     ssl_context=ssl_context)
        except BaseException:
            self._restore_config()
            raise
        self._server = cast("ThreadedAssociationServer", server)
        self._listening()

    def _start_acceptor(self, loop: asyncio.AbstractEventLoop, deps: StoreDeps, ssl_context: Any) -> None:
        """The acceptor serves on a loop and thread of its own: the publisher's loop (``loop``)
        only publishes, and the SCP serves whether or not that loop runs (the journal needs none)."""
        config = self.config
        # Bound here, so the port is known (and connections queue) before the server runs.
        sock = socket.create_server((config.host, config.port), backlog=max(16, config.max_associations))
        acceptor = Acceptor(config, deps, ssl_context)
        own = asyncio.new_event_loop()
        thread = threading.Thread(target=own.run_forever, name="scp-acceptor", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(acceptor.serve(sock), own).result(30.0)
        except BaseException:
            own.call_soon_threadsafe(own.stop)
            thread.join(10.0)
            own.close()
            sock.close()
            raise
        self._acceptor, self._loop, self._thread = acceptor, own, thread
        host, port = sock.getsockname()[:2]
        self._address = (str(host), int(port))
        self._listening()

    def _listening(self) -> None:
        config = self.config
        host, port = self.address
        tenancy = config.tenancy
        if not (tenancy.by_calling_ae or tenancy.by_called_ae or tenancy.default_tenant):
            log.warning("no tenant mapping and no default tenant: every association will be rejected; "
                        "set DICOMFLOW_DEFAULT_TENANT or DICOMFLOW_TENANT_BY_CALLING_AE")
        log.info("scp listening host=%s port=%s %s", host, port,
                 " ".join(f"{k}={v}" for k, v in config.describe().items()))

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, abort the rest."""
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            self._stop_acceptor(acceptor, grace_s)
            return
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.shutdown()
            deadline = time.monotonic() + grace_s
            for assoc in server.active_associations:
                assoc.join(max(0.0, deadline - time.monotonic()))
            for assoc in server.active_associations:
                log.warning("association aborted at shutdown calling_ae=%s", peer(assoc)[0])
                assoc.abort()
        finally:
            self._restore_config()
            bridge, self._bridge = self._bridge, None
            if bridge is not None:
                bridge.close()
        log.info("scp stopped")

    def _stop_acceptor(self, acceptor: Acceptor, grace_s: float) -> None:
        own, thread = self._loop, self._thread
        self._loop, self._thread, self._address = None, None, None
        try:
            if own is not None:
                try:
                    # Grace, then stores in flight finish: each waits at most for its publish.
                    asyncio.run_coroutine_threadsafe(acceptor.close(grace_s), own).result(
                        grace_s + self.config.publish_timeout_s + 30.0)
                finally:
                    own.call_soon_threadsafe(own.stop)
                    if thread is not None:
                        thread.join(10.0)
                    if not own.is_running():
                        own.close()
        finally:
            bridge, self._bridge = self._bridge, None
            if bridge is not None:
                bridge.close()
        log.info("scp stopped")

    async def aclose(self, grace_s: float = 10.0) -> None:
        """:meth:`stop` off the loop, so handlers waiting on the loop can finish."""
        await asyncio.to_thread(self.stop, grace_s)

    async def __aenter__(self) -> StorageSCP:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _spool_into(self, folder: Path) -> None:
        # pynetdicom creates its spool files with a bare NamedTemporaryFile(); give it a
        # directory. Process-wide, like STORE_RECV_CHUNKED_DATASET itself.
        if not hasattr(_dimse_messages, "NamedTemporaryFile"):
            log.warning("pynetdicom spools to the system temp directory: no NamedTemporaryFile hook")
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._saved_spool = _dimse_messages.NamedTemporaryFile
        _dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment]
            tempfile.NamedTemporaryFile, dir=folder)

    def _restore_config(self) -> None:
        reactor.uninstall()
        if self._saved_chunked is not None:
            _config.STORE_RECV_CHUNKED_DATASET = self._saved_chunked
            self._saved_chunked = None
        if self._saved_spool is not None:
            _dimse_messages.NamedTemporaryFile = self._saved_spool
            self._saved_spool = None


async def serve(settings: Settings, *, broker_url: str | None = None, profile: BrokerProfile | None = None,
                stop: asyncio.Event | None = None, handle_signals: bool = True,
                on_started: Callable[[StorageSCP], None] | None = None, **overrides: Any) -> None:
    """Run the SCP standalone until ``stop`` is set or SIGINT/SIGTERM (``dicomflow scp``).

    ``broker_url`` defaults to ``settings.broker``; ``profile`` to the production
    profile (pass ``EMBEDDED_PROFILE`` when the broker is the embedded Tansu).
    ``on_started`` is called with the running SCP (e.g. to print its address);
    ``overrides`` replace :class:`ScpConfig` fields (e.g. ``port=0``).
    """
    from core.settings import PRODUCTION_PROFILE
    from feeders.journal import JournalPublisher
    from feeders.publisher import EventPublisher

    config = ScpConfig.from_settings(settings, **overrides)
    publisher: Any
    if settings.journal:
        # The embedded stack: Success once the event is in the journal (the relay publishes it).
        publisher = JournalPublisher(settings.journal_dir, "scp")
    else:
        url = broker_url or settings.broker
        if url is None:
            raise ConfigError("the SCP needs a broker: set DICOMFLOW_BROKER (or run `dicomflow up`)",
                              field="DICOMFLOW_BROKER")
        publisher = EventPublisher(url, profile or PRODUCTION_PROFILE, partitions=settings.partitions,
                                   security=settings.broker_security)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
    scp = StorageSCP(config, publisher)
    try:
        await publisher.start()
        scp.start(loop)
        if on_started is not None:
            on_started(scp)
        await stop.wait()
    finally:
        try:
            await scp.aclose()
        finally:
            await publisher.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)
