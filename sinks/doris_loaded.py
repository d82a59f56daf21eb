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

from collections.abc import Iterable

import asyncpg

from core.settings import Secret
from sinks.pg_pool import LazyPool

__all__ = ["LoadedKeys"]

_DDL = ("CREATE TABLE IF NOT EXISTS dicomflow_doris_loaded (tbl varchar(64) not null, dkey text not null, "
        "PRIMARY KEY (tbl, dkey))")
_KNOWN = "SELECT dkey FROM dicomflow_doris_loaded WHERE tbl = $1 AND dkey = ANY($2::text[])"
_ADD = ("INSERT INTO dicomflow_doris_loaded (tbl, dkey) SELECT $1, unnest($2::text[]) "
        "ON CONFLICT DO NOTHING")


async def _create_table(conn: asyncpg.Connection) -> None:
    await conn.execute(_DDL)


class LoadedKeys:
    """A durable set of loaded keys per table. I/O only from :meth:`start` on."""

    def __init__(self, dsn: str | Secret) -> None:
        self._pool = LazyPool(dsn, _create_table)

    async def start(self) -> None:
        await self._pool.start()

    async def stop(self) -> None:
        await self._pool.stop()

    async def known(self, table: str, keys: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return set()
        pool = await self._pool.get()
        return {r["dkey"] for r in await pool.fetch(_KNOWN, table, wanted)}

    async def add(self, table: str, keys: Iterable[str]) -> None:
        batch = list(dict.fromkeys(keys))
        if not batch:
            return
        pool = await self._pool.get()
        await pool.execute(_ADD, table, batch)
