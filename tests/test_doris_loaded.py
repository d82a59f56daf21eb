"""The Doris transfer log's loaded keys are bounded: keys past their horizon are deleted (issue #13)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from sinks import doris_loaded
from sinks.doris_loaded import LoadedKeys


async def test_keys_older_than_the_horizon_are_pruned_and_the_rest_kept(pg_dsn: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(doris_loaded, "PRUNE_SLICE", 3)  # several slices: the loop must finish them all
    keys = LoadedKeys(pg_dsn)
    await keys.start()
    try:
        await keys.add("dicom_object_meta", [f"old{i}" for i in range(7)])
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("UPDATE dicomflow_doris_loaded SET created = now() - interval '8 days'")
        finally:
            await conn.close()
        await keys.add("dicom_object_meta", ["new1", "new2"])
        assert await keys.prune(datetime.now(UTC) - timedelta(days=7)) == 7
        assert await keys.known("dicom_object_meta", ["old0", "old6", "new1", "new2"]) == {"new1", "new2"}
        assert await keys.prune(datetime.now(UTC) - timedelta(days=7)) == 0
    finally:
        await keys.stop()


async def test_a_table_from_before_pruning_gets_its_column(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS dicomflow_doris_loaded")
        await conn.execute("CREATE TABLE dicomflow_doris_loaded (tbl varchar(64) not null, dkey text not null, "
                           "PRIMARY KEY (tbl, dkey))")
        await conn.execute("INSERT INTO dicomflow_doris_loaded VALUES ('dicom_object_meta', 'k')")
    finally:
        await conn.close()
    keys = LoadedKeys(pg_dsn)
    await keys.start()
    try:
        assert await keys.known("dicom_object_meta", ["k"]) == {"k"}
        assert await keys.prune(datetime.now(UTC) - timedelta(hours=1)) == 0  # counted from the upgrade on
    finally:
        await keys.stop()
