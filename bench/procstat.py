"""CPU time and memory of processes from /proc (Linux): how busy and how big the worker and the broker were."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_seconds", "tree_cpu_seconds", "child_pids", "descendants", "rss_bytes"]

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


def _own_and_reaped(pid: int) -> float | None:
    """utime + stime + cutime + cstime of ``pid``: itself and its children that exited and were waited for."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / _TICKS


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` with its children: every live descendant, and those that exited (cutime).

    A live descendant's own reaped children are in its cutime, so nothing is counted twice; a
    descendant that exits between two reads and is not waited for is lost (pools rarely do).
    """
    own = _own_and_reaped(pid)
    if own is None:
        return None
    return own + sum(_own_and_reaped(p) or 0.0 for p in descendants(pid))


def _parents() -> dict[int, int]:
    """pid -> ppid of every process now."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` (VmRSS), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None  # a zombie has no VmRSS


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
