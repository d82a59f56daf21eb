"""The sink contract's start-up rule: a destination that is down at worker start does not stop the worker."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from core.errors import SinkError, SinkRetryableError
from sinks.base import Backoff, BatchingSink, Rejected, SinkBatch, SinkItem, flush_with_retry, start_or_defer


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
