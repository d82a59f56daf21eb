"""From pynetdicom's handler threads to the publisher's asyncio loop.

pynetdicom runs handlers on its own threads, while the publisher lives on an asyncio
loop: each publish is bridged with ``asyncio.run_coroutine_threadsafe(...).result(timeout)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Protocol

from core.errors import BrokerError

__all__ = ["Publisher", "LoopBridge"]


class Publisher(Protocol):
    """What the SCP needs from :class:`feeders.publisher.EventPublisher`."""

    async def publish(self, event: dict[str, Any], key: str | None) -> None: ...


class LoopBridge:
    """Runs a publisher coroutine on the owner's event loop from a pynetdicom thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _direct(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # One thread: appends are serialised by the journal's lock anyway.
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
            return self._pool

    def close(self) -> None:
        """Let appends in flight finish, then drop the journal thread."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def publish(self, publisher: Publisher, event: dict[str, Any], key: str | None,
                meanwhile: Callable[[], None] | None = None) -> None:
        """Publish and wait for the acknowledgement; :class:`BrokerError` on any failure.

        ``meanwhile`` runs on this thread while the broker acknowledges (the SCP syncs
        the stored file's directory there); its exception is raised after the wait.
        """
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            # Blocking the loop on a future that needs the loop can only time out.
            raise RuntimeError("LoopBridge.publish called on its own event loop thread")
        blocking = getattr(publisher, "publish_blocking", None)
        fut: concurrent.futures.Future[Any]
        if blocking is not None:
            # The journal: appended on a thread of its own, no event loop in between, while
            # this thread syncs the directory (two fsyncs overlapped, as with the broker).
            fut = self._direct().submit(blocking, event, key)
        else:
            coro = publisher.publish(event, key)
            try:
                fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
            except RuntimeError as exc:  # the loop is closed
                coro.close()
                raise BrokerError(f"publisher event loop unavailable: {exc}") from exc
        side_error: BaseException | None = None
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException as exc:  # raised once the publish has settled
                side_error = exc
        try:
            fut.result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            # Cancelling cannot recall a record already handed to the producer: a late
            # delivery would name a revoked file, which ingest reports as FILE_MISSING.
            fut.cancel()
            raise BrokerError(f"no broker acknowledgement within {self.timeout_s}s") from None
        except concurrent.futures.CancelledError:
            raise BrokerError("publish cancelled: the publisher's loop is shutting down") from None
        except BrokerError:
            raise
        except Exception as exc:
            raise BrokerError(f"publish failed: {type(exc).__name__}: {exc}") from exc
        if side_error is not None:
            raise side_error
