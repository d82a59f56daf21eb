"""Per-instance facts of the series index: which SOP instances a series holds, in PostgreSQL.

``series_related_instances`` is the number of distinct SOP instances ever stored for the
series. Kept in the broker (a marker per instance in a changelog), that number was lost
with a reset broker and grew the state forever. Here it is a durable fact: the series
stage records a window's instances and reads the exact count back in one transaction,
so a replay, a re-sent instance or a series that grows after a restart counts right,
and the window state can be dropped as soon as its window is flushed.

The facts live with the series index: in PostgreSQL here, in MySQL/MariaDB in
sinks/mysql_facts.py when DICOMFLOW_INDEX_DSN is ``mysql://`` (:func:`open_facts` picks).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from core.errors import SinkError, SinkRetryableError
from core.settings import Secret, index_kind
from sinks.base import Backoff
from sinks.pg_pool import LazyPool
from sinks.postgres import apply_schema

__all__ = ["SeriesFacts", "SeriesFact", "FactsBase", "InstanceFile", "open_facts", "timestamp"]

log = logging.getLogger(__name__)

# A known instance keeps its row; only a new location of its file is written (an instance
# sent again from elsewhere: the newest file wins, as the newest state does).
_RECORD = (
    "INSERT INTO dicom_series_instance AS i (tenant_id, study_uid, series_uid, sop_uid, file_path) "
    "SELECT $1, $2, $3, u.sop, u.path FROM unnest($4::text[], $5::text[]) AS u(sop, path) "
    "ON CONFLICT (tenant_id, study_uid, series_uid, sop_uid) DO UPDATE SET file_path = EXCLUDED.file_path "
    "WHERE EXCLUDED.file_path IS NOT NULL AND i.file_path IS DISTINCT FROM EXCLUDED.file_path"
)
_INSTANCES = ("SELECT sop_uid, file_path FROM dicom_series_instance WHERE tenant_id = $1 AND study_uid = $2 "
              "AND series_uid = $3 ORDER BY sop_uid")
_COUNT = "SELECT count(*) FROM dicom_series_instance WHERE tenant_id = $1 AND study_uid = $2 AND series_uid = $3"
# First in the transaction: its row lock serialises two flushes of one series (old and new
# owner during a rebalance), so the count that follows sees the other one's instances.
_NEXT_VERSION = (
    "INSERT INTO dicom_series_version AS v (tenant_id, study_uid, series_uid, version, created_time) "
    "VALUES ($1, $2, $3, 1, $4::timestamp) "
    "ON CONFLICT (tenant_id, study_uid, series_uid) DO UPDATE SET version = v.version + 1 "
    "RETURNING version, created_time"
)


@dataclass(frozen=True, slots=True)
class SeriesFact:
    """What PostgreSQL knows of a series after a flush."""

    count: int
    version: int
    #: The created_time of the series' first state (kept: windows come and go).
    created: datetime | None


@dataclass(frozen=True, slots=True)
class InstanceFile:
    """An instance of a series and where its file is (storage-root relative; None: recorded
    before paths were, look where the C-STORE SCP stores it)."""

    sop_uid: str
    path: str | None


def timestamp(text: str | None) -> datetime | None:
    """The wire form of a datetime (``YYYY-MM-DD HH:MM:SS[.ffffff]``) as asyncpg wants it."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


class FactsBase(abc.ABC):
    """What the series stage needs of the facts, on either server."""

    def __init__(self) -> None:
        self.counters: dict[str, float] = {"recorded_batches": 0, "retries": 0}

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def record(self, tenant: str, study: str, series: str, sop_uids: Sequence[str],
                     created: str | None = None, paths: Mapping[str, str] | None = None) -> SeriesFact:
        """Add ``sop_uids`` to the series' facts (idempotent), with their files' ``paths`` (by SOP
        UID, storage-root relative) where known; return its exact instance count and its next
        version (one more at every call: what orders the series' states)."""

    @abc.abstractmethod
    async def instances(self, tenant: str, study: str, series: str) -> list[InstanceFile]:
        """Every instance recorded for the series, with its file's path where recorded."""

    async def record_with_retry(self, tenant: str, study: str, series: str, sop_uids: Sequence[str],
                                created: str | None, should_stop: Callable[[], bool],
                                paths: Mapping[str, str] | None = None) -> SeriesFact:
        """:meth:`record`, retried with capped backoff until it succeeds or the worker stops.

        The caller's event is not acknowledged meanwhile, so a stop replays it later.
        """
        backoff = Backoff()
        while True:
            try:
                return await self.record(tenant, study, series, sop_uids, created, paths)
            except SinkError as exc:
                if should_stop():
                    raise
                self.counters["retries"] += 1
                delay = backoff.next_delay()
                log.warning("series facts unavailable (%s); retrying in %.1f s", exc.message, delay)
                await asyncio.sleep(delay)


def open_facts(dsn: Secret | str) -> FactsBase:
    """The facts beside the series index of ``dsn`` (PostgreSQL or MySQL)."""
    secret = dsn if isinstance(dsn, Secret) else Secret(dsn)
    if index_kind(secret.get()) == "mysql":
        from sinks.mysql_facts import MySQLSeriesFacts

        return MySQLSeriesFacts(secret)
    return SeriesFacts(secret)


class SeriesFacts(FactsBase):
    """Records instances of a series in PostgreSQL and returns its exact count. I/O only from :meth:`start`."""

    def __init__(self, dsn: str | Secret, *, connect_timeout: float = 10.0) -> None:
        super().__init__()
        self.connect_timeout = connect_timeout
        self._pool = LazyPool(dsn, apply_schema, connect_timeout=connect_timeout)

    def __repr__(self) -> str:
        return f"SeriesFacts({self._pool!r})"

    async def start(self) -> None:
        await self._pool.start()

    async def stop(self) -> None:
        await self._pool.stop()

    async def record(self, tenant: str, study: str, series: str, sop_uids: Sequence[str],
                     created: str | None = None, paths: Mapping[str, str] | None = None) -> SeriesFact:
        # Once each: ON CONFLICT DO UPDATE refuses to touch one row twice in a statement.
        uids = list(dict.fromkeys(sop_uids))
        files = [(paths or {}).get(uid) for uid in uids]
        try:
            pool = await self._pool.get()
            async with pool.acquire(timeout=self.connect_timeout) as conn, conn.transaction():
                row = await conn.fetchrow(_NEXT_VERSION, tenant, study, series, timestamp(created))
                if uids:
                    await conn.execute(_RECORD, tenant, study, series, uids, files)
                count = await conn.fetchval(_COUNT, tenant, study, series)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError,
                asyncpg.exceptions.CannotConnectNowError) as exc:
            raise SinkRetryableError(f"series facts: {type(exc).__name__}: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise SinkError(f"series facts: {type(exc).__name__}: {exc}") from exc
        self.counters["recorded_batches"] += 1
        return SeriesFact(int(count), int(row["version"]), row["created_time"])

    async def instances(self, tenant: str, study: str, series: str) -> list[InstanceFile]:
        try:
            pool = await self._pool.get()
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                rows = await conn.fetch(_INSTANCES, tenant, study, series)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError,
                asyncpg.exceptions.CannotConnectNowError) as exc:
            raise SinkRetryableError(f"series facts: {type(exc).__name__}: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise SinkError(f"series facts: {type(exc).__name__}: {exc}") from exc
        return [InstanceFile(r["sop_uid"], r["file_path"]) for r in rows]
