"""Per-instance facts of the series index in MySQL / MariaDB (what sinks/series_facts.py does in PostgreSQL).

With a MySQL index the facts live beside it, so ``series_related_instances`` stays exact and
the states' ``version`` comes from the same server that orders them; no PostgreSQL needed.
Same transaction shape: the version row first (its row lock serialises two flushes of one
series), then the instances, then the count, under READ COMMITTED so the count sees what
the other flush committed before it released the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import asyncmy

from core.errors import SinkError, SinkRetryableError
from core.settings import Secret, mask_dsn
from sinks.mysql import apply_mysql_schema, connect_args, translate
from sinks.series_facts import FactsBase, InstanceFile, SeriesFact, timestamp

__all__ = ["MySQLSeriesFacts"]

# ON DUPLICATE KEY UPDATE with a no-op: a duplicate instance is skipped, while a value that
# does not fit is still an error (INSERT IGNORE would truncate it silently).
# A new location of a known instance's file is written (the newest file wins); no path keeps the old one.
_RECORD = ("INSERT INTO dicom_series_instance (tenant_id, study_uid, series_uid, sop_uid, file_path) VALUES {rows} "
           "ON DUPLICATE KEY UPDATE file_path = COALESCE(VALUES(file_path), file_path)")
_INSTANCES = ("SELECT sop_uid, file_path FROM dicom_series_instance WHERE tenant_id = %s AND study_uid = %s "
              "AND series_uid = %s ORDER BY sop_uid")
# A table created before file_path existed gets it here: MySQL has no ADD COLUMN IF NOT EXISTS.
_HAS_PATH = ("SELECT count(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
             "AND TABLE_NAME = 'dicom_series_instance' AND COLUMN_NAME = 'file_path'")
_ADD_PATH = "ALTER TABLE dicom_series_instance ADD COLUMN file_path text NULL"
_DUPLICATE_COLUMN = 1060
_COUNT = ("SELECT count(*) FROM dicom_series_instance WHERE tenant_id = %s AND study_uid = %s "
          "AND series_uid = %s")
_NEXT_VERSION = ("INSERT INTO dicom_series_version (tenant_id, study_uid, series_uid, version, created_time) "
                 "VALUES (%s, %s, %s, 1, %s) ON DUPLICATE KEY UPDATE version = version + 1")
_READ_VERSION = ("SELECT version, created_time FROM dicom_series_version "
                 "WHERE tenant_id = %s AND study_uid = %s AND series_uid = %s")


class MySQLSeriesFacts(FactsBase):
    """Records instances of a series in MySQL and returns its exact count. I/O only from :meth:`start`."""

    def __init__(self, dsn: str | Secret, *, connect_timeout: float = 10.0) -> None:
        super().__init__()
        self._dsn = dsn if isinstance(dsn, Secret) else Secret(dsn)
        self._args = connect_args(self._dsn.get())
        self.connect_timeout = connect_timeout
        self._pool: Any = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"MySQLSeriesFacts(dsn={mask_dsn(self._dsn.get())!r})"

    async def start(self) -> None:
        async with self._lock:
            if self._pool is not None:
                return
            pool = await asyncio.wait_for(asyncmy.create_pool(minsize=1, maxsize=2, autocommit=True,
                                                              connect_timeout=self.connect_timeout, **self._args),
                                          timeout=self.connect_timeout + 5)
            try:
                async with pool.acquire() as conn:
                    await apply_mysql_schema(conn)
                    await _add_path_column(conn)
            except BaseException:
                pool.close()
                raise
            self._pool = pool

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.wait_closed(), 10.0)

    async def record(self, tenant: str, study: str, series: str, sop_uids: Sequence[str],
                     created: str | None = None, paths: Mapping[str, str] | None = None) -> SeriesFact:
        try:
            if self._pool is None:
                await self.start()
            pool = self._pool
            conn = await asyncio.wait_for(pool.acquire(), timeout=self.connect_timeout)
            try:
                version, first_created, count = await self._transaction(conn, tenant, study, series, sop_uids,
                                                                        created, paths or {})
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()  # possibly broken: never back into the pool
                raise
            finally:
                await pool.release(conn)
        except SinkError:
            raise
        except Exception as exc:
            error = translate(exc, "series facts")
            raise error if isinstance(error, SinkRetryableError) else SinkError(error.message) from exc
        self.counters["recorded_batches"] += 1
        return SeriesFact(count, version, first_created)

    async def instances(self, tenant: str, study: str, series: str) -> list[InstanceFile]:
        try:
            if self._pool is None:
                await self.start()
            async with self._pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(_INSTANCES, (tenant, study, series))
                rows = await cur.fetchall()
        except SinkError:
            raise
        except Exception as exc:
            error = translate(exc, "series facts")
            raise error if isinstance(error, SinkRetryableError) else SinkError(error.message) from exc
        return [InstanceFile(sop, path) for sop, path in rows]

    @staticmethod
    async def _transaction(conn: Any, tenant: str, study: str, series: str, sop_uids: Sequence[str],
                           created: str | None, paths: Mapping[str, str]) -> tuple[int, Any, int]:
        key = (tenant, study, series)
        async with conn.cursor() as cur:
            await cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await conn.begin()
            try:
                await cur.execute(_NEXT_VERSION, (*key, timestamp(created)))
                await cur.execute(_READ_VERSION, key)
                version, first_created = await cur.fetchone()
                uids = list(dict.fromkeys(sop_uids))
                if uids:
                    rows = ", ".join(["(%s, %s, %s, %s, %s)"] * len(uids))
                    await cur.execute(_RECORD.format(rows=rows),
                                      [v for uid in uids for v in (*key, uid, paths.get(uid))])
                await cur.execute(_COUNT, key)
                (count,) = await cur.fetchone()
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise
        return int(version), first_created, int(count)


async def _add_path_column(conn: Any) -> None:
    """``file_path`` on a dicom_series_instance created by an older release (idempotent; a twin
    worker adding it at the same moment is fine)."""
    async with conn.cursor() as cur:
        await cur.execute(_HAS_PATH)
        (present,) = await cur.fetchone()
        if present:
            return
        try:
            await cur.execute(_ADD_PATH)
        except asyncmy.errors.MySQLError as exc:  # whichever class the driver maps 1060 to
            if exc.args and exc.args[0] == _DUPLICATE_COLUMN:
                return
            raise
