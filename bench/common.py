"""Shared helpers: machine info, result files, tables, figures and deadline polling."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

__all__ = ["OUT_DIR", "REPO", "Figure", "figures_table", "machine_info", "poll_until", "ratio", "table",
           "write_result"]

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "bench" / "out"

T = TypeVar("T")


@dataclass(frozen=True)
class Figure:
    """One reported figure: ``value`` against a ``baseline`` measured in the same run."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        return ratio(self.value, self.baseline)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def ratio(value: float, baseline: float | None) -> float | None:
    return value / baseline if baseline else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/out/<name>-<timestamp>.json`` (and ``<name>-latest.json``); return the path."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "time": datetime.now().isoformat(timespec="seconds"),
               "machine": machine_info(), **data}
    blob = orjson.dumps(payload, option=orjson.OPT_INDENT_2, default=str)
    path = OUT_DIR / f"{name}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_bytes(blob)
    (OUT_DIR / f"{name}-latest.json").write_bytes(blob)
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(s.rstrip() for s in out)


def figures_table(figures: Sequence[Figure]) -> str:
    rows = []
    for f in figures:
        verdict = "" if f.met is None else ("met" if f.met else "NOT met")
        rows.append([f.name, f.value, f.unit, f.baseline, f.baseline_name, f.ratio,
                     f"{f.target} {verdict}".strip()])
    return table(["figure", "value", "unit", "baseline", "baseline is", "ratio", "target"], rows)


async def poll_until(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, timeout: float,
                     interval: float = 0.1, what: str = "condition") -> tuple[T, float]:
    """Call ``probe`` until ``done(value)``; return (value, monotonic time seen). Fails at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        now = time.monotonic()
        if done(value):
            return value, now
        if now > deadline:
            raise TimeoutError(f"deadline ({timeout:.0f}s): {what} not reached, last value {value!r}")
        await asyncio.sleep(interval)
