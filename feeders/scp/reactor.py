"""pynetdicom's two reactor threads per association, woken instead of polling every millisecond.

pynetdicom 3.0 runs each association on two threads that poll: the DUL reactor sleeps
1 ms whenever it found nothing to do, and the association reactor sleeps 1 ms on every
turn. Measured on 2 cores (bench.cost, py-spy): that polling costs about 0.13 of a core
per open association whatever the traffic, about 1.2 ms of CPU per instance at 100
instances/s, a quarter of the whole SCP's cost.

Here both sleeps become waits that end as soon as there is work:

* the DUL reactor waits on its socket and on a wake-up pipe, written whenever another
  thread queues a primitive or an event for it (the association's C-STORE response);
* the association reactor waits on an event set whenever the DIMSE layer completes a
  message or the DUL queues an ACSE primitive (release, abort).

Both waits end after :data:`MAX_WAIT_S` anyway, so the reactors' other checks (timers,
a dead peer, a kill) still run, 20 times a second instead of 1,000. Installed by
:func:`install` for associations it is told about (:func:`attach`, from EVT_CONN_OPEN), so
other pynetdicom users in the same process (an SCU) keep the original behaviour.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time as _time
from collections.abc import Callable
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul

__all__ = ["MAX_WAIT_S", "install", "uninstall", "attach", "detach"]

#: The longest a reactor waits without a reason to wake: bounds how late a timer or a kill is seen.
MAX_WAIT_S = 0.05
#: pynetdicom's own poll interval (DUL ``_run_loop_delay`` and the association reactor's sleep).
_POLL_S = 0.001

_ATTR = "_dicomflow_waker"


class _Waker:
    """One association's wake-ups: a pipe for the DUL thread, an event for the association thread."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        # Socket objects, not bare descriptors: see close().
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.assoc_ready = threading.Event()
        self._wrap(self.dul.to_provider_queue, self.wake_dul)
        self._wrap(self.dul.event_queue, self.wake_dul)
        self._wrap(self.dul.to_user_queue, self.assoc_ready.set)
        self._wrap(assoc.dimse.msg_queue, self.assoc_ready.set)

    @staticmethod
    def _wrap(queue: Any, wake: Callable[[], None]) -> None:
        put = queue.put

        def put_and_wake(*args: Any, **kwargs: Any) -> None:
            put(*args, **kwargs)
            wake()

        queue.put = put_and_wake

    def wake_dul(self) -> None:
        if threading.current_thread() is self.dul:
            return  # the DUL queues its own events between two turns: it is awake
        with contextlib.suppress(OSError):  # a full buffer is already a wake-up
            self.wake_w.send(b"\0")

    def wait_dul(self) -> None:
        dul = self.dul
        if not (dul.to_provider_queue.empty() and dul.event_queue.empty()):
            return
        raw = getattr(getattr(dul, "socket", None), "socket", None)
        if raw is None:
            _time.sleep(_POLL_S)
            return
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes waiting: the socket itself may not be readable
        try:
            select.select([raw, self.wake_r], [], [], MAX_WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom notices on its next turn
            _time.sleep(_POLL_S)
            return
        with contextlib.suppress(OSError):  # non-blocking: at most what is there
            self.wake_r.recv(4096)

    def close(self) -> None:
        # Socket objects: once closed their descriptor is -1, so a late wake-up or wait fails on
        # them (and is ignored) instead of reaching a descriptor the process has reused.
        self.wake_r.close()
        self.wake_w.close()

    def wait_assoc(self) -> None:
        self.assoc_ready.clear()
        if not self.assoc.dimse.msg_queue.empty():
            return
        self.assoc_ready.wait(MAX_WAIT_S)



class _SleepShim:
    """Stands in for the ``time`` module inside one pynetdicom module; only ``sleep`` differs."""

    def __init__(self, real: Any, wait: Callable[[threading.Thread], bool]) -> None:
        self._real = real
        self._wait = wait

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        if seconds == _POLL_S and self._wait(threading.current_thread()):
            return
        self._real.sleep(seconds)


def _wait_as_dul(thread: threading.Thread) -> bool:
    waker: _Waker | None = getattr(getattr(thread, "assoc", None), _ATTR, None)
    if waker is None or waker.dul is not thread:
        return False
    waker.wait_dul()
    return True


def _wait_as_assoc(thread: threading.Thread) -> bool:
    waker: _Waker | None = getattr(thread, _ATTR, None)
    if waker is None:
        return False
    waker.wait_assoc()
    return True


def install() -> None:
    """Route pynetdicom's reactor sleeps through the wakers (process-wide; idempotent)."""
    if not isinstance(_dul.time, _SleepShim):
        _dul.time = _SleepShim(_dul.time, _wait_as_dul)  # type: ignore[assignment]
    if not isinstance(_association.time, _SleepShim):
        _association.time = _SleepShim(_association.time, _wait_as_assoc)  # type: ignore[assignment]


def uninstall() -> None:
    """Put pynetdicom's own ``time`` back."""
    if isinstance(_dul.time, _SleepShim):
        _dul.time = _dul.time._real  # noqa: SLF001
    if isinstance(_association.time, _SleepShim):
        _association.time = _association.time._real  # noqa: SLF001


def detach(assoc: Any) -> None:
    """The connection closed (EVT_CONN_CLOSE): free the association's wake-up sockets."""
    waker: _Waker | None = getattr(assoc, _ATTR, None)
    if waker is not None:
        waker.close()


def attach(assoc: Any) -> None:
    """Wake this association's reactors instead of polling (call from EVT_CONN_OPEN)."""
    if getattr(assoc, _ATTR, None) is not None:
        return
    setattr(assoc, _ATTR, _Waker(assoc))
