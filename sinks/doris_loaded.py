"""Transfer-log rows already loaded into Doris, recorded in PostgreSQL.

``dicom_object_meta`` is a DUPLICATE KEY table: a row loaded twice is two rows. Within one
broker, a replay meets the same label (intents) or the trace-id window re-read from the
topic. On the embedded stack a restart after a crash uses a fresh broker, where neither
exists any more, and the journal publishes the last events again. This record outlives the
broker: after each successful load the batch's (trace id, status) keys are stored, and a
later batch leaves out rows whose key is already there. Only a crash between a load's
success and this record (milliseconds) can still let one batch in again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import asyncpg

from core.settings import Secret

__all__ = ["LoadedKeys"]

_DDL = ("CREATE TABLE IF NOT EXISTS dicomflow_doris_loaded (tbl varchar(64) not null, dkey text not null, "
        "PRIMARY KEY (tbl, dkey))")
_KNOWN = "SELECT dkey FROM dicomflow_doris_loaded WHERE tbl = $1 AND dkey = ANY($2::text[])"
_ADD = ("INSERT INTO dicomflow_doris_loaded (tbl, dkey) SELECT $1, unnest($2::text[]) "
        "ON CONFLICT DO NOTHING")


class LoadedKeys:
    """A durable set of loaded keys per table. I/O only from :meth:`start` on."""

    def __init__(self, dsn: str | Secret) -> None:
        self._dsn = dsn if isinstance(dsn, Secret) else Secret(dsn)
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._pool is None:
                pool = await asyncpg.create_pool(self._dsn.get(), min_size=1, max_size=2, timeout=10.0)
                try:
                    await pool.execute(_DDL)
                except BaseException:
                    pool.terminate()
                    raise
                self._pool = pool

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except Exception:
                pool.terminate()

    async def known(self, table: str, keys: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return set()
        await self.start()
        assert self._pool is not None
        return {r["dkey"] for r in await self._pool.fetch(_KNOWN, table, wanted)}

    async def add(self, table: str, keys: Iterable[str]) -> None:
        batch = list(dict.fromkeys(keys))
        if not batch:
            return
        await self.start()
        assert self._pool is not None
        await self._pool.execute(_ADD, table, batch)
