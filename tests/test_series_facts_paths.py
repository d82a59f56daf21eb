"""The instance files' paths kept with the series facts (PostgreSQL and MariaDB): recorded, read
back, moved by a re-sent instance, kept by a replay without one, and the column added to a table
an older release created."""

from __future__ import annotations

import asyncmy
import asyncpg
import pytest

from sinks.mysql import connect_args
from sinks.series_facts import InstanceFile, open_facts
from tests.fixtures_mysql import IndexDb

pytestmark = pytest.mark.integration


async def _execute(index_db: IndexDb, sql: str) -> None:
    if index_db.kind == "mysql":
        conn = await asyncmy.connect(**connect_args(index_db.dsn), connect_timeout=5)
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql)
            await conn.commit()
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(index_db.dsn)
    try:
        await pg.execute(sql)
    finally:
        await pg.close()


async def test_paths_are_recorded_read_back_and_follow_the_newest_file(index_db: IndexDb) -> None:
    facts = open_facts(index_db.dsn)
    await facts.start()
    try:
        key = ("tp", "1.2", "1.2.9")
        fact = await facts.record(*key, ["a", "b", "a"], None, {"a": "x/a.dcm", "b": "y/b"})
        assert fact.count == 2
        assert await facts.instances(*key) == [InstanceFile("a", "x/a.dcm"), InstanceFile("b", "y/b")]
        # "a" sent again from elsewhere: its newest file; a replay with no path keeps "b"'s; "c" has none.
        await facts.record(*key, ["a", "b", "c"], None, {"a": "z/a again"})
        assert await facts.instances(*key) == [InstanceFile("a", "z/a again"), InstanceFile("b", "y/b"),
                                               InstanceFile("c", None)]
        assert await facts.instances("tp", "1.2", "unknown") == []
    finally:
        await facts.stop()


async def test_the_path_column_is_added_to_an_older_table(index_db: IndexDb) -> None:
    first = open_facts(index_db.dsn)
    await first.start()
    await first.stop()
    await _execute(index_db, "ALTER TABLE dicom_series_instance DROP COLUMN file_path")
    await _execute(index_db, "INSERT INTO dicom_series_instance (tenant_id, study_uid, series_uid, sop_uid) "
                             "VALUES ('old', '1', '2', 'o')")
    facts = open_facts(index_db.dsn)  # a worker of this release on the older table
    await facts.start()
    try:
        assert await facts.instances("old", "1", "2") == [InstanceFile("o", None)]
        await facts.record("old", "1", "2", ["o"], None, {"o": "found/o.dcm"})
        assert await facts.instances("old", "1", "2") == [InstanceFile("o", "found/o.dcm")]
    finally:
        await facts.stop()
