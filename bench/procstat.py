"""CPU time of processes from /proc (Linux): how busy the worker and the broker were."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_seconds", "child_pids"]

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def child_pids(parent: int, name_contains: str) -> list[int]:
    """Direct children of ``parent`` whose command name contains ``name_contains``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and name_contains in comm:
            found.append(int(entry.name))
    return found
