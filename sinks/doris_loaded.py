"""Transfer-log rows already loaded into Doris, recorded in PostgreSQL.

``dicom_object_meta`` is a DUPLICATE KEY table: a row loaded twice is two rows. Within one
broker, a replay meets the same label (intents) or the trace-id window re-read from the
topic. On the embedded stack a restart after a crash uses a fresh broker, where neither
exists any more, and the journal publishes the last events again. This record outlives the
broker: after each successful load the batch's (trace id, status) keys are stored, and a
later batch leaves out rows whose key is already there. Only a crash between a load's
success and this record (milliseconds) can still let one batch in again.

A key is needed only while its event can still be published again: on the embedded stack
until the journal's checkpoint passed it, on an external broker within the topics'
retention. :meth:`LoadedKeys.prune` deletes the keys older than that horizon, so the table
holds at most one retention's worth of keys (DICOMFLOW_DORIS_LOADED_RETENTION_HOURS).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import asyncpg

from core.settings import Secret
from sinks.pg_pool import LazyPool

__all__ = ["LoadedKeys"]

_DDL = ("CREATE TABLE IF NOT EXISTS dicomflow_doris_loaded (tbl varchar(64) not null, dkey text not null, "
        "created timestamptz not null default now(), PRIMARY KEY (tbl, dkey));"
        # tables made before pruning existed get the column (their keys count from now)
        "ALTER TABLE dicomflow_doris_loaded ADD COLUMN IF NOT EXISTS created timestamptz not null default now();"
        "CREATE INDEX IF NOT EXISTS dicomflow_doris_loaded_created ON dicomflow_doris_loaded (created)")
#: Deleted in slices, so that pruning a large backlog never holds long locks.
_PRUNE = ("DELETE FROM dicomflow_doris_loaded WHERE ctid IN "
          "(SELECT ctid FROM dicomflow_doris_loaded WHERE created < $1 LIMIT $2)")
PRUNE_SLICE = 10_000
_KNOWN = "SELECT dkey FROM dicomflow_doris_loaded WHERE tbl = $1 AND dkey = ANY($2::text[])"
_ADD = ("INSERT INTO dicomflow_doris_loaded (tbl, dkey) SELECT $1, unnest($2::text[]) "
        "ON CONFLICT DO NOTHING")


#: Serialises the DDL between workers starting together (IF NOT EXISTS is not race-free).
_DDL_LOCK_KEY = 0x646F726973  # "doris"


async def _create_table(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({_DDL_LOCK_KEY})")
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

    async def prune(self, older_than: datetime) -> int:
        """Delete the keys recorded before ``older_than`` (aware); returns how many."""
        pool = await self._pool.get()
        total = 0
        while True:
            status = await pool.execute(_PRUNE, older_than, PRUNE_SLICE)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < PRUNE_SLICE:
                return total
