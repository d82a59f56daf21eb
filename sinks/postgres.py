"""PostgreSQL sink: upserts DicomStateMeta into ``dicom_state_meta`` (the series index).

Port of the seeds' ``save_state_list`` with three fixes:

* Newest wins. The seeds' ``ON CONFLICT DO UPDATE`` overwrote unconditionally, so a
  replayed or reordered older event rolled a series back. Here the update only applies
  when ``(version, updated_time)`` is not older than the stored one (``version`` is the
  per-series version kept with the instance facts), and ``created_time`` is never
  updated (it keeps the first insert's value).
* A fixed handful of statements per batch instead of one per row: the batch is COPYed
  into a session temp table shaped ``LIKE dicom_state_meta`` and upserted with a single
  ``INSERT … SELECT`` in one transaction.
* One bad row no longer fails the batch: PostgreSQL's refusal is isolated by bisection
  (savepoints) and only the refused rows are returned as :class:`Rejected`.

The COPY uses CSV *text* format on purpose: every value then goes through PostgreSQL's
own input functions against the staging table's column types, so any refusal (length,
NOT NULL, range, format) comes back from PostgreSQL naming the column, e.g.
``COPY …, line 1, column patient_sex``. Binary COPY would fail some of these inside the
client encoder instead, with no column named.

It is also the PostgreSQL :class:`sinks.index.SeriesIndex` (the seeds' PostgreSQL
``DbProvider``): ``save_state``/``save_states`` go through the same batching ``write``;
``save_json_metas`` upserts the JSON generator's bookkeeping; the three reads are below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import re
from collections.abc import Sequence
from datetime import date, datetime, time
from importlib import resources
from typing import Any

import asyncpg

from core.errors import Code, SinkDataError, SinkError, SinkRetryableError
from core.settings import Secret, mask_dsn
from schemas.records import DicomJsonMeta, DicomStateMeta
from sinks.base import BatchingSink, Rejected, SinkBatch, SinkItem
from sinks.index import JSON_COLUMNS, direct_batch, json_row, json_values, newest_json, save_one

__all__ = [
    "PostgresSink",
    "apply_schema",
    "get_json_metaes",
    "row_writes",
    "load_schema_sql",
]

log = logging.getLogger(__name__)

TABLE = "dicom_state_meta"
STAGING = "dicomflow_state_in"
KEY_COLUMNS = ("tenant_id", "study_uid", "series_uid")
COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DicomStateMeta))
#: Everything but the key and created_time (which keeps the first insert's value).
UPDATE_COLUMNS = tuple(c for c in COLUMNS if c not in KEY_COLUMNS and c != "created_time")

#: pg_advisory_xact_lock key serialising schema application across workers ("dicomflo").
SCHEMA_LOCK_KEY = 0x6469636F6D666C6F

_COLS = ", ".join(COLUMNS)
# INCLUDING DEFAULTS: a NOT NULL column added to the table later (with a default) must not
# make the staging COPY refuse every row. The table lives as long as the session.
_CREATE_STAGING = (f"CREATE TEMP TABLE IF NOT EXISTS {STAGING} (LIKE {TABLE} INCLUDING DEFAULTS) "
                   "ON COMMIT DELETE ROWS")
# The CTE drains the staging table in the same statement, so after a savepoint is
# released during bisection the next attempt starts from an empty table. ORDER BY makes
# concurrent writers lock rows in the same order (no deadlocks between workers).
# S608: every interpolated name is a constant of this module or a DicomStateMeta field.
_UPSERT = (
    f"WITH batch AS (DELETE FROM {STAGING} RETURNING *) "  # noqa: S608
    f"INSERT INTO {TABLE} AS d ({_COLS}) "
    f"SELECT {_COLS} FROM batch ORDER BY {', '.join(KEY_COLUMNS)} "
    f"ON CONFLICT ({', '.join(KEY_COLUMNS)}) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in UPDATE_COLUMNS)
    # Newest wins by the per-series version (then the flush time, for states without one).
    + " WHERE (d.version, d.updated_time) <= (EXCLUDED.version, EXCLUDED.updated_time)"
)
# The seeds' UNION ALL of "no JSON row" and "JSON row with another flag_time" as one
# LEFT JOIN: the same rows, one scan.
_GET_JSON_METAES = (
    f"SELECT {', '.join('dsm.' + c for c in COLUMNS)} "  # noqa: S608
    f"FROM {TABLE} dsm LEFT JOIN dicom_json_meta djm "
    "ON dsm.tenant_id = djm.tenant_id AND dsm.study_uid = djm.study_uid "
    "AND dsm.series_uid = djm.series_uid "
    "WHERE (djm.tenant_id IS NULL OR dsm.updated_time <> djm.flag_time) AND dsm.updated_time < $1 "
    "ORDER BY dsm.updated_time LIMIT $2"
)
_SERIES_OF_STUDY = (
    f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE tenant_id = $1 AND study_uid = $2 "  # noqa: S608
    # COLLATE "C": UIDs in byte order, as MySQL's utf8mb4_bin orders them (same list on either provider).
    'ORDER BY series_number NULLS LAST, series_uid COLLATE "C"'
)
_JSON_META = (
    f"SELECT {', '.join(JSON_COLUMNS)} FROM dicom_json_meta "  # noqa: S608
    "WHERE tenant_id = $1 AND study_uid = $2 AND series_uid = $3"
)
# Never back to an older flag_time: a late writer must not mark a series done for an
# older state. created_time keeps the first value.
_SAVE_JSON = (
    f"INSERT INTO dicom_json_meta AS j ({', '.join(JSON_COLUMNS)}) "  # noqa: S608
    f"SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], "
    "$7::timestamp[], $8::timestamp[], $9::int[], $10::int[]) "
    "ORDER BY 1, 2, 3 "
    "ON CONFLICT (tenant_id, study_uid, series_uid) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in JSON_COLUMNS
                if c not in ("tenant_id", "study_uid", "series_uid", "created_time"))
    + " WHERE j.flag_time <= EXCLUDED.flag_time"
)
_NULL = "\\N"

# PostgreSQL refuses the data itself: isolate the rows, dead-letter them.
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,                           # class 22: length, range, format
    asyncpg.exceptions.IntegrityConstraintViolationError,   # class 23: NOT NULL, check
    asyncpg.exceptions.ProgramLimitExceededError,           # 54000: e.g. a value too big to index
)
# The server is busy or starting: waiting at least a second is the useful hint.
_BUSY_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.ObjectInUseError,
)
# The same batch may succeed later.
_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,             # class 08, incl. connection lost
    asyncpg.exceptions.OperatorInterventionError,           # 57: admin/crash shutdown, cancel
    asyncpg.exceptions.TransactionRollbackError,            # 40: serialization, deadlock
    asyncpg.exceptions.InsufficientResourcesError,          # 53: connections, disk, memory
    asyncpg.exceptions.ReadOnlySQLTransactionError,         # a standby after failover
    asyncpg.exceptions.InvalidCachedStatementError,
    asyncpg.exceptions.InterfaceError,                      # "connection is closed", ...
    OSError,                                                # refused, reset, unreachable
    TimeoutError,                                           # connect/acquire/command timeout
)
_CONTEXT_COLUMN = re.compile(r"\bcolumn (\w+)")
_QUOTED_COLUMN = re.compile(r'\bcolumn "([^"]+)"')


def load_schema_sql() -> str:
    """The idempotent DDL ``schemas/sql/postgres.sql``, read from the installed package."""
    return resources.files("schemas").joinpath("sql/postgres.sql").read_text(encoding="utf-8")


async def apply_schema(conn: asyncpg.Connection) -> None:
    """Apply the DDL; safe to run any number of times, from any number of workers.

    ``CREATE … IF NOT EXISTS`` is not safe against a concurrent twin (both may pass the
    existence check, one then fails on the catalog's unique index), hence the advisory
    lock; the transaction-scoped form is released even if the connection dies.
    """
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")
        await conn.execute(load_schema_sql())


async def get_json_metaes(pool_or_conn: asyncpg.Pool | asyncpg.Connection, end_time: datetime,
                          limit: int = 10) -> list[DicomStateMeta]:
    """Series whose JSON must be (re)generated: the seeds' ``get_json_metaes``.

    A series qualifies when it has no ``dicom_json_meta`` row, or one whose ``flag_time``
    differs from the series' ``updated_time``, and it was updated before ``end_time``
    (the quiet period that lets a series finish arriving); oldest first.
    """
    rows = await pool_or_conn.fetch(_GET_JSON_METAES, end_time, limit)
    return [DicomStateMeta(**dict(row)) for row in rows]


async def row_writes(conn: asyncpg.Connection) -> int:
    """``n_tup_ins + n_tup_upd`` of dicom_state_meta from ``pg_stat_user_tables``.

    Counts rows inserted or updated since the last stats reset (summed over every schema
    holding a table of that name); a stale update skipped by the ``updated_time`` guard
    does not count.

    Statistics are asynchronous. This flushes the calling session's own pending counts
    first (``pg_stat_force_next_flush``, PostgreSQL 15+), so a session's own writes are
    counted exactly. Another session publishes its counts when it goes idle, but if it
    last flushed under a second before, only after 10 s idle (PGSTAT_IDLE_INTERVAL;
    measured: 10.1 s). A session that ends flushes at once, so to count a worker's
    writes exactly, stop the worker (closing its pool) first, or poll for over 10 s.
    """
    await conn.execute("SELECT pg_stat_force_next_flush()")
    # Outside a transaction each statement takes a fresh stats snapshot; inside one the
    # first snapshot is cached, so drop it explicitly.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    value = await conn.fetchval(
        "SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables "
        "WHERE relname = $1", TABLE)
    return int(value)


@dataclasses.dataclass(slots=True)
class _Row:
    """One batch item as the values of a staging-table row."""

    item: SinkItem[DicomStateMeta]
    key: tuple[str, str, str]
    values: tuple[Any, ...]
    updated_time: datetime
    position: int


class PostgresSink(BatchingSink[DicomStateMeta]):
    """Upserts series state into PostgreSQL, newest ``updated_time`` winning."""

    name = "postgres"

    def __init__(
        self,
        dsn: str | Secret,
        *,
        min_size: int = 1,
        max_size: int = 4,
        apply_schema: bool = True,
        connect_timeout: float = 10.0,
        command_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self._dsn = dsn if isinstance(dsn, Secret) else Secret(dsn)
        self.min_size = min_size
        self.max_size = max_size
        self.apply_schema = apply_schema
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.counters["stale_skipped"] = 0
        #: Alert: errors neither transient nor data (a REVOKE, a renamed table), retried.
        self.counters["unexpected_errors"] = 0
        self._pool: asyncpg.Pool | None = None
        self._start_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PostgresSink(dsn={mask_dsn(self._dsn.get())!r})"

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool (after :meth:`start`)."""
        if self._pool is None:
            raise SinkError("PostgresSink is not started")
        return self._pool

    async def start(self) -> None:
        """Create the pool and apply the schema; SinkRetryableError if PostgreSQL is not up."""
        async with self._start_lock:
            if self._pool is not None:
                return
            try:
                pool = await asyncpg.create_pool(
                    self._dsn.get(), min_size=self.min_size, max_size=self.max_size,
                    timeout=self.connect_timeout, command_timeout=self.command_timeout)
            except Exception as exc:
                raise self._alert(_translate(exc, "connect")) from exc
            try:
                if self.apply_schema:
                    async with pool.acquire(timeout=self.connect_timeout) as conn:
                        await apply_schema(conn)
            except BaseException as exc:
                pool.terminate()
                if isinstance(exc, Exception):
                    raise self._alert(_translate(exc, "apply schema")) from exc
                raise
            self._pool = pool
            log.info("sink=postgres started dsn=%s min_size=%s max_size=%s schema_applied=%s",
                     mask_dsn(self._dsn.get()), self.min_size, self.max_size, self.apply_schema)

    def _alert(self, error: SinkError) -> SinkError:
        if isinstance(error, UnexpectedPostgresError):
            self.counters["unexpected_errors"] += 1
        return error

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=10.0)
        except Exception as exc:  # a dead server must not block shutdown
            log.warning("sink=postgres pool close failed, terminating error=%s", type(exc).__name__)
            pool.terminate()
        log.info("sink=postgres stopped")

    async def write(self, batch: SinkBatch[DicomStateMeta]) -> Sequence[Rejected[DicomStateMeta]]:
        if not batch.items:
            return []
        if self._pool is None:
            # A sink whose start() failed (PostgreSQL down at boot) recovers on retry here.
            await self.start()
        pool = self.pool
        rejected: list[Rejected[DicomStateMeta]] = []
        heads, older = self._prepare(batch, rejected)
        if not heads:
            self._log_rejected(batch, rejected)
            return rejected
        try:
            try:
                async with pool.acquire(timeout=self.connect_timeout) as conn, conn.transaction():
                    affected = await self._upsert(conn, heads)
                accepted = len(heads)
            except _DATA_ERRORS as exc:
                log.info("sink=postgres topic=%s partition=%s isolating bad rows sqlstate=%s",
                         batch.topic, batch.partition, getattr(exc, "sqlstate", None))
                affected, accepted = await self._write_isolating(pool, heads, older, rejected)
        except _DATA_ERRORS as exc:  # only if isolation itself could not attribute it
            raise SinkDataError(_pg_message(exc)) from exc
        except Exception as exc:
            raise self._alert(_translate(exc, "write")) from exc
        self.counters["stale_skipped"] += accepted - affected
        self._log_rejected(batch, rejected)
        log.debug("sink=postgres topic=%s partition=%s items=%s series=%s upserted=%s stale=%s rejected=%s",
                  batch.topic, batch.partition, len(batch), len(heads), affected, accepted - affected,
                  len(rejected))
        return rejected

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
        columns = list(zip(*(json_values(r, now) for r in newest_json(rows)), strict=True))
        await self._run("save json metas", lambda pool: pool.execute(_SAVE_JSON, *map(list, columns)))

    async def series_of_study(self, tenant_id: str, study_uid: str) -> list[DicomStateMeta]:
        """Seeds: ``get_state_metaes``."""
        rows = await self._run("series of study", lambda pool: pool.fetch(_SERIES_OF_STUDY, tenant_id, study_uid))
        return [DicomStateMeta(**dict(r)) for r in rows]

    async def stale_json(self, end_time: datetime, limit: int = 100) -> list[DicomStateMeta]:
        """Seeds: ``get_json_metaes``."""
        return await self._run("stale json", lambda pool: get_json_metaes(pool, end_time, limit))

    async def json_meta(self, tenant_id: str, study_uid: str, series_uid: str) -> DicomJsonMeta | None:
        """Seeds: ``get_json_meta``."""
        row = await self._run("json meta", lambda pool: pool.fetchrow(_JSON_META, tenant_id, study_uid, series_uid))
        return None if row is None else json_row(tuple(row.values()))

    async def _run(self, action: str, call: Any) -> Any:
        """``call(pool)`` with the sink's error classification (transient: SinkRetryableError)."""
        if self._pool is None:
            await self.start()
        try:
            return await call(self.pool)
        except _DATA_ERRORS as exc:
            raise _data_error(exc) from exc
        except Exception as exc:
            raise self._alert(_translate(exc, action)) from exc

    # -- internals ---------------------------------------------------------------------

    def _prepare(self, batch: SinkBatch[DicomStateMeta], rejected: list[Rejected[DicomStateMeta]]
                 ) -> tuple[list[_Row], dict[tuple[str, str, str], list[_Row]]]:
        """Build staging rows and de-duplicate keys (ON CONFLICT cannot touch a row twice).

        Returns the newest row per key, and per key the older ones, newest first: those
        are written only if every newer one is refused.
        """
        now = datetime.now()
        by_key: dict[tuple[str, str, str], list[_Row]] = {}
        for position, item in enumerate(batch.items):
            rec = item.value
            # The DDL's NOT NULL defaults cannot apply to an explicit NULL: stamp here, in the
            # same naive local-time convention as dicom.extract.
            updated = rec.updated_time or now
            created = rec.created_time or updated
            values = tuple(updated if c == "updated_time" else created if c == "created_time"
                           else getattr(rec, c) for c in COLUMNS)
            row = _Row(item, (rec.tenant_id, rec.study_uid, rec.series_uid), values, updated, position)
            unstorable = _unstorable_text(row)
            if unstorable is not None:
                column, reason = unstorable
                rejected.append(self._reject(row, SinkDataError(
                    f"rejected column {column}: {reason}", code=Code.SINK_REJECTED, field=column)))
                continue
            by_key.setdefault(row.key, []).append(row)
        heads: list[_Row] = []
        older: dict[tuple[str, str, str], list[_Row]] = {}
        for key, rows in by_key.items():
            # Equal updated_time: the later offset wins, as it would in separate batches.
            rows.sort(key=lambda r: (r.item.value.version, r.updated_time, r.position), reverse=True)
            heads.append(rows[0])
            if len(rows) > 1:
                older[key] = rows[1:]
        return heads, older

    async def _upsert(self, conn: asyncpg.Connection, rows: Sequence[_Row]) -> int:
        """COPY ``rows`` into staging and upsert them; returns rows inserted or updated."""
        if not rows:
            return 0
        await conn.execute(_CREATE_STAGING)
        await conn.copy_to_table(STAGING, source=io.BytesIO(_csv(rows)), columns=COLUMNS,
                                 format="csv", null=_NULL)
        status = await conn.execute(_UPSERT)
        # "INSERT 0 <n>": rows skipped by the updated_time guard are not in <n>.
        return int(status.rsplit(" ", 1)[-1])

    async def _write_isolating(self, pool: asyncpg.Pool, heads: list[_Row],
                               older: dict[tuple[str, str, str], list[_Row]],
                               rejected: list[Rejected[DicomStateMeta]]) -> tuple[int, int]:
        """Write what PostgreSQL accepts in one transaction; collect what it refuses.

        Returns (rows inserted or updated, rows accepted including stale ones).
        """
        affected = accepted = 0
        async with pool.acquire(timeout=self.connect_timeout) as conn, conn.transaction():
            pending, known_bad = heads, True
            while pending:
                n, ok, bad = await self._bisect(conn, pending, known_bad)
                affected += n
                accepted += ok
                pending, known_bad = [], False
                for row, exc in bad:
                    rejected.append(self._reject(row, _data_error(exc)))
                    # The newest version of this series was refused: the next older one
                    # from this batch is now the newest and gets its chance.
                    fallback = older.get(row.key)
                    if fallback:
                        pending.append(fallback.pop(0))
        return affected, accepted

    async def _bisect(self, conn: asyncpg.Connection, rows: list[_Row], known_bad: bool
                      ) -> tuple[int, int, list[tuple[_Row, BaseException]]]:
        """Upsert ``rows``, splitting around refused ones: (affected, accepted, refused)."""
        if not known_bad or len(rows) == 1:
            try:
                async with conn.transaction():  # a savepoint inside the isolation transaction
                    return await self._upsert(conn, rows), len(rows), []
            except _DATA_ERRORS as exc:
                if len(rows) == 1:
                    return 0, 0, [(rows[0], exc)]
        mid = len(rows) // 2
        n1, ok1, bad1 = await self._bisect(conn, rows[:mid], False)
        n2, ok2, bad2 = await self._bisect(conn, rows[mid:], False)
        return n1 + n2, ok1 + ok2, bad1 + bad2

    @staticmethod
    def _log_rejected(batch: SinkBatch[DicomStateMeta], rejected: Sequence[Rejected[DicomStateMeta]]) -> None:
        # One line per batch: an all-bad batch must not flood the log; each row's reason
        # travels with its dead letter (and is logged at debug level).
        if rejected:
            first = rejected[0]
            log.warning("sink=postgres topic=%s partition=%s rejected=%s first_offset=%s field=%s error=%s",
                        batch.topic, batch.partition, len(rejected), first.item.offset,
                        first.error.field, first.error.message)

    @staticmethod
    def _reject(row: _Row, error: SinkDataError) -> Rejected[DicomStateMeta]:
        log.debug("sink=postgres rejected topic=%s partition=%s offset=%s field=%s error=%s",
                  row.item.topic, row.item.partition, row.item.offset, error.field, error.message)
        return Rejected(row.item, error)


def _csv_field(value: Any) -> str:
    if value is None:
        return _NULL
    if isinstance(value, str):
        # Always quoted: a quoted field is never NULL, even if it reads \N.
        return '"' + value.replace('"', '""') + '"'
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form; nan/inf are accepted by float8in
    return str(value)


def _csv(rows: Sequence[_Row]) -> bytes:
    return "".join(",".join(_csv_field(v) for v in row.values) + "\n" for row in rows).encode("utf-8")


def _unstorable_text(row: _Row) -> tuple[str, str] | None:
    """(column, reason) of the first text PostgreSQL can never store, if any.

    Checked here rather than left to the server: a NUL or a lone surrogate fails the
    COPY before it is split into columns, so PostgreSQL's error would not name one.
    """
    for column, value in zip(COLUMNS, row.values, strict=True):
        if isinstance(value, str):
            if "\x00" in value:
                return column, "PostgreSQL text cannot contain NUL (0x00) characters"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return column, "not valid UTF-8 text (lone surrogate)"
    return None


def _pg_message(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    # The staging table mirrors dicom_state_meta; name the real table to the operator.
    return str(message).replace(STAGING, TABLE)


def _data_error(exc: BaseException) -> SinkDataError:
    """PostgreSQL's refusal of one row, naming the column it concerns.

    Only the primary message and the COPY context are kept: DETAIL repeats the whole
    row ("Failing row contains …"), patient data that must not reach logs.
    """
    column = getattr(exc, "column_name", None)
    context = getattr(exc, "context", None) or ""
    message = _pg_message(exc)
    if not column:
        found = _CONTEXT_COLUMN.search(context) or _QUOTED_COLUMN.search(message)
        column = found.group(1) if found else None
    sqlstate = getattr(exc, "sqlstate", None)
    text = f"PostgreSQL rejected column {column}: {message}" if column else f"PostgreSQL rejected row: {message}"
    return SinkDataError(f"{text} (SQLSTATE {sqlstate})", code=Code.SINK_REJECTED, field=column)


def _translate(exc: Exception, action: str) -> SinkError:
    """Map a driver exception to the sink contract: retryable, or a hard failure."""
    detail = f"{type(exc).__name__}: {_pg_message(exc)}"
    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, _BUSY_ERRORS):
        return SinkRetryableError(f"postgres {action}: {detail}", retry_after=1.0)
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and isinstance(exc, ValueError):
        # Client-side configuration or encoding errors: retrying cannot fix them.
        return SinkError(f"postgres {action}: {detail}")
    if isinstance(exc, _RETRYABLE_ERRORS):
        # retry_after=0: the caller's backoff alone paces reconnects.
        return SinkRetryableError(f"postgres {action}: {detail}", retry_after=0.0)
    # Anything else (a rotated password, a REVOKE, a renamed table, a bug) cannot be told
    # from an operator's fix in progress: retry, slowly, and alert (counter
    # ``postgres_unknown_errors`` in /metrics, an ERROR log line). Giving up would ack the
    # batch (faust's take_events acks in a finally), losing it.
    log.error("sink=postgres %s failed with an unexpected error, retrying (alert) error=%s", action, detail)
    return UnexpectedPostgresError(f"postgres {action} (unexpected, retried): {detail}", retry_after=5.0)


class UnexpectedPostgresError(SinkRetryableError):
    """An error that is neither transient, nor data, nor client-side: retried with an alert."""
