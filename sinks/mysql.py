"""MySQL / MariaDB series index: the seeds' MySQL ``DbProvider``, with dicomflow's fixes.

The seeds upserted one row per statement with ``INSERT … ON DUPLICATE KEY UPDATE c = VALUES(c)``,
overwriting unconditionally, and rolled a whole list back on one bad row. Here, as in the
PostgreSQL sink (sinks/postgres.py):

* **Newest wins.** Every updated column is ``IF(guard, VALUES(c), c)`` with the guard
  ``(version, updated_time) <= (VALUES(version), VALUES(updated_time))``. MySQL assigns
  ON DUPLICATE KEY UPDATE columns left to right and later expressions see earlier
  assignments, so ``updated_time`` and then ``version`` come last: every other column is
  judged against the stored pair, and the guard stays true (or false) through both.
  ``created_time`` is never updated. ``VALUES()`` (not MySQL 8's row alias) because MariaDB
  has no row alias; MySQL 8 accepts it with a deprecation note.
* **Batches.** One multi-row INSERT per chunk of rows, in one transaction per batch.
* **Bad rows.** Strict SQL mode for the session (a value too long, out of range or NULL
  in a NOT NULL column is an error, never silently truncated). A refused statement is
  rolled back by itself (InnoDB's statement atomicity), so the batch is bisected inside
  the same transaction, the refused rows are returned naming MySQL's column, and the rest
  lands. Text MySQL could store but PostgreSQL cannot (NUL, lone surrogates) is refused
  here too: the index holds the same rows whichever server it is. A NaN or infinite number,
  which MySQL cannot store at all, is refused naming its column.
* **Errors classified** like PostgreSQL's: lost or refused connections, a server shutting
  down, deadlocks and lock timeouts are retried (the partition waits); anything else is
  retried with the alert counter ``unexpected_errors``. At the first start, a server that
  answers with a refusal (access denied, unknown database) is :class:`IndexRefusedError`,
  which the worker turns into one line naming the variable (agents/postgres_sink.py).

Driver: asyncmy rather than aiomysql. Both speak the protocol natively on asyncio with
PyMySQL's API and error classes; asyncmy's protocol and row decoding are compiled
(Cython), which is what a bulk upsert path spends its client time on, and it is the
maintained one of the two for current Python and MySQL 8 authentication
(``caching_sha2_password``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncmy
from asyncmy import errors as my_errors

from core.errors import Code, ConfigError, SinkDataError, SinkError, SinkRetryableError
from core.settings import Secret, mask_dsn
from schemas.records import DicomJsonMeta, DicomStateMeta
from sinks.base import BatchingSink, Rejected, SinkBatch, SinkItem
from sinks.index import JSON_COLUMNS, direct_batch, json_row, json_values, newest_json, save_one

__all__ = ["MySQLIndex", "IndexRefusedError", "UnexpectedMySQLError", "apply_mysql_schema", "connect_args",
           "load_mysql_schema_sql", "translate", "SESSION_SQL_MODE"]

log = logging.getLogger(__name__)

TABLE = "dicom_state_meta"
KEY_COLUMNS = ("tenant_id", "study_uid", "series_uid")
COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DicomStateMeta))
#: TIME columns (annotated ``time | None``): MySQL drivers return them as a timedelta.
_TIME_COLUMNS = frozenset(f.name for f in dataclasses.fields(DicomStateMeta) if str(f.type).startswith("time"))
#: Rows per INSERT statement: ~300 KB of SQL, far below the 16 MiB max_allowed_packet.
CHUNK = 500
#: Strict: refuse (never truncate or zero) what does not fit, as PostgreSQL does.
SESSION_SQL_MODE = ("STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,"
                    "NO_ENGINE_SUBSTITUTION")
_SCHEMA_LOCK = "dicomflow_schema"

_COLS = ", ".join(COLUMNS)
_ROW = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
_GUARD = "(version, updated_time) <= (VALUES(version), VALUES(updated_time))"
# The guard's own columns last (see the module docstring); created_time never.
_ASSIGN = [c for c in COLUMNS if c not in KEY_COLUMNS and c not in ("created_time", "updated_time", "version")]
_ASSIGN += ["updated_time", "version"]
_UPSERT_TAIL = " ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = IF({_GUARD}, VALUES({c}), {c})" for c in _ASSIGN)

_JSON_COLS = ", ".join(JSON_COLUMNS)
_JSON_ROW = "(" + ", ".join(["%s"] * len(JSON_COLUMNS)) + ")"
_JSON_ASSIGN = [c for c in JSON_COLUMNS if c not in KEY_COLUMNS and c not in ("created_time", "flag_time")]
_JSON_ASSIGN += ["flag_time"]
_JSON_TAIL = " ON DUPLICATE KEY UPDATE " + ", ".join(
    f"{c} = IF(flag_time <= VALUES(flag_time), VALUES({c}), {c})" for c in _JSON_ASSIGN)

# S608: every interpolated name is a constant of this module or a record field.
_SERIES_OF_STUDY = (f"SELECT {_COLS} FROM {TABLE} WHERE tenant_id = %s AND study_uid = %s "  # noqa: S608
                    "ORDER BY series_number IS NULL, series_number, series_uid")
# The seeds' UNION ALL of "no JSON row" and "JSON row with another flag_time" as one LEFT JOIN.
_STALE_JSON = (
    f"SELECT {', '.join('dsm.' + c for c in COLUMNS)} "  # noqa: S608
    f"FROM {TABLE} dsm LEFT JOIN dicom_json_meta djm "
    "ON dsm.tenant_id = djm.tenant_id AND dsm.study_uid = djm.study_uid AND dsm.series_uid = djm.series_uid "
    "WHERE (djm.tenant_id IS NULL OR dsm.updated_time <> djm.flag_time) AND dsm.updated_time < %s "
    "ORDER BY dsm.updated_time LIMIT %s"
)
_JSON_META = (f"SELECT {_JSON_COLS} FROM dicom_json_meta "  # noqa: S608
              "WHERE tenant_id = %s AND study_uid = %s AND series_uid = %s")

#: Refusals of the data itself (strict mode): isolate the rows, dead-letter them.
_DATA_ERRORS: tuple[type[BaseException], ...] = (my_errors.DataError, my_errors.IntegrityError)
#: The same batch may succeed later: connection refused/lost, server going away or shutting
#: down, too many connections, deadlock, lock wait timeout, query killed, read-only replica.
_TRANSIENT_CODES = frozenset({
    0, 1040, 1053, 1152, 1158, 1159, 1160, 1161, 1205, 1213, 1290, 1317, 1836, 1927, 2002, 2003, 2006, 2013,
    2014, 2055, 4031,
})
#: The server answered the connection with a refusal: a configuration error at start.
_REFUSED_CODES = frozenset({1044, 1045, 1049, 1698, 2005})
_COLUMN = re.compile(r"column '([^']+)'|column `[^`]*`\.`[^`]*`\.`([^`]+)`|column `([^`]+)`", re.IGNORECASE)
# MySQL quotes the refused value in some messages ("Incorrect integer value: 'x' for column"):
# patient data that must not reach logs or dead letters' reasons.
_QUOTED_VALUE = re.compile(r"value: '.*?' for", re.DOTALL)
_INFO = re.compile(rb"Records: (\d+)\s+Duplicates: (\d+)")


def load_mysql_schema_sql() -> str:
    """The idempotent DDL ``schemas/sql/mysql.sql``, read from the installed package."""
    return resources.files("schemas").joinpath("sql/mysql.sql").read_text(encoding="utf-8")


def _statements(script: str) -> list[str]:
    body = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


async def apply_mysql_schema(conn: Any, *, lock_timeout: int = 60) -> None:
    """Apply the DDL; safe any number of times, from any number of workers at once.

    ``GET_LOCK`` serialises concurrent workers (a CREATE TABLE IF NOT EXISTS racing its
    twin can fail on the data dictionary); the lock is the session's, released at the end
    or with the connection.
    """
    async with conn.cursor() as cur:
        await cur.execute("SELECT GET_LOCK(%s, %s)", (_SCHEMA_LOCK, lock_timeout))
        got = await cur.fetchone()
        if not got or got[0] != 1:
            raise SinkRetryableError(f"mysql: schema lock {_SCHEMA_LOCK!r} not granted within {lock_timeout} s")
        try:
            for statement in _statements(load_mysql_schema_sql()):
                await cur.execute(statement)
        finally:
            await cur.execute("SELECT RELEASE_LOCK(%s)", (_SCHEMA_LOCK,))


def connect_args(dsn: str) -> dict[str, Any]:
    """asyncmy's connection arguments for ``mysql://user:password@host:port/database[?unix_socket=…]``."""
    try:
        parts = urlsplit(dsn)
        port = parts.port or 3306
    except ValueError as exc:
        raise ConfigError(f"series index DSN {mask_dsn(dsn)!r} is not a URL: {exc}",
                          field="DICOMFLOW_INDEX_DSN") from None
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise ConfigError(f"series index DSN {mask_dsn(dsn)!r} names no database "
                          "(mysql://user:password@host:3306/dicomflow)", field="DICOMFLOW_INDEX_DSN")
    query = dict(parse_qsl(parts.query))
    args: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1", "port": port, "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or query.get("password", "")), "db": database,
        "charset": "utf8mb4", "init_command": f"SET SESSION sql_mode = '{SESSION_SQL_MODE}'",
    }
    if query.get("unix_socket"):
        args["unix_socket"] = query["unix_socket"]
    return args


def _code(exc: BaseException) -> int | None:
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    return args[0] if args and isinstance(args[0], int) else None


def _message(exc: BaseException) -> str:
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    text = str(args[1]) if len(args) > 1 else str(exc)
    return _QUOTED_VALUE.sub("value for", text)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError | EOFError | asyncio.IncompleteReadError | my_errors.InterfaceError):
        return True
    return isinstance(exc, my_errors.OperationalError | my_errors.InternalError) and _code(exc) in _TRANSIENT_CODES


def translate(exc: BaseException, action: str, *, first_start: bool = False, dsn: str = "",
              variable: str = "DICOMFLOW_INDEX_DSN") -> SinkError:
    """A driver exception as the sink contract's error (mirrors sinks.postgres._translate)."""
    if isinstance(exc, SinkError):
        return exc
    code = _code(exc)
    detail = f"({code}) {_message(exc)}" if code is not None else f"{type(exc).__name__}: {_message(exc)}"
    if first_start and isinstance(exc, my_errors.OperationalError) and code in _REFUSED_CODES:
        return IndexRefusedError(f"{variable}={mask_dsn(dsn)}: the server refused the connection: {detail}")
    if _is_transient(exc):
        return SinkRetryableError(f"mysql {action}: {detail}", retry_after=1.0 if code in (1040, 1053) else 0.0)
    log.error("sink=mysql %s failed with an unexpected error, retrying (alert) error=%s", action, detail)
    return UnexpectedMySQLError(f"mysql {action} (unexpected, retried): {detail}", retry_after=5.0)


def _data_error(exc: BaseException) -> SinkDataError:
    """MySQL's refusal of one row, naming the column (the quoted value is cut out)."""
    message = _message(exc)
    found = _COLUMN.search(message)
    column = next((g for g in found.groups() if g), None) if found else None
    text = f"MySQL rejected column {column}: {message}" if column else f"MySQL rejected row: {message}"
    return SinkDataError(f"{text} (error {_code(exc)})", code=Code.SINK_REJECTED, field=column)


def _unstorable(values: Sequence[Any]) -> tuple[str, str] | None:
    """(column, reason) of a value refused before it reaches the server.

    Text PostgreSQL cannot hold (the index holds the same rows on either server), and numbers
    MySQL cannot hold: a DS of "NaN" or "inf" parses as a float, which asyncmy refuses in the
    client ("nan can not be used with MySQL", naming no column), an error no retry would fix.
    """
    for column, value in zip(COLUMNS, values, strict=True):
        if isinstance(value, float) and not math.isfinite(value):
            return column, f"MySQL DOUBLE cannot hold {value!r}"
        if isinstance(value, str):
            if "\x00" in value:
                return column, "text cannot contain NUL (0x00) characters"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return column, "not valid UTF-8 text (lone surrogate)"
    return None


def _time_of_day(value: Any) -> Any:
    # MySQL drivers return TIME as a duration since midnight.
    return (datetime.min + value).time() if isinstance(value, timedelta) else value


def _state(row: Sequence[Any]) -> DicomStateMeta:
    values = {c: (_time_of_day(v) if c in _TIME_COLUMNS else v) for c, v in zip(COLUMNS, row, strict=True)}
    return DicomStateMeta(**values)


@dataclasses.dataclass(slots=True)
class _Row:
    item: SinkItem[DicomStateMeta]
    key: tuple[str, str, str]
    values: tuple[Any, ...]
    position: int


class IndexRefusedError(SinkError):
    """The server refused the index's connection at start (credentials, database): fix the DSN."""


class UnexpectedMySQLError(SinkRetryableError):
    """An error that is neither transient nor data: retried with an alert."""


class MySQLIndex(BatchingSink[DicomStateMeta]):
    """The series index on MySQL 8 / MariaDB 10.11; also the state topic's batching sink."""

    name = "mysql"

    def __init__(self, dsn: str | Secret, *, min_size: int = 1, max_size: int = 4, apply_schema: bool = True,
                 connect_timeout: float = 10.0, variable: str = "DICOMFLOW_INDEX_DSN") -> None:
        super().__init__()
        self._dsn = dsn if isinstance(dsn, Secret) else Secret(dsn)
        self._args = connect_args(self._dsn.get())  # a malformed DSN fails here, before any I/O
        self.min_size = min_size
        self.max_size = max_size
        self.apply_schema = apply_schema
        self.connect_timeout = connect_timeout
        self.variable = variable
        self.counters["stale_skipped"] = 0
        self.counters["unexpected_errors"] = 0
        self._pool: Any = None
        self._started_once = False
        self._start_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"MySQLIndex(dsn={mask_dsn(self._dsn.get())!r})"

    async def start(self) -> None:
        """Create the pool and apply the schema. A refusal at the first start is IndexRefusedError."""
        async with self._start_lock:
            if self._pool is not None:
                return
            try:
                pool = await asyncio.wait_for(asyncmy.create_pool(
                    minsize=self.min_size, maxsize=self.max_size, connect_timeout=self.connect_timeout,
                    autocommit=True, **self._args), timeout=self.connect_timeout + 5)
            except Exception as exc:
                raise self._alert(translate(exc, "connect", first_start=not self._started_once,
                                            dsn=self._dsn.get(), variable=self.variable)) from exc
            try:
                if self.apply_schema:
                    async with pool.acquire() as conn:
                        await apply_mysql_schema(conn)
            except BaseException as exc:
                pool.close()
                if isinstance(exc, Exception):
                    raise self._alert(translate(exc, "apply schema")) from exc
                raise
            self._pool = pool
            self._started_once = True
            log.info("sink=mysql started dsn=%s max_size=%s schema_applied=%s", mask_dsn(self._dsn.get()),
                     self.max_size, self.apply_schema)

    def preflight(self, timeout: float = 5.0) -> None:
        """Connect once, synchronously, before the worker starts: ConfigError (one line naming the
        variable and the server's answer) if the server refuses the DSN; any other failure
        (not up yet, unreachable) is left to :meth:`start`, which the worker retries."""

        async def probe() -> None:
            conn = await asyncio.wait_for(asyncmy.connect(connect_timeout=timeout, **self._args), timeout + 1)
            conn.close()

        def run() -> None:
            asyncio.run(probe())

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # the caller may own a loop
            try:
                pool.submit(run).result()
            except Exception as exc:
                error = translate(exc, "connect", first_start=True, dsn=self._dsn.get(), variable=self.variable)
                if isinstance(error, IndexRefusedError):
                    raise ConfigError(error.message, field=self.variable) from None
                log.warning("%s=%s not reachable yet (%s); the worker retries", self.variable,
                            mask_dsn(self._dsn.get()), error.message)

    def _alert(self, error: SinkError) -> SinkError:
        if isinstance(error, UnexpectedMySQLError):
            self.counters["unexpected_errors"] += 1
        return error

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        try:
            await asyncio.wait_for(pool.wait_closed(), timeout=10.0)
        except Exception as exc:  # a dead server must not block shutdown
            log.warning("sink=mysql pool close failed error=%s", type(exc).__name__)
        log.info("sink=mysql stopped")

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; one that saw an error is closed, not reused (it may be broken)."""
        if self._pool is None:
            await self.start()
        pool = self._pool
        conn = await asyncio.wait_for(pool.acquire(), timeout=self.connect_timeout)
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        finally:
            await pool.release(conn)

    # -- the batching sink ---------------------------------------------------------------

    async def write(self, batch: SinkBatch[DicomStateMeta]) -> Sequence[Rejected[DicomStateMeta]]:
        if not batch.items:
            return []
        rejected: list[Rejected[DicomStateMeta]] = []
        heads, older = self._prepare(batch, rejected)
        changed = accepted = 0
        if heads:
            try:
                async with self._connection() as conn:
                    changed, accepted = await self._write_transaction(conn, heads, older, rejected)
            except Exception as exc:
                raise self._alert(translate(exc, "write")) from exc
        self.counters["stale_skipped"] += accepted - changed
        if rejected:
            first = rejected[0]
            log.warning("sink=mysql topic=%s partition=%s rejected=%s first_offset=%s field=%s error=%s",
                        batch.topic, batch.partition, len(rejected), first.item.offset, first.error.field,
                        first.error.message)
        return rejected

    def _prepare(self, batch: SinkBatch[DicomStateMeta], rejected: list[Rejected[DicomStateMeta]]
                 ) -> tuple[list[_Row], dict[tuple[str, str, str], list[_Row]]]:
        """The newest row per series key, and the older ones newest first (tried if a newer is refused)."""
        now = datetime.now()
        by_key: dict[tuple[str, str, str], list[_Row]] = {}
        for position, item in enumerate(batch.items):
            rec = item.value
            updated = rec.updated_time or now
            created = rec.created_time or updated
            values = tuple(updated if c == "updated_time" else created if c == "created_time"
                           else getattr(rec, c) for c in COLUMNS)
            row = _Row(item, (rec.tenant_id, rec.study_uid, rec.series_uid), values, position)
            bad = _unstorable(values)
            if bad is not None:
                rejected.append(Rejected(item, SinkDataError(f"rejected column {bad[0]}: {bad[1]}",
                                                             code=Code.SINK_REJECTED, field=bad[0])))
                continue
            by_key.setdefault(row.key, []).append(row)
        heads: list[_Row] = []
        older: dict[tuple[str, str, str], list[_Row]] = {}
        for key, rows in by_key.items():
            rows.sort(key=lambda r: (r.item.value.version, r.values[COLUMNS.index("updated_time")], r.position),
                      reverse=True)
            heads.append(rows[0])
            if len(rows) > 1:
                older[key] = rows[1:]
        # Key order: concurrent writers lock rows in the same order (no deadlocks between workers).
        heads.sort(key=lambda r: r.key)
        return heads, older

    async def _write_transaction(self, conn: Any, heads: list[_Row], older: dict[tuple[str, str, str], list[_Row]],
                                 rejected: list[Rejected[DicomStateMeta]]) -> tuple[int, int]:
        """Upsert in one transaction, bisecting around refused rows; (rows changed, rows accepted)."""
        changed = accepted = 0
        async with conn.cursor() as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                pending = heads
                while pending:
                    bad: list[tuple[_Row, BaseException]] = []
                    for start in range(0, len(pending), CHUNK):
                        n, ok, refused = await self._bisect(conn, cur, pending[start:start + CHUNK], False)
                        changed, accepted = changed + n, accepted + ok
                        bad += refused
                    pending = []
                    for row, exc in bad:
                        rejected.append(Rejected(row.item, _data_error(exc)))
                        fallback = older.get(row.key)
                        if fallback:
                            pending.append(fallback.pop(0))
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
        return changed, accepted

    async def _bisect(self, conn: Any, cur: Any, rows: list[_Row], known_bad: bool
                      ) -> tuple[int, int, list[tuple[_Row, BaseException]]]:
        if not known_bad or len(rows) == 1:
            try:
                return await self._upsert(conn, cur, rows), len(rows), []
            except _DATA_ERRORS as exc:
                # InnoDB rolled back just this statement; the transaction goes on.
                if len(rows) == 1:
                    return 0, 0, [(rows[0], exc)]
        mid = len(rows) // 2
        n1, ok1, bad1 = await self._bisect(conn, cur, rows[:mid], False)
        n2, ok2, bad2 = await self._bisect(conn, cur, rows[mid:], False)
        return n1 + n2, ok1 + ok2, bad1 + bad2

    @staticmethod
    async def _upsert(conn: Any, cur: Any, rows: Sequence[_Row]) -> int:
        """One multi-row upsert; returns the rows inserted or changed (not the stale ones)."""
        sql = f"INSERT INTO {TABLE} ({_COLS}) VALUES " + ", ".join([_ROW] * len(rows)) + _UPSERT_TAIL  # noqa: S608
        affected = await cur.execute(sql, [v for row in rows for v in row.values])
        # Affected rows count an insert once and a changed row twice; the info line's
        # "Duplicates" counts the changed rows, so changed = affected - duplicates. The
        # info line is only reachable through the connection's last result (no public API).
        # A single-row INSERT carries no info line: there 1 is an insert, 2 a change, 0 stale.
        info = getattr(getattr(conn, "_result", None), "message", None) or b""
        found = _INFO.search(info if isinstance(info, bytes) else str(info).encode())
        return int(affected) - int(found.group(2)) if found else min(int(affected), len(rows))

    # -- SeriesIndex: the seeds' provider operations (see sinks/index.py) --------------

    async def save_state(self, row: DicomStateMeta) -> None:
        """Seeds: ``save_state_info``."""
        await save_one(self.save_states, row)

    async def save_states(self, rows: Sequence[DicomStateMeta]) -> Sequence[Rejected[DicomStateMeta]]:
        """Seeds: ``save_state_list``; the refused rows are returned (offset = position)."""
        return await self.write(direct_batch(rows))

    async def save_json_metas(self, rows: Sequence[DicomJsonMeta]) -> None:
        """Seeds: ``save_json_list``."""
        if not rows:
            return
        now = datetime.now()
        kept = sorted(newest_json(rows), key=lambda r: (r.tenant_id, r.study_uid, r.series_uid))
        args = [v for r in kept for v in json_values(r, now)]
        sql = (f"INSERT INTO dicom_json_meta ({_JSON_COLS}) VALUES "  # noqa: S608
               + ", ".join([_JSON_ROW] * len(kept)) + _JSON_TAIL)
        await self._run("save json metas", sql, args, fetch=False)

    async def series_of_study(self, tenant_id: str, study_uid: str) -> list[DicomStateMeta]:
        """Seeds: ``get_state_metaes``."""
        rows = await self._run("series of study", _SERIES_OF_STUDY, (tenant_id, study_uid))
        return [_state(r) for r in rows]

    async def stale_json(self, end_time: datetime, limit: int = 100) -> list[DicomStateMeta]:
        """Seeds: ``get_json_metaes``."""
        rows = await self._run("stale json", _STALE_JSON, (end_time, limit))
        return [_state(r) for r in rows]

    async def json_meta(self, tenant_id: str, study_uid: str, series_uid: str) -> DicomJsonMeta | None:
        """Seeds: ``get_json_meta``."""
        rows = await self._run("json meta", _JSON_META, (tenant_id, study_uid, series_uid))
        return json_row(rows[0]) if rows else None

    async def _run(self, action: str, sql: str, args: Sequence[Any], *, fetch: bool = True) -> list[tuple[Any, ...]]:
        """One autocommitted statement with the sink's error classification."""
        try:
            async with self._connection() as conn, conn.cursor() as cur:
                await cur.execute(sql, args)
                return list(await cur.fetchall() or []) if fetch else []
        except _DATA_ERRORS as exc:
            raise _data_error(exc) from exc
        except Exception as exc:
            raise self._alert(translate(exc, action)) from exc
