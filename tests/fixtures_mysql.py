"""MariaDB fixtures: Debian's mariadb-server run from a temporary data directory on a free port.

Never the system service: :class:`MariaDB` runs ``mariadb-install-db`` into its own
directory and starts ``mariadbd --no-defaults`` on 127.0.0.1 (as root with ``--user=root``:
the tests run as root here and in CI, and mariadbd refuses root without it). Durability
settings are relaxed (test data is disposable), except for a server a test crashes.

* ``mysql_server``: one server for the session; ``mysql_dsn``: a fresh, empty database on
  it for each test (dropped afterwards), as user ``dicomflow`` with a password (so masking
  is tested for real).
* ``index_db``: the series-index server of a test, parametrised over ``postgres`` and
  ``mysql``: every index semantics test runs on both.
* :func:`state_rows` reads dicom_state_meta back from either server.

A missing ``mariadbd`` is a failure, not a skip (``.ci/run`` installs mariadb-server).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncmy
import asyncpg
import pytest

from dicomflow.embedded.ports import free_port
from tests.fixtures_postgres import run_sync

__all__ = ["MariaDB", "IndexDb", "mysql_server", "mysql_dsn", "own_mysql", "index_db", "state_rows", "as_time"]

USER = "dicomflow"
PASSWORD = "Idx-S3cret"
# Commits reach the OS at once (=2): they survive a SIGKILL of mariadbd, only not an OS crash.
_FAST = ["--innodb-flush-log-at-trx-commit=2", "--innodb-doublewrite=0"]


def _binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"{name} not found: install Debian's mariadb-server (.ci/run does)")


class MariaDB:
    """A mariadbd of its own: ``start()`` (installing the data directory once), ``stop()``, ``kill()``."""

    def __init__(self, datadir: Path, *, port: int | None = None, durable: bool = False) -> None:
        self.datadir = datadir
        self.port = port or free_port()
        self.durable = durable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return self.dsn_for("dicomflow")

    def dsn_for(self, database: str) -> str:
        return f"mysql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> MariaDB:
        if self.running():
            return self
        data = self.datadir / "data"
        fresh = not (data / "mysql").exists()
        if fresh:
            data.mkdir(parents=True, exist_ok=True)
            subprocess.run([_binary("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           check=True, capture_output=True, timeout=120)
        log = open(self.datadir / "mariadbd.log", "ab")  # noqa: SIM115 - lives as long as the server
        args = [_binary("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.datadir / 'mysqld.sock'}",
                f"--pid-file={self.datadir / 'mysqld.pid'}", "--skip-name-resolve", "--skip-log-bin",
                "--innodb-buffer-pool-size=64M", "--max-connections=200", "--local-infile=1",
                f"--log-error={self.datadir / 'error.log'}"]
        if not self.durable:
            args += _FAST
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                self.admin("SELECT 1")
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mariadbd did not answer within {timeout}s: {self._log_tail()}") from None
                time.sleep(0.1)
        if fresh:
            self.admin(f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
                       f"GRANT ALL ON *.* TO '{USER}'@'%'", "CREATE DATABASE IF NOT EXISTS dicomflow")
        return self

    def stop(self) -> None:
        """A clean shutdown (SIGTERM)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: a crash; InnoDB recovers at the next start."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def admin(self, *statements: str) -> list[tuple[Any, ...]]:
        """Run statements as root over TCP; the last one's rows."""

        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncmy.connect(host="127.0.0.1", port=self.port, user="root", password="",
                                         connect_timeout=2, autocommit=True)
            try:
                rows: list[tuple[Any, ...]] = []
                async with conn.cursor() as cur:
                    for sql in statements:
                        await cur.execute(sql)
                        rows = list(await cur.fetchall() or [])
                return rows
            finally:
                conn.close()

        return run_sync(run)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.datadir / "error.log").read_text(errors="replace")[-2000:]
        return ""


def _new_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dicomflow-mariadb-"))


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[MariaDB]:
    root = _new_dir()
    server = MariaDB(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mysql_dsn(mysql_server: MariaDB) -> Iterator[str]:
    """DSN of an empty database created for this test."""
    if not mysql_server.running():
        mysql_server.start()  # a test that stopped the shared server must not break the next
    name = f"test_{uuid.uuid4().hex[:12]}"
    mysql_server.admin(f"CREATE DATABASE `{name}`")
    try:
        yield mysql_server.dsn_for(name)
    finally:
        if not mysql_server.running():
            mysql_server.start()
        mysql_server.admin(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def own_mysql() -> Iterator[MariaDB]:
    """A durable server this test may kill and restart without disturbing the shared one."""
    root = _new_dir()
    server = MariaDB(root, durable=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class IndexDb:
    """One test's series-index database: which server, and its DSN."""

    kind: str  # "postgres" or "mysql"
    dsn: str


@pytest.fixture(params=["postgres", "mysql"])
def index_db(request: pytest.FixtureRequest) -> IndexDb:
    fixture = "pg_dsn" if request.param == "postgres" else "mysql_dsn"
    return IndexDb(request.param, request.getfixturevalue(fixture))


def as_time(value: Any) -> Any:
    """MySQL drivers return TIME as a timedelta; the records hold a time of day."""
    if isinstance(value, timedelta):
        return (datetime.min + value).time()
    return value


async def _mysql_rows(dsn: str, sql: str) -> list[dict[str, Any]]:
    from sinks.mysql import connect_args

    conn = await asyncmy.connect(**connect_args(dsn), connect_timeout=5)
    try:
        async with conn.cursor(asyncmy.cursors.DictCursor) as cur:
            await cur.execute(sql)
            return [{k: as_time(v) for k, v in row.items()} for row in await cur.fetchall()]
    finally:
        conn.close()


async def state_rows(dsn: str) -> dict[str, dict[str, Any]]:
    """Every dicom_state_meta row of either server, keyed by series_uid ({} if the table is missing)."""
    from sinks.postgres import COLUMNS

    sql = f"SELECT {', '.join(COLUMNS)} FROM dicom_state_meta"  # noqa: S608 - constant columns
    if dsn.startswith("mysql://"):
        try:
            rows = await _mysql_rows(dsn, sql)
        except asyncmy.errors.ProgrammingError:
            return {}
        return {r["series_uid"]: r for r in rows}
    conn = await asyncpg.connect(dsn)
    try:
        fetched = await conn.fetch(sql)
    except asyncpg.UndefinedTableError:
        return {}
    finally:
        await conn.close()
    return {r["series_uid"]: dict(r) for r in fetched}
