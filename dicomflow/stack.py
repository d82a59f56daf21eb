"""``dicomflow up``: the whole stack on one machine, with nothing installed but dicomflow.

Starts what is not configured externally (the Tansu broker, PostgreSQL from the
pgserver wheel), then the worker(s) and the SCP as child processes, and prints where each
listens. It supervises them: a child that dies is restarted with backoff while the rest
keeps serving. Ctrl-C/SIGTERM drains: first the SCP stops accepting associations, then
the workers finish and flush what is in flight (bounded, with a progress line), and only
then PostgreSQL and the broker stop. Children die with ``up`` even when it is killed
(dicomflow/lifeline.py). The addresses, pids and restarts are written to
``$DICOMFLOW_HOME/stack.json`` for ``dicomflow status``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import BrokerError, DicomflowError
from core.settings import Settings, child_env, mask_dsn
from dicomflow.embedded.broker import EmbeddedBroker, embedded_broker_for
from dicomflow.lifeline import tied_to

__all__ = ["Stack", "StackError", "read_stack_file", "write_private", "RELAY_NOT_DRAINED"]

log = logging.getLogger(__name__)

STACK_FILE = "stack.json"


class StackError(DicomflowError):
    """The stack cannot start as asked (e.g. another one runs on the same home)."""

    code = "STACK"


def read_stack_file(home: Path) -> dict[str, Any]:
    try:
        data = json.loads((home / STACK_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only, from its first byte on.

    The file is created 0600 with O_EXCL under a temporary name and renamed over ``path``,
    so no other user can ever open it, not even between creation and a chmod.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class Child:
    """One supervised process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    #: When a dead child is due to start again (monotonic), or None while it runs.
    restart_at: float | None = None
    last_exit: int | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


#: Restart backoff: 1 s, doubling to 30 s; a child that ran this long starts over at 1 s.
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
#: How long the SCP and the workers get to finish what is in flight when the stack stops.
SCP_GRACE_S = 15.0
#: How often `up` checks that the embedded broker and PostgreSQL still run.
SERVER_CHECK_S = 3.0
DRAIN_S = 60.0
#: The relay's exit code when it stopped before the pipeline drained (nothing is lost: the next
#: relay publishes again from the checkpoint), which makes `up` put off a broker recycle.
RELAY_NOT_DRAINED = 3
#: How often `up` looks at the embedded broker's memory, and how long it waits after a recycle
#: that could not drain before it tries again.
RECYCLE_CHECK_S = 10.0
RECYCLE_RETRY_S = 60.0
RECYCLE_MIN_INTERVAL_S = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Stack:
    settings: Settings
    workers: int = 1
    echo: Any = print
    broker: EmbeddedBroker | None = None
    postgres: Any = None
    children: list[Child] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _stopping: bool = False
    #: A second stop signal: children are killed at once instead of drained (the journal and
    #: the index keep what was acknowledged, as after any SIGKILL).
    _hurry: bool = False
    _supervising: bool = False
    _next_server_check: float = 0.0
    _next_recycle_check: float = 0.0
    _last_recycle: float = 0.0
    _recycling: bool = False
    recycles: int = 0

    def check_not_running(self) -> None:
        """Refuse to start over a live stack on the same home; say what to do."""
        pid = read_stack_file(self.settings.home).get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            raise StackError(f"a dicomflow stack is already running on DICOMFLOW_HOME={self.settings.home} "
                             f"(up pid {pid}); stop it first (Ctrl-C in its terminal, or kill {pid})")

    def start(self) -> dict[str, Any]:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True)
        s.storage_root.mkdir(parents=True, exist_ok=True)
        self.check_not_running()
        env = child_env()
        env["DICOMFLOW_HOME"] = str(s.home)
        env["DICOMFLOW_STORAGE_ROOT"] = str(s.storage_root)
        if s.broker is None:
            self.broker = embedded_broker_for(s)
            if self.broker is None:
                raise BrokerError(f"port {s.embedded_broker_port} is already in use: another dicomflow stack "
                                  "(maybe a stale one on this DICOMFLOW_HOME) or another program; stop it, "
                                  "or set DICOMFLOW_EMBEDDED_BROKER_PORT")
            env["DICOMFLOW_BROKER"] = self.broker.url
            env["DICOMFLOW_BROKER_PROFILE"] = "tansu"
            # The broker keeps nothing: feeders acknowledge once the journal has an event.
            env["DICOMFLOW_JOURNAL"] = "1"
        broker_url = env.get("DICOMFLOW_BROKER", s.broker_url)
        if s.postgres_dsn is None:
            from dicomflow.embedded.postgres import EmbeddedPostgres

            self.postgres = EmbeddedPostgres(s.home / "postgres").start()
            dsn = self.postgres.dsn
            env["DICOMFLOW_POSTGRES_DSN"] = dsn
        else:
            dsn = s.postgres_dsn.get()
        for i in range(self.workers):
            if self._stopping:
                break  # asked to stop while starting: start nothing more (see request_stop)
            wenv = dict(env, DICOMFLOW_WEB_PORT=str(s.web_port + i), DICOMFLOW_WORKER_ID=f"{s.worker_id}-{i}")
            self._spawn(Child(f"worker-{i}", [sys.executable, "-m", "dicomflow.cli", "worker"], wenv))
        if (env.get("DICOMFLOW_JOURNAL") == "1" or s.journal) and not self._stopping:
            self._spawn(Child("relay", [sys.executable, "-m", "dicomflow.cli", "relay"], env))
        if not self._stopping:
            self._spawn(Child("scp", [sys.executable, "-m", "dicomflow.cli", "scp"], env))
        self.info = {
            "pid": os.getpid(),
            "broker": broker_url,
            "broker_embedded": self.broker is not None,
            "postgres_dsn": mask_dsn(dsn),
            "postgres_embedded": self.postgres is not None,
            "scp": {"aet": s.scp_aet, "host": s.scp_host, "port": s.scp_port},
            "workers": [{"web": f"http://127.0.0.1:{s.web_port + i}",
                         "metrics": f"http://127.0.0.1:{s.web_port + i}/metrics"} for i in range(self.workers)],
            "doris": s.doris_fe_url or "off (records stay in the topics)",
            "storage_root": str(s.storage_root),
            "logs": str(s.home / "logs"),
        }
        self._write_state()
        # The unmasked DSN stays in a file only the owner can read, for `status`.
        write_private(s.home / "postgres.dsn", dsn)
        return self.info

    def _write_state(self) -> None:
        self.info["children"] = {c.name: {"pid": c.proc.pid if c.proc else None, "running": c.running,
                                          "restarts": c.restarts, "last_exit": c.last_exit}
                                 for c in self.children}
        # Atomic: the relay and `status` read it at any moment.
        path = self.settings.home / STACK_FILE
        tmp = path.with_name(f".{STACK_FILE}.tmp")
        tmp.write_text(json.dumps(self.info, indent=2))
        os.replace(tmp, path)

    def _spawn(self, child: Child) -> None:
        logs = self.settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{child.name}.log", "ab") as out:  # the child keeps its own descriptor
            child.proc = subprocess.Popen(child.argv, env=child.env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          preexec_fn=tied_to(os.getpid()))
        child.started = time.monotonic()
        child.restart_at = None
        if child not in self.children:
            self.children.append(child)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """The SCP accepting associations is the last thing to come up.

        Read from its log rather than by probing the port: pynetdicom keeps a bare TCP probe
        as an association slot until its 30 s timeout, and that also delays shutdown.
        """
        log_file = self.settings.home / "logs" / "scp.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping:
            try:
                if "scp listening" in log_file.read_text(errors="replace"):
                    return True
            except OSError:
                pass
            if any(c.proc is not None and c.proc.poll() is not None for c in self.children):
                return False
            time.sleep(0.2)
        return False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        """SIGINT/SIGTERM: drain and stop (honoured by :meth:`supervise`, also if it came first).
        A second one hurries the stop: children still running are killed, not waited for."""
        if self._stopping:
            if not self._hurry:
                self._hurry = True
                _say("dicomflow: stop asked again: killing what is still running (nothing acknowledged is "
                     "lost: the journal and the index keep it)")
            return
        self._stopping = True
        if not self._supervising:
            # The stack is still starting (PostgreSQL's first start takes a while): say it was heard.
            _say("dicomflow: stop asked while starting: nothing more is started; what started drains "
                 "and stops (ask again to kill it)")

    def catch_stop_signals(self) -> None:
        """Take SIGINT and SIGTERM as a stop request from now on. Installed before the stack
        starts: a stop asked while it starts (a service manager, Ctrl-C) must drain what started,
        not kill `up` with its children half up."""
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)

    def supervise(self) -> int:
        """Keep the children running until a signal; then drain and stop. Returns an exit code."""
        self.catch_stop_signals()
        self._supervising = True
        while not self._stopping:
            self.tend(time.monotonic())
            time.sleep(0.2)
        self.stop()
        return 0

    def _tend_servers(self, now: float) -> None:
        """A dead embedded broker or PostgreSQL is started again (checked every few seconds).

        A new broker is empty: the relay and the workers restart with it, the relay publishes
        again from the journal's checkpoint, and every stage is idempotent for what it sees
        twice. PostgreSQL comes back with its data on the same port.
        """
        if now < self._next_server_check:
            return
        self._next_server_check = now + SERVER_CHECK_S
        if self.broker is not None and not self.broker.running():
            self.echo("dicomflow: the embedded broker died; starting a new one and restarting the relay and "
                      "the workers on it (the journal is published again from its checkpoint)")
            try:
                self.broker.start()
            except Exception as exc:  # never let supervision die: try again at the next check
                self.echo(f"dicomflow: the broker did not start again ({exc}); retrying")
                return
            for child in self.children:
                if child.name != "scp" and child.running:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        if self.postgres is not None and not self.postgres.running():
            self.echo("dicomflow: the embedded PostgreSQL stopped; starting it again")
            try:
                self.postgres.start()
            except Exception as exc:  # never let supervision die: try again at the next check
                self.echo(f"dicomflow: PostgreSQL did not start again ({exc}); retrying")

    def _tend_broker_memory(self, now: float) -> None:
        """Recycle the embedded broker once its memory passes the cap (it never frees anything)."""
        cap = self.settings.broker_recycle_mb * 1024 * 1024
        if self.broker is None or now < self._next_recycle_check:
            return
        if cap <= 0:
            cap = 1 << 62  # never recycle, but keep reporting the broker's memory
        self._next_recycle_check = now + RECYCLE_CHECK_S
        rss = self.broker.rss_bytes()
        if self.recycles and now - self._last_recycle < RECYCLE_MIN_INTERVAL_S:
            # A broker that starts above the cap (say, many restored dead letters) must not be
            # recycled over and over: at most once per interval.
            cap = 1 << 62
        self.info["broker_memory"] = {"pid": self.broker.pid, "rss_mb": round(rss / 2**20, 1),
                                      "recycle_mb": self.settings.broker_recycle_mb}
        self._write_state()
        if rss > cap:
            self.recycle_broker(f"its memory is {rss / 2**20:.0f} MB, above DICOMFLOW_BROKER_RECYCLE_MB="
                                f"{self.settings.broker_recycle_mb}")

    def recycle_broker(self, reason: str) -> bool:
        """Replace the embedded broker with an empty one, at a drained point, losing nothing.

        The SCP keeps accepting meanwhile: it acknowledges from the journal, not the broker.
        1. The relay stops publishing and waits until the pipeline has processed everything it
           published (no lag, every series window flushed), archives the dead letters and
           checkpoints; if it cannot within its drain time, the recycle is put off.
        2. The workers stop (they have nothing in flight), the broker is replaced, and the
           workers and the relay start on the new one; the relay publishes the journal from the
           checkpoint on (what the SCP accepted meanwhile) and restores the dead letters.
        Returns True when the broker was replaced.
        """
        self._recycling = True
        try:
            return self._recycle_broker(reason)
        finally:
            self._recycling = False

    def _recycle_broker(self, reason: str) -> bool:
        assert self.broker is not None
        relay = [c for c in self.children if c.name == "relay"]
        workers = [c for c in self.children if c.name not in ("scp", "relay")]
        if len(relay) != 1 or not relay[0].running or not all(c.running for c in workers):
            # A child is down: supervision restarts it first; only a running relay can say "drained".
            return False
        started = time.monotonic()
        self.echo(f"dicomflow: recycling the embedded broker ({reason}); draining the pipeline first, "
                  "the SCP keeps accepting")
        relay[0].last_exit = None
        self._terminate(relay, self.settings.relay_drain_seconds + 5.0, "the pipeline to drain")
        if relay[0].last_exit != 0 or self._stopping:
            if not self._stopping:
                self.echo(f"dicomflow: the pipeline did not drain (relay exit code {relay[0].last_exit}); broker "
                          f"recycle put off {RECYCLE_RETRY_S:.0f} s (nothing is lost)")
            self._spawn(relay[0])  # on the same broker it goes on after what it published there
            self._next_recycle_check = time.monotonic() + RECYCLE_RETRY_S
            self._write_state()
            return False
        self._terminate(workers, DRAIN_S, "the workers to stop")
        self.broker.stop()
        try:
            self.broker.start()
        except Exception as exc:  # the server check starts it again; never take the stack down here
            self.echo(f"dicomflow: the new broker did not start ({exc}); retrying")
        for c in workers + relay:
            self._spawn(c)
        self.recycles += 1
        self._last_recycle = time.monotonic()
        self.info["broker_recycles"] = self.recycles
        self._write_state()
        self.echo(f"dicomflow: embedded broker recycled in {time.monotonic() - started:.1f} s "
                  f"(recycle {self.recycles})")
        return True

    def tend(self, now: float) -> None:
        """Notice dead children and restart them when their backoff has passed."""
        self._tend_servers(now)
        if not self._stopping:
            self._tend_broker_memory(now)
        self._tend_children(now, self.children)

    def _tend_children(self, now: float, children: list[Child]) -> None:
        changed = False
        for child in children:
            if child.proc is not None and child.restart_at is None and child.proc.poll() is not None:
                child.last_exit = child.proc.returncode
                ran = now - child.started
                if ran >= HEALTHY_AFTER_S:
                    child.restarts = 0
                delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** child.restarts)
                child.restart_at = now + delay
                child.restarts += 1
                self.echo(f"dicomflow: {child.name} exited with code {child.last_exit} after {ran:.0f} s; "
                          f"restarting it in {delay:.0f} s (restart {child.restarts}; see "
                          f"{self.settings.home / 'logs' / (child.name + '.log')})")
                changed = True
            elif child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
                self.echo(f"dicomflow: {child.name} restarted (pid {child.proc.pid if child.proc else '?'})")
                changed = True
        if changed:
            self._write_state()

    def stop(self) -> None:
        """Drain, in order: the SCP stops accepting, the workers flush, then PostgreSQL and the broker."""
        self.echo("dicomflow: stopping: the SCP stops accepting, then the pipeline drains and stops "
                  f"(at most {SCP_GRACE_S + self.settings.relay_drain_seconds + 5 + DRAIN_S:.0f} s)")
        scp = [c for c in self.children if c.name == "scp"]
        relay = [c for c in self.children if c.name == "relay"]
        workers = [c for c in self.children if c.name not in ("scp", "relay")]
        self._terminate(scp, SCP_GRACE_S, "the SCP to finish its associations")
        # The relay publishes the rest of the journal and checkpoints once the workers have
        # processed it all; the workers must still run meanwhile.
        self._terminate(relay, self.settings.relay_drain_seconds + 5.0, "the pipeline to drain")
        self._terminate(workers, DRAIN_S, "the workers to flush what is in flight")
        self.children.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        with contextlib.suppress(OSError):
            (self.settings.home / STACK_FILE).unlink()

    def _terminate(self, children: list[Child], grace: float, what: str) -> None:
        live = [c for c in children if c.running]
        for c in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        started = time.monotonic()
        next_note = started + 5.0
        while live:
            for c in live:
                if not c.running and c.proc is not None:
                    c.last_exit = c.proc.returncode
            live = [c for c in live if c.running]
            now = time.monotonic()
            if live and (now >= started + grace or self._hurry):
                for c in live:
                    log.warning("%s: killing it (%s)", c.name,
                                "stop asked again" if self._hurry else f"did not stop within {grace:.0f} s")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(c.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                    c.proc.wait()  # type: ignore[union-attr]
                    c.last_exit = c.proc.returncode  # type: ignore[union-attr]
                break
            if self._recycling and not self._stopping:
                # A recycle takes a while: the SCP must keep being served (restarted if it dies).
                self._tend_children(now, [c for c in self.children if c.name == "scp"])
            if live and now >= next_note:
                self.echo(f"dicomflow: waiting for {what} ({', '.join(c.name for c in live)}, "
                          f"{now - started:.0f} s of {grace:.0f} s)")
                next_note = now + 5.0
            time.sleep(0.1)


def _say(line: str) -> None:
    """A line on stderr from a signal handler: one unbuffered write, never a reentrant print."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())
