"""Per-instance facts beside the series index (PostgreSQL and MariaDB): exact counts, a version per
flush, the first created_time kept."""

from __future__ import annotations

from datetime import datetime

import pytest

from sinks.series_facts import open_facts
from tests.fixtures_mysql import IndexDb

pytestmark = pytest.mark.integration


async def test_counts_are_distinct_instances_and_versions_grow(index_db: IndexDb) -> None:
    facts = open_facts(index_db.dsn)
    await facts.start()
    try:
        first = await facts.record("t1", "1.2", "1.2.3", ["a", "b"], "2026-01-02 03:04:05.000006")
        assert (first.count, first.version, first.created) == (2, 1, datetime(2026, 1, 2, 3, 4, 5, 6))
        # a replay of the same window, an instance sent again, and a new one
        again = await facts.record("t1", "1.2", "1.2.3", ["a", "b"], "2026-05-05 00:00:00")
        grown = await facts.record("t1", "1.2", "1.2.3", ["b", "c"], None)
        assert (again.count, grown.count) == (2, 3)
        assert again.version < grown.version
        assert grown.created == first.created  # the series' first created_time stays
        other = await facts.record("t1", "1.2", "1.2.4", [], "not a time")
        assert (other.count, other.version, other.created) == (0, 1, None)
        # an instance repeated within one window counts once
        repeated = await facts.record("t1", "1.2", "1.2.4", ["x", "x", "y"], None)
        assert (repeated.count, repeated.version) == (2, 2)
    finally:
        await facts.stop()
