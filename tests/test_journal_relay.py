"""The journal and the relay: what an acknowledged event rests on when the broker keeps nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from feeders.journal import Checkpoint, JournalPublisher, journal_files, read_lines
from feeders.relay import Relay


class Broker:
    """Stands in for the broker side only: what was published, and the lag the pipeline shows."""

    def __init__(self) -> None:
        self.sent: list[tuple[str | None, Any]] = []
        self.lag = 0

    async def publish(self, event: dict[str, Any], key: str | None, *, topic: str | None = None) -> None:
        self.sent.append((key, event))

    async def publish_raw(self, value: bytes, key: str | None, *, topic: str | None = None) -> None:
        self.sent.append((key, value))

    async def total_lag(self) -> int:
        return self.lag

    async def input_lag(self) -> int:
        return self.lag


async def test_a_journaled_event_is_a_durable_line(tmp_path: Path) -> None:
    journal = JournalPublisher(tmp_path, "scp")
    await journal.start()
    await journal.publish({"trace_id": "t1", "file_path": "a.dcm"}, "k1")
    await journal.publish_raw(b"\xff not json", None)
    path = journal.writer.path
    assert path is not None and oct(path.stat().st_mode & 0o777) == "0o600"
    lines = list(read_lines(path, 0))
    assert [(line.key, line.event.get("trace_id"), line.raw) for line in lines] == [
        ("k1", "t1", None), (None, None, b"\xff not json")]
    # a line still being written (no newline yet) is not a line
    with open(path, "ab") as f:
        f.write(b'{"key": "k2", "event": {"trace_id": "t2"')
    assert len(list(read_lines(path, 0))) == 2
    await journal.stop()


async def test_relay_publishes_and_checkpoints_only_when_drained(tmp_path: Path) -> None:
    journal = JournalPublisher(tmp_path, "scp")
    await journal.start()
    for i in range(5):
        await journal.publish({"trace_id": f"t{i}"}, f"k{i}")
    broker = Broker()
    relay = Relay(tmp_path, broker, broker, settle_s=2.0)
    relay.start()
    broker.lag = 3  # the workers are still busy
    assert not await relay.step(0.0)
    assert [e["trace_id"] for _, e in broker.sent] == [f"t{i}" for i in range(5)]
    assert Checkpoint(tmp_path).load().positions == {}
    broker.lag = 0
    assert not await relay.step(1.0)  # quiet, but not for a whole settle time yet
    assert await relay.step(3.5)
    (name, position), = Checkpoint(tmp_path).load().positions.items()
    assert journal.writer.path is not None and position == journal.writer.path.stat().st_size
    # the file is still open: it stays; once closed and checkpointed it goes
    assert journal_files(tmp_path)
    await journal.stop()
    assert await relay.step(10.0)
    assert journal_files(tmp_path) == []


async def test_a_restarted_relay_publishes_again_from_the_checkpoint(tmp_path: Path) -> None:
    journal = JournalPublisher(tmp_path, "cli")
    await journal.start()
    await journal.publish({"trace_id": "before"}, None)
    first = Broker()
    relay = Relay(tmp_path, first, first, settle_s=0.0)
    relay.start()
    assert not await relay.step(0.0)  # published now: drained only once a round sends nothing
    assert await relay.step(0.1)  # drained: "before" is checkpointed
    await journal.publish({"trace_id": "after-1"}, None)
    await journal.publish({"trace_id": "after-2"}, None)
    await relay.publish_new()  # published to a broker that is then lost, never checkpointed
    # a new stack: a fresh broker, a new relay
    fresh = Broker()
    again = Relay(tmp_path, fresh, fresh, settle_s=0.0)
    again.start()
    await again.publish_new()
    assert [e["trace_id"] for _, e in fresh.sent] == ["after-1", "after-2"]
    await journal.stop()


async def test_a_dead_writers_file_is_deleted_once_checkpointed(tmp_path: Path) -> None:
    # A feeder killed mid-run never renames its file: the relay sees its process is gone.
    dead = tmp_path / f"scp-{1}-{2**22 + 12345}.jsonl"
    dead.write_bytes(orjson.dumps({"key": None, "event": {"trace_id": "x"}}) + b"\n")
    assert not os.path.exists(f"/proc/{2**22 + 12345}")
    broker = Broker()
    relay = Relay(tmp_path, broker, broker, settle_s=0.0)
    relay.start()
    assert not await relay.step(0.0)
    assert await relay.step(0.1)
    assert [e["trace_id"] for _, e in broker.sent] == ["x"] and not dead.exists()


async def test_a_half_line_left_by_a_killed_writer_does_not_stop_checkpoints(tmp_path: Path) -> None:
    dead = tmp_path / f"scp-{1}-{2**22 + 12346}.jsonl"
    dead.write_bytes(orjson.dumps({"key": None, "event": {"trace_id": "whole"}}) + b"\n" + b'{"key": null, "ev')
    broker = Broker()
    relay = Relay(tmp_path, broker, broker, settle_s=0.0)
    relay.start()
    assert not await relay.step(0.0)
    assert await relay.step(0.1)  # the half line was never acknowledged: drained without it
    assert [e["trace_id"] for _, e in broker.sent] == ["whole"] and not dead.exists()


async def test_the_relay_does_not_checkpoint_while_a_worker_cannot_say_it_is_settled(tmp_path: Path) -> None:
    class Workers:
        answer = False

        async def settled(self) -> bool:
            return self.answer

    journal = JournalPublisher(tmp_path, "scp")
    await journal.start()
    await journal.publish({"trace_id": "t"}, None)
    broker, workers = Broker(), Workers()
    relay = Relay(tmp_path, broker, broker, settle_s=0.0, workers=workers)
    relay.start()
    await relay.step(0.0)
    assert not await relay.step(0.1) and not await relay.step(5.0)  # a window may still be open
    assert Checkpoint(tmp_path).load().positions == {}
    workers.answer = True
    assert await relay.step(6.0)
    assert Checkpoint(tmp_path).load().positions
    await journal.stop()


async def test_a_drain_ends_while_the_scp_keeps_journaling_and_checkpoints_only_what_it_published(
        tmp_path: Path) -> None:
    journal = JournalPublisher(tmp_path, "scp")
    await journal.start()
    await journal.publish({"trace_id": "t0"}, None)
    broker = Broker()
    relay = Relay(tmp_path, broker, broker, settle_s=0.0, interval_s=0.01)
    relay.start()
    await relay.publish_new()
    assert journal.writer.path is not None
    published_end = journal.writer.path.stat().st_size

    class Appending:
        """The lag probe of a pipeline whose SCP gets a new instance every round."""

        rounds = 0

        async def total_lag(self) -> int:
            self.rounds += 1
            await journal.publish({"trace_id": f"late{self.rounds}"}, None)
            return 0

    relay.lag = Appending()
    assert await relay.drain(5.0)
    assert [e["trace_id"] for _, e in broker.sent] == ["t0"]
    (position,) = Checkpoint(tmp_path).load().positions.values()
    assert position == published_end  # the lines appended during the drain are the next relay's
    again = Relay(tmp_path, broker, broker, settle_s=0.0)
    again.start()
    await again.publish_new()
    assert [e["trace_id"] for _, e in broker.sent][1:] == [f"late{i}" for i in range(1, relay.lag.rounds + 1)]
    await journal.stop()


async def test_the_relay_publishes_no_further_ahead_of_the_pipeline_than_its_bound(tmp_path: Path) -> None:
    journal = JournalPublisher(tmp_path, "scp")
    await journal.start()
    for i in range(7):
        await journal.publish({"trace_id": f"t{i}"}, None)
    class Backlogged(Broker):
        """A pipeline that processes nothing: every event published is lag."""

        processed = 0

        async def input_lag(self) -> int:
            return self.lag + len(self.sent) - self.processed

    broker = Backlogged()
    relay = Relay(tmp_path, broker, broker, settle_s=0.0, max_ahead=4, chunk=2)
    relay.start()
    broker.lag = 4  # the pipeline is that far behind: the rest waits in the journal
    assert await relay.publish_new() == 0
    broker.lag = 1
    assert await relay.publish_new() == 4  # two chunks, then the lag reached the bound
    broker.lag = 0
    broker.processed = 4
    assert await relay.publish_new() == 3
    assert [e["trace_id"] for _, e in broker.sent] == [f"t{i}" for i in range(7)]
    await journal.stop()


async def test_an_idle_relay_drains_at_once(tmp_path: Path) -> None:
    journal = JournalPublisher(tmp_path, "scp")
    await journal.start()
    await journal.publish({"trace_id": "t"}, None)
    broker = Broker()
    relay = Relay(tmp_path, broker, broker, settle_s=60.0)
    relay.start()
    assert await relay.drain(0.0)  # nothing published since the checkpoint: nothing to wait for
    await relay.publish_new()
    broker.lag = 1
    assert not await relay.drain(0.2)  # published and not processed: not drained
    await journal.stop()


async def test_an_idle_relay_still_waits_for_what_a_predecessor_left_in_flight(tmp_path: Path) -> None:
    broker = Broker()
    broker.lag = 2  # the previous relay's events, still being processed
    relay = Relay(tmp_path, broker, broker, settle_s=0.0, interval_s=0.01)
    relay.start()
    assert not await relay.drain(0.1)
    broker.lag = 0
    assert await relay.drain(0.1)


async def test_a_relay_restarted_on_the_same_broker_goes_on_after_its_predecessor(tmp_path: Path) -> None:
    journal = JournalPublisher(tmp_path, "scp")
    await journal.start()
    for i in range(3):
        await journal.publish({"trace_id": f"t{i}"}, None)
    broker = Broker()
    broker.lag = 3  # nothing processed yet: the drain fails, the recycle is put off

    async def same() -> str:
        return "broker-1"

    first = Relay(tmp_path, broker, broker, settle_s=0.0, interval_s=0.01, incarnation=same)
    first.start()
    await first.publish_new()
    assert not await first.drain(0.05)
    await journal.publish({"trace_id": "t3"}, None)
    second = Relay(tmp_path, broker, broker, settle_s=0.0, incarnation=same)
    second.start()
    await second._resume()
    await second.publish_new()
    assert [e["trace_id"] for _, e in broker.sent] == ["t0", "t1", "t2", "t3"]  # nothing twice

    async def other() -> str:
        return "broker-2"

    fresh = Broker()
    third = Relay(tmp_path, fresh, fresh, settle_s=0.0, incarnation=other)
    third.start()
    await third._resume()
    await third.publish_new()  # a new broker gets everything after the checkpoint
    assert [e["trace_id"] for _, e in fresh.sent] == ["t0", "t1", "t2", "t3"]
    await journal.stop()


async def test_pending_since_is_the_start_of_the_oldest_file_not_checkpointed(tmp_path: Path) -> None:
    old = JournalPublisher(tmp_path, "cli")
    await old.start()
    await old.publish({"trace_id": "a"}, None)
    await old.stop()
    newer = JournalPublisher(tmp_path, "scp")
    await newer.start()
    await newer.publish({"trace_id": "b"}, None)
    broker = Broker()
    relay = Relay(tmp_path, broker, broker, settle_s=0.0)
    relay.start()
    assert old.writer.path is not None and newer.writer.path is not None
    started = int(old.writer.path.name.split("-")[-2].split(".")[0]) / 1e9
    assert relay.pending_since() == started
    await relay.publish_new()
    assert await relay.step(0.0) or await relay.step(0.1)  # drained: all checkpointed
    assert relay.pending_since() > time.time() - 5  # nothing pending: now
    await newer.stop()


async def test_a_drained_relay_with_nothing_new_asks_nobody_until_a_line_arrives(tmp_path: Path) -> None:
    """Idle, the relay probed the lag and scraped every worker twice a second (issue #15)."""
    class Counting(Broker):
        probes = 0

        async def total_lag(self) -> int:
            self.probes += 1
            return self.lag

    class Workers:
        asked = 0

        async def settled(self) -> bool:
            self.asked += 1
            return True

    journal = JournalPublisher(tmp_path, "scp")
    await journal.start()
    await journal.publish({"trace_id": "t0"}, None)
    broker, workers = Counting(), Workers()
    relay = Relay(tmp_path, broker, broker, settle_s=1.0, workers=workers)
    relay.start()
    assert not await relay.step(0.0)
    assert not await relay.step(1.0)  # quiet from here
    assert await relay.step(2.5)  # drained: checkpointed
    probes, asked = broker.probes, workers.asked
    for t in (3.0, 4.0, 5.0):
        assert await relay.step(t)  # still drained, and nobody asked
    assert (broker.probes, workers.asked) == (probes, asked)
    await journal.publish({"trace_id": "t1"}, None)
    broker.lag = 1
    assert not await relay.step(6.0)  # a new line: published, and the lag is watched again
    assert broker.probes == probes + 1 and [e["trace_id"] for _, e in broker.sent] == ["t0", "t1"]
    broker.lag = 0
    assert not await relay.step(6.5)  # quiet from here
    assert await relay.step(8.0) and workers.asked == asked + 1
    await journal.stop()
