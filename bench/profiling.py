"""Where a worker's time goes: py-spy (sampling, attached by pid) or cProfile (in-process).

py-spy is preferred: it samples from outside (``--nonblocking``: the worker is never
paused), sees every thread (Faust's aiokafka consumer runs in a thread of its own) and,
without ``--idle``, counts only samples in which a thread was running, so its shares are
shares of CPU time. cProfile sees only the main thread, covers the worker's whole life
(start-up imports included) and inflates call-heavy code; its idle time (``epoll.poll``)
is left out of the shares.

Both are reduced to the same views: the top functions by cumulative time, and self time
by library (the innermost frame that belongs to a library; standard-library frames other
than the event loop and logging are charged to their caller). py-spy's stacks also give
shares by stage of the worker (ingest's pure work, its sends, the series agent, the
producer, the event loop).
"""

from __future__ import annotations

import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import REPO, WorkerProcess

__all__ = ["Profile", "PySpy", "CProfiledWorker", "find_py_spy", "summarize_py_spy", "summarize_pstats",
           "library_of"]

_STDLIB = str(Path(os.__file__).parent)
_STDLIB_KEPT = {"asyncio", "selectors", "logging", "ssl", "socket", "concurrent", "threading"}
_REPO_DIRS = {"agents", "schemas", "sinks", "streams", "tables", "feeders", "dicomflow"}


def find_py_spy() -> str | None:
    """py-spy from $BENCH_PY_SPY, PATH, or next to this interpreter."""
    candidates = [os.environ.get("BENCH_PY_SPY"), shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def library_of(filename: str, function: str = "") -> str | None:
    """The library a frame belongs to, or None for a frame charged to its caller."""
    if filename == "~":  # a C function in cProfile's view
        if "epoll" in function or "select" in function:
            return "idle (epoll wait)"
        if "orjson" in function:
            return "orjson"
        return None
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if filename.startswith(str(REPO)):
        rel = Path(filename).relative_to(REPO)
        if rel.parts and rel.parts[0] in _REPO_DIRS:
            if rel.as_posix() == "schemas/codec.py":
                return "orjson (schemas.codec)"
            return "dicomflow " + ".".join(rel.with_suffix("").parts)
        return None
    if filename.startswith(_STDLIB):
        top = Path(filename).relative_to(_STDLIB).parts[0].removesuffix(".py")
        return top if top in _STDLIB_KEPT else None
    return None


_PROCESS = re.compile(r'(?:process \d+:"[^"]*";)+')
_PROCESS_PID = re.compile(r'process (\d+):')
#: Leaf frames that wait in a system call (epoll, a pipe, a condition): py-spy on this VM often
#: reports such threads as running, so they are left out of the shares.
_WAITS = {("select", "selectors.py"), ("wait", "threading.py"), ("wait", "connection.py"), ("_recv", "connection.py"),
          ("_worker", "thread.py"), ("poll", "connection.py")}


def _waiting(func: str, file: str) -> bool:
    return (func.rpartition(".")[2], Path(file).name) in _WAITS


_EVENT_LOOP = {"asyncio", "selectors", "concurrent", "threading"}


def _group(library: str) -> str:
    """Coarse groups for the summary: the dicomflow modules each keep their name."""
    return "asyncio event loop" if library in _EVENT_LOOP else library


@dataclass
class Profile:
    """A reduced profile: shares are fractions of the profiled CPU time."""

    tool: str
    samples: float
    cumulative: list[tuple[str, float]] = field(default_factory=list)
    by_library: list[tuple[str, float]] = field(default_factory=list)
    by_thread: list[tuple[str, float]] = field(default_factory=list)
    by_stage: list[tuple[str, float]] = field(default_factory=list)
    raw_path: str = ""
    notes: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "samples": self.samples, "raw_path": self.raw_path, "notes": self.notes,
                "cumulative": [{"function": f, "share": s} for f, s in self.cumulative],
                "by_library": [{"library": lib, "share": s} for lib, s in self.by_library],
                "by_thread": [{"thread": t, "share": s} for t, s in self.by_thread],
                "by_stage": [{"stage": t, "share": s} for t, s in self.by_stage]}


class PySpy:
    """``py-spy record --pid`` around an interval; SIGINT makes it write its output."""

    def __init__(self, exe: str, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        self.cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--full-filenames",
                    "--threads", "--nonblocking", "--output", str(out)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = out.with_suffix(".log")

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {self.log.read_text(errors='replace')[-2000:]}")


class CProfiledWorker(WorkerProcess):
    """``python -m cProfile -o OUT -m dicomflow.cli worker``: SIGTERM ends it cleanly, writing OUT."""

    def __init__(self, env: dict[str, str], log_path: Path, out: Path) -> None:
        super().__init__(env, log_path)
        self.out = out

    def start(self) -> CProfiledWorker:
        out = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(self.out), "-m", "dicomflow.cli",
                                      "worker"], cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self


def _frame(text: str) -> tuple[str, str, str]:
    """``func (file:line)`` -> (func, file, line)."""
    name, _, rest = text.rpartition(" (")
    file, _, line = rest.rstrip(")").rpartition(":")
    return name, file, line


def _label(func: str, file: str) -> str:
    if file.startswith(str(REPO)):
        file = str(Path(file).relative_to(REPO))
    elif "/site-packages/" in file:
        file = file.split("/site-packages/", 1)[1]
    elif file.startswith(_STDLIB):
        file = "stdlib/" + str(Path(file).relative_to(_STDLIB))
    return f"{func} ({file})"


#: Frames that wrap the whole run (their cumulative time is mostly waiting): left out of cProfile's list.
_WRAPPERS = ("stdlib/asyncio/", "stdlib/selectors.py", "<frozen", "click/", "faust/cli/", "mode/worker.py",
             "mode/services.py", "_contextvars.Context", "builtins.exec", "stdlib/runpy.py",
             "stdlib/cProfile.py", "stdlib/threading.py", "dicomflow/cli.py", "streams/app.py",
             "App.main (")


def _stage(thread: str, frames: list[tuple[str, str, str]], process: str = "") -> str:
    """Which part of the worker a sample belongs to (first matching rule).

    Agents run as asyncio tasks, so a sample inside an agent's coroutine (its stream
    iteration, Faust's per-event work for it, its sends) is charged to that agent. With
    ``--subprocesses``, samples of the ingest parse pool come with another process.
    """
    files = {(func, "/".join(Path(file).parts[-2:])) for func, file, _ in frames}
    in_file = {f for _, f in files}
    if process == "pool":
        return "ingest parse pool (other processes: header read, extract, encode)"
    if thread != "MainThread":
        return "other threads (Faust's aiokafka consumer thread)"
    if "agents/ingest.py" in in_file or "agents/fanout.py" in in_file:
        if "agents/fanout.py" in in_file:
            return "ingest: fanout in the worker (no pool)"
        if "faust/topics.py" in in_file or "agents/lanes.py" in in_file:
            return "ingest: sending the outputs"
        return "ingest: batching, agent loop"
    if ("request_flushes", "agents/series.py") in files:
        return "series: flush timer"
    if "agents/series.py" in in_file:
        return "series window agent"
    if "agents/postgres_sink.py" in in_file:
        return "PostgreSQL sink agent"
    if ("tick", "sinks/doris_batches.py") in files:
        return "Doris sinks: flush timer (loads)"
    if "agents/doris_sink.py" in in_file:
        return "Doris sink agents (3)"
    if "agents/monitoring.py" in in_file:
        return "lag gauge"
    if any("aiokafka/producer" in file for _, file, _ in frames):
        return "producer (aiokafka sender, outside agents)"
    if any(part in file for _, file, _ in frames for part in ("faust/transport/", "faust/tables/")):
        return "Faust consumer/conductor/tables (outside agents)"
    if any("aiokafka/" in file for _, file, _ in frames):
        return "aiokafka other (main thread)"
    return "event loop + Faust/mode plumbing"


def summarize_py_spy(path: Path, top: int = 25, main_pid: int | None = None) -> Profile:
    """Shares of ``path`` (py-spy raw); with ``--subprocesses``, processes other than ``main_pid`` are the pool."""
    cumulative: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    main = str(main_pid) if main_pid else ""
    idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        process = ""
        # --subprocesses: 'process PID:"cmdline";' per level (a child's line names its parent first;
        # a cmdline may hold ';').
        if owners := _PROCESS.match(stack):
            pid = _PROCESS_PID.findall(owners.group(0))[-1]
            stack = stack[owners.end():]
            main = main or pid
            process = "" if pid == main else "pool"
        parts = stack.split(";")
        thread = parts[0].partition(": ")[2] or parts[0] if parts and parts[0].startswith("thread (") else "?"
        frames = [_frame(f) for f in parts if not f.startswith("thread (")]
        if frames and _waiting(*frames[-1][:2]):
            idle += count
            continue
        total += count
        threads[thread] += count
        stages[_stage(thread, frames, process)] += count
        for label in {_label(func, file) for func, file, _ in frames}:
            cumulative[label] += count
        lib = next((lib for func, file, _ in reversed(frames) if (lib := library_of(file, func))), "other")
        libraries[_group(lib)] += count
    if not total:
        return Profile("py-spy", 0, raw_path=str(path), notes="no samples")
    kept = [(f, n / total) for f, n in cumulative.most_common() if not any(w in f for w in _WRAPPERS)]
    return Profile("py-spy", total, kept[:top], [(lib, n / total) for lib, n in libraries.most_common()],
                   [(t, n / total) for t, n in threads.most_common()],
                   [(t, n / total) for t, n in stages.most_common()], raw_path=str(path),
                   notes=f"shares of sampled CPU time over all threads ({idle} samples waiting in epoll, a pipe or a "
                   "condition excluded); run-wide wrappers "
                   "(event loop, CLI, mode services) left out of the cumulative list")


def _fallback(file: str, func: str) -> str:
    """cProfile has no caller attribution: name what :func:`library_of` charges to the caller."""
    if file == "~":
        return "C builtins (io, isinstance, ...)"
    if file.startswith("<frozen"):
        return "imports"
    return "stdlib (other)"


def summarize_pstats(path: Path, top: int = 25) -> Profile:
    stats = pstats.Stats(str(path))
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    libraries: Counter[str] = Counter()
    for (file, _line, func), (_cc, _nc, tottime, _ct, _callers) in table.items():
        libraries[_group(library_of(file, func) or _fallback(file, func))] += tottime
    idle = libraries.pop("idle (epoll wait)", 0.0)
    busy = sum(libraries.values())
    rows = sorted(table.items(), key=lambda kv: kv[1][3], reverse=True)
    cumulative = []
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in rows:
        label = _label(func, file) if file != "~" else func
        if not any(w in label for w in _WRAPPERS) and "epoll" not in label:
            cumulative.append((label, ct / busy))
        if len(cumulative) == top:
            break
    return Profile("cProfile", busy, cumulative,
                   [(lib, t / busy) for lib, t in libraries.most_common()] if busy else [], raw_path=str(path),
                   notes=f"main thread only, whole worker life incl. start-up; {idle:.1f}s idle in epoll excluded; "
                   "run-wide wrappers (event loop, CLI, mode services) left out of the cumulative list")
