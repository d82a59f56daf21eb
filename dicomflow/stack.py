"""``dicomflow up``: the whole stack on one machine, with nothing installed but dicomflow.

Starts what is not configured externally (the Tansu broker, PostgreSQL from the
pgserver wheel), then the worker(s) and the SCP as child processes, prints where each
listens, and on Ctrl-C/SIGTERM stops them in reverse order. The addresses in use are
written to ``$DICOMFLOW_HOME/stack.json`` for ``dicomflow status``.
"""

from __future__ import annotations

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

from core.errors import BrokerError
from core.settings import Settings, child_env, mask_dsn
from dicomflow.embedded.broker import EmbeddedBroker, embedded_broker_for

__all__ = ["Stack", "read_stack_file"]

log = logging.getLogger(__name__)

STACK_FILE = "stack.json"


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
class Stack:
    settings: Settings
    workers: int = 1
    echo: Any = print
    broker: EmbeddedBroker | None = None
    postgres: Any = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    _stopping: bool = False

    def start(self) -> dict[str, Any]:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True)
        s.storage_root.mkdir(parents=True, exist_ok=True)
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
        broker_url = env.get("DICOMFLOW_BROKER", s.broker_url)
        if s.postgres_dsn is None:
            from dicomflow.embedded.postgres import EmbeddedPostgres

            self.postgres = EmbeddedPostgres(s.home / "postgres").start()
            dsn = self.postgres.dsn
            env["DICOMFLOW_POSTGRES_DSN"] = dsn
        else:
            dsn = s.postgres_dsn.get()
        for i in range(self.workers):
            wenv = dict(env, DICOMFLOW_WEB_PORT=str(s.web_port + i), DICOMFLOW_WORKER_ID=f"{s.worker_id}-{i}")
            self._spawn(f"worker-{i}", [sys.executable, "-m", "dicomflow.cli", "worker"], wenv)
        self._spawn("scp", [sys.executable, "-m", "dicomflow.cli", "scp"], env)
        info = {
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
        (s.home / STACK_FILE).write_text(json.dumps(info, indent=2))
        # The unmasked DSN stays in a file only the owner can read, for `status`.
        write_private(s.home / "postgres.dsn", dsn)
        return info

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        logs = self.settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child's lifetime
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.children.append((name, proc))

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """The SCP accepting associations is the last thing to come up.

        Read from its log rather than by probing the port: pynetdicom keeps a bare TCP probe
        as an association slot until its 30 s timeout, and that also delays shutdown.
        """
        log_file = self.settings.home / "logs" / "scp.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if "scp listening" in log_file.read_text(errors="replace"):
                    return True
            except OSError:
                pass
            if any(proc.poll() is not None for _, proc in self.children):
                return False
            time.sleep(0.2)
        return False

    def supervise(self) -> int:
        """Block until a signal or a child's death; then stop everything. Returns an exit code."""
        def on_signal(signum: int, frame: Any) -> None:
            self._stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        code = 0
        while not self._stopping:
            for name, proc in self.children:
                if proc.poll() is not None:
                    self.echo(f"dicomflow: {name} exited with code {proc.returncode}; stopping the stack "
                              f"(see {self.settings.home / 'logs' / (name + '.log')})")
                    self._stopping = True
                    code = 1
            time.sleep(0.2)
        self.stop()
        return code

    def stop(self) -> None:
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.children):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.children.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
