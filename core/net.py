"""Socket tuning shared by the SCP (feeders) and the SCU (dicomflow.tools): stdlib only."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

__all__ = ["no_delay"]


def no_delay(assoc: Any) -> None:
    """Disable Nagle on an association's socket.

    pynetdicom leaves it on, so every small DIMSE response waits for the peer's delayed
    ACK (~40-50 ms): measured here, 18 instances/s with it and ~130/s without.
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
