"""Children that cannot outlive ``dicomflow up``.

A child of ``up`` runs in its own session (so a terminal's Ctrl-C reaches ``up`` only, which
then stops the stack in order). If ``up`` itself dies without stopping them (SIGKILL, the
OOM killer, a service manager's stop timeout), the kernel sends each child SIGTERM
(``PR_SET_PDEATHSIG``), so none lives on holding a port. Linux-only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from collections.abc import Callable

__all__ = ["tied_to"]

_PR_SET_PDEATHSIG = 1


def tied_to(parent_pid: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when ``parent_pid`` dies."""
    # Looked up here, before the fork: find_library runs a subprocess, which the forked child
    # of a threaded parent must not do.
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would signal us.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), sig)

    return preexec
