"""The embedded PostgreSQL 16: the server binaries shipped inside the pgserver wheel.

Persistent: ``datadir`` holds the cluster, so stopping and starting again (in this
process or a later one) finds the same data. The server listens on 127.0.0.1 only,
on a TCP port that stays the same across restarts of one ``datadir`` (the DSN a sink
holds keeps working after a restart), with SCRAM password authentication and a random
password generated at ``initdb`` time.

We drive ``initdb``/``pg_ctl`` ourselves instead of ``pgserver.get_server``: that API
listens on a unix socket only, stops the server from an ``atexit`` hook shared by every
handle, and caches one handle per directory, which together make "stop now, start
again later" awkward. Its root handling is reproduced: PostgreSQL refuses to run as
root, so as root the cluster is owned by and run as an unprivileged system user
(``pgserver``, the name the wheel itself uses, created with ``useradd`` if missing).
That user must be able to traverse every ancestor of ``datadir`` for as long as the
server runs: ``start()`` adds the search bit (o+x) where missing, but something that
later resets an ancestor to 0700 (pytest does so to ``/tmp/pytest-of-<user>`` at each
session start) cuts the running server off from its files.

Layout of ``datadir``::

    pgdata/        the cluster (owned by the server's user)
    postgres.log   server log
    password       the ``postgres`` role's password (mode 0600)
    port           the TCP port, reused by the next start
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Literal
from urllib.parse import quote

from core.errors import DicomflowError
from core.settings import child_env
from dicomflow.embedded.ports import free_port, wait_for_port

__all__ = ["EmbeddedPostgres", "postgres_bin_dir"]

log = logging.getLogger(__name__)

ERROR_CODE = "EMBEDDED_POSTGRES"
SYSTEM_USER = "pgserver"
HOST = "127.0.0.1"

StopMode = Literal["smart", "fast", "immediate"]


def postgres_bin_dir() -> Path:
    """``bin/`` of the PostgreSQL build inside the pgserver wheel.

    Located without importing pgserver: its import creates runtime directories and lock
    objects we do not use.
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise DicomflowError("pgserver is not installed: pip install pgserver", code=ERROR_CODE)
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise DicomflowError(f"no PostgreSQL binaries in the pgserver wheel at {bin_dir}", code=ERROR_CODE)
    return bin_dir


class EmbeddedPostgres:
    """PostgreSQL 16 on 127.0.0.1 with its cluster in ``datadir``.

    ``__init__`` only stores configuration; ``start()`` creates the cluster on first use
    and launches the server; ``stop()`` shuts it down, keeping the data.
    """

    def __init__(
        self,
        datadir: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        run_as: str | None = None,
    ) -> None:
        """``settings`` are extra ``postgres -c`` options (e.g. ``fsync=off`` for tests).

        ``run_as`` names the system user that owns and runs the cluster when this
        process is root (default ``pgserver``); ignored otherwise.
        """
        self.datadir = Path(datadir)
        self.port = port
        self.settings = dict(settings or {})
        self.run_as = run_as or SYSTEM_USER
        self.user = "postgres"
        self._password: str | None = None

    @property
    def pgdata(self) -> Path:
        return self.datadir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.datadir / "postgres.log"

    @property
    def dsn(self) -> str:
        """DSN of the ``postgres`` database (contains the password: wrap it in a Secret)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        if self.port is None or self._password is None:
            raise DicomflowError("embedded PostgreSQL has not been started", code=ERROR_CODE)
        return (f"postgresql://{self.user}:{quote(self._password, safe='')}@{HOST}:{self.port}/"
                f"{quote(database, safe='')}")

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        """Create the cluster if needed and start the server; adopt one already running."""
        bin_dir = postgres_bin_dir()
        self.datadir.mkdir(parents=True, exist_ok=True)
        owner = self._server_user(create=True)
        if owner is not None:
            _grant_binaries(bin_dir)
            _grant_traverse(self.datadir)
        self._password = self._load_password(owner)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, owner, timeout)

        running_port = self._settled_running_port(bin_dir, owner, timeout)
        if running_port is not None:
            # A server left running by an earlier process (cleanup_mode=None style): adopt it
            # rather than fail on the postmaster.pid lock.
            self.port = running_port
            self._save_port()
            log.info("embedded postgres already running pgdata=%s port=%s", self.pgdata, self.port)
            return self

        self.port = self._choose_port()
        self._save_port()
        if not self.log_path.exists():
            self.log_path.touch(mode=0o640)
        if owner is not None:
            os.chown(self.log_path, owner.pw_uid, owner.pw_gid)
        options = [f"-c listen_addresses={HOST}", f"-c port={self.port}",
                   # TCP only: socket paths under a deep datadir can exceed the 107-byte limit.
                   "-c unix_socket_directories=''"]
        # pg_ctl hands -o to /bin/sh: quote values such as "search_path='a, b'".
        options += [f"-c {shlex.quote(f'{name}={value}')}" for name, value in self.settings.items()]
        try:
            self._run(bin_dir / "pg_ctl", ["-D", str(self.pgdata), "-l", str(self.log_path), "-w",
                                           "-t", str(int(timeout)), "-o", " ".join(options), "start"],
                      owner, timeout + 5)
        except DicomflowError as exc:
            raise DicomflowError(f"{exc.message}; server log tail:\n{self._log_tail()}",
                                 code=ERROR_CODE) from None
        # pg_ctl -w waits for postmaster.pid to say "ready"; the port check guards against
        # the rare case where the listener is not yet accepting.
        if not wait_for_port(HOST, self.port, timeout):
            raise DicomflowError(f"embedded PostgreSQL did not listen on {HOST}:{self.port}",
                                 code=ERROR_CODE)
        log.info("embedded postgres started pgdata=%s port=%s run_as=%s", self.pgdata, self.port,
                 owner.pw_name if owner else "self")
        return self

    def stop(self, *, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Shut the server down; the data stays. ``immediate`` simulates a crash."""
        if not (self.pgdata / "PG_VERSION").exists():
            return
        bin_dir = postgres_bin_dir()
        owner = self._server_user(create=False)
        if self._running_port(bin_dir, owner) is None:
            return
        self._run(bin_dir / "pg_ctl", ["-D", str(self.pgdata), "-w", "-t", str(int(timeout)),
                                       "-m", mode, "stop"], owner, timeout + 5)
        log.info("embedded postgres stopped pgdata=%s mode=%s", self.pgdata, mode)

    def running(self) -> bool:
        """A server runs on this cluster and answers on its port (a killed postmaster can linger
        in the lock file, or as a zombie, for a while: that is not running)."""
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        port = self._running_port(postgres_bin_dir(), self._server_user(create=False))
        return port is not None and wait_for_port(HOST, port, 1.0)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------

    def _server_user(self, *, create: bool) -> pwd.struct_passwd | None:
        """The account that owns the cluster, or None to run as ourselves (not root).

        Only ``start()`` may create it; elsewhere a missing user is an error.
        """
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError:
            if not create:
                raise DicomflowError(f"system user {self.run_as!r} of embedded PostgreSQL does not exist",
                                     code=ERROR_CODE) from None
        useradd = shutil.which("useradd")
        if useradd is None:
            raise DicomflowError(
                f"PostgreSQL refuses to run as root and system user {self.run_as!r} does not exist; "
                "create it or run as a non-root user", code=ERROR_CODE)
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        self.run_as], check=True, capture_output=True)
        log.info("created system user=%s for embedded postgres", self.run_as)
        return pwd.getpwnam(self.run_as)

    def _load_password(self, owner: pwd.struct_passwd | None) -> str:
        path = self.datadir / "password"
        if path.exists():
            return path.read_text().strip()
        if (self.pgdata / "PG_VERSION").exists():
            raise DicomflowError(f"{path} is missing: cannot log in to the existing cluster",
                                 code=ERROR_CODE)
        password = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        return password

    def _initdb(self, bin_dir: Path, owner: pwd.struct_passwd | None, timeout: float) -> None:
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        pwfile = self.datadir / ".initdb-pw"
        pwfile.write_text((self._password or "") + "\n")
        pwfile.chmod(0o600)
        if owner is not None:
            os.chown(self.pgdata, owner.pw_uid, owner.pw_gid)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        try:
            self._run(bin_dir / "initdb", ["-D", str(self.pgdata), "-U", self.user, "--pwfile", str(pwfile),
                                           "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                                           "--encoding=UTF8", "--no-locale", "--no-instructions"],
                      owner, timeout)
        finally:
            pwfile.unlink(missing_ok=True)
        log.info("embedded postgres initialised pgdata=%s", self.pgdata)

    def _settled_running_port(self, bin_dir: Path, owner: pwd.struct_passwd | None, timeout: float) -> int | None:
        """Like :meth:`_running_port`, for a server that must also answer on its port.

        Right after a crash (SIGKILL, power loss of the stack) the lock file can still name a
        postmaster that is dying, or a zombie not yet reaped: ``pg_ctl status`` then says
        "running" although nothing listens. Wait until it either listens or is gone.
        """
        deadline = time.monotonic() + timeout
        while True:
            port = self._running_port(bin_dir, owner)
            if port is None or wait_for_port(HOST, port, 0.5):
                return port
            if time.monotonic() > deadline:
                raise DicomflowError(f"a PostgreSQL server is registered in {self.pgdata} but does not answer "
                                     f"on port {port}; stop it, or remove a stale postmaster.pid",
                                     code=ERROR_CODE)
            time.sleep(0.5)

    def _running_port(self, bin_dir: Path, owner: pwd.struct_passwd | None) -> int | None:
        """The port of a live server on this cluster, or None."""
        status = _spawn([str(bin_dir / "pg_ctl"), "-D", str(self.pgdata), "status"], owner,
                        cwd=self.datadir, timeout=30, stdout=subprocess.DEVNULL)
        if status.returncode != 0:
            return None
        # postmaster.pid line 4 is the port (documented layout of the lock file).
        try:
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, IndexError, ValueError):
            return None

    def _choose_port(self) -> int:
        if self.port is not None:
            return self.port
        saved = self.datadir / "port"
        if saved.exists():
            try:
                port = int(saved.read_text().strip())
            except ValueError:
                port = 0
            # The same port as before when it frees up in time: after a crash, clients of the
            # stack still hold the old DSN, and the socket can linger for a moment.
            deadline = time.monotonic() + 15.0
            while port and not _port_free(port) and time.monotonic() < deadline:
                time.sleep(0.25)
            if port and _port_free(port):
                return port
        return free_port()

    def _save_port(self) -> None:
        (self.datadir / "port").write_text(f"{self.port}\n")

    def _run(self, exe: Path, args: list[str], owner: pwd.struct_passwd | None, timeout: float) -> None:
        # Output goes to a file, not a pipe: pg_ctl's daemonised postmaster inherits the
        # descriptors, and a pipe would never reach EOF (the hang pgserver warns about).
        out_path = self.datadir / "pg_ctl.out"
        with open(out_path, "w+b") as out:
            if owner is not None:
                os.fchown(out.fileno(), owner.pw_uid, owner.pw_gid)
            try:
                proc = _spawn([str(exe), *args], owner, cwd=self.datadir, timeout=timeout, stdout=out)
            except subprocess.TimeoutExpired:
                raise DicomflowError(f"{exe.name} timed out after {timeout:.0f}s", code=ERROR_CODE) from None
            out.seek(0)
            output = out.read().decode("utf-8", "replace").strip()
        if proc.returncode != 0:
            raise DicomflowError(f"{exe.name} failed rc={proc.returncode}: {output}", code=ERROR_CODE)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _spawn(cmd: list[str], owner: pwd.struct_passwd | None, *, cwd: Path, timeout: float,
           stdout: int | IO[bytes]) -> subprocess.CompletedProcess[bytes]:
    """Run a PostgreSQL tool, as ``owner`` when given (we are root then)."""
    return subprocess.run(
        cmd, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout,
        env=_env(), cwd=cwd,
        user=owner.pw_uid if owner else None, group=owner.pw_gid if owner else None,
        # [] drops root's supplementary groups along with its uid/gid.
        extra_groups=[] if owner else None,
    )


def _env() -> dict[str, str]:
    # PG* variables of the caller (PGPORT, PGDATA, ...) must not leak into initdb/pg_ctl.
    env = child_env(drop_prefixes=("PG",))
    env["LC_ALL"] = "C"
    return env


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As PostgreSQL binds: a port of our own stopped server lingering in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _grant_traverse(path: Path) -> None:
    """Let other users traverse ``path`` and its ancestors (search bit only, never read)."""
    resolved = path.resolve()
    for parent in (resolved, *resolved.parents):
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
            log.info("granted o+x for embedded postgres path=%s", parent)


def _grant_binaries(bin_dir: Path) -> None:
    """Make the wheel's PostgreSQL build usable by the unprivileged server user.

    Wheels normally install world-readable; this only fixes installs that are not
    (umask 077 environments), touching nothing that is already readable.
    """
    install = bin_dir.parent
    _grant_traverse(install)
    for root, dirs, files in os.walk(install):
        for name in dirs:
            p = Path(root, name)
            mode = p.stat().st_mode
            want = mode | stat.S_IROTH | stat.S_IXOTH
            if mode != want:
                p.chmod(want)
        for name in files:
            p = Path(root, name)
            mode = p.stat().st_mode
            want = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if mode != want:
                p.chmod(want)
    install_mode = install.stat().st_mode
    if not install_mode & stat.S_IXOTH:
        install.chmod(install_mode | stat.S_IROTH | stat.S_IXOTH)
