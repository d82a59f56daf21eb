"""The sink contract's start-up rule: a destination that is down at worker start does not stop the worker."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import date

import pytest

from core.errors import SinkError, SinkRetryableError
from schemas.records import DicomStateMeta
from sinks.base import (
    Backoff,
    BatchingSink,
    Rejected,
    RetryAborted,
    SinkBatch,
    SinkItem,
    flush_with_retry,
    start_or_defer,
)
from sinks.index import index_for_dsn
from tests.fixtures_mysql import IndexDb


class FlakySink(BatchingSink[int]):
    """Fails to start ``failures`` times with ``error``; write() starts it first, like the real sinks."""

    name = "flaky"

    def __init__(self, failures: int, error: SinkError) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.started = False
        self.written: list[int] = []

    async def start(self) -> None:
        if self.failures:
            self.failures -= 1
            raise self.error
        self.started = True

    async def write(self, batch: SinkBatch[int]) -> Sequence[Rejected[int]]:
        if not self.started:
            await self.start()
        self.written.extend(item.value for item in batch.items)
        return []


async def no_rejections(rejected: Sequence[Rejected[int]]) -> None:
    raise AssertionError(rejected)


async def test_down_at_start_is_deferred_to_the_first_write(caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink(3, SinkRetryableError("connection refused", retry_after=0.0))
    with caplog.at_level(logging.WARNING, logger="sinks.base"):
        await start_or_defer(sink)
    assert not sink.started and "not started" in caplog.text
    sink.add(SinkItem(7, None, "t", 0, 0))
    assert await flush_with_retry(sink, on_rejected=no_rejections, backoff=Backoff(0.001, 0.01)) == 1
    assert sink.started and sink.written == [7] and sink.counters["retries"] == 2


async def test_hard_start_failure_is_logged_and_raised_by_the_write(caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink(1, SinkError("bad password"))
    with caplog.at_level(logging.ERROR, logger="sinks.base"):
        await start_or_defer(sink)
    assert "failed to start" in caplog.text and "bad password" in caplog.text
    sink.failures = 1
    sink.add(SinkItem(7, None, "t", 0, 0))
    with pytest.raises(SinkError, match="bad password"):
        await flush_with_retry(sink, on_rejected=no_rejections)


async def test_a_started_sink_starts_once() -> None:
    sink = FlakySink(0, SinkError("unused"))
    await start_or_defer(sink)
    assert sink.started


# -- the same rules on the real series-index servers (PostgreSQL and MariaDB) -------------


@pytest.mark.integration
async def test_a_real_index_with_a_wrong_password_never_writes_and_never_shows_it(
        index_db: IndexDb, caplog: pytest.LogCaptureFixture) -> None:
    """Start-up rule on both providers: the refusal is logged with the password masked, and the
    batch is never reported written (so never acked): a retry (PostgreSQL, a rotation in progress)
    or a hard error (MariaDB at first start; the worker's preflight stops it before this)."""
    secret = index_db.dsn.split(":")[2].split("@")[0]
    wrong = index_db.dsn.replace(f":{secret}@", ":Wr0ngSecret@", 1)
    sink = index_for_dsn(wrong, connect_timeout=5)
    with caplog.at_level(logging.WARNING):
        await start_or_defer(sink)
    assert "Wr0ngSecret" not in caplog.text
    assert "not started" in caplog.text or "failed to start" in caplog.text
    state = DicomStateMeta(tenant_id="t", patient_id="p", study_uid="1.2", series_uid="1.2.3", study_uid_hash="1",
                           series_uid_hash="2", study_date_origin="20240101", study_date=date(2024, 1, 1),
                           accession_number="A1")
    sink.add(SinkItem(state, state.key, "t", 0, 0))

    with pytest.raises((SinkError, RetryAborted)) as info:
        await flush_with_retry(sink, on_rejected=no_rejections, should_stop=lambda: True,
                               backoff=Backoff(0.01, 0.01))
    assert "Wr0ngSecret" not in str(info.value) and sink.counters["rows"] == 0
    await sink.stop()
