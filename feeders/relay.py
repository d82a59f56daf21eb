"""The relay: journal -> broker, and the checkpoint that lets a restarted stack lose nothing.

It publishes every complete journal line not yet published by this process (a restarted
relay starts again from the checkpoint: the broker it talks to may be a fresh one), and
it moves the checkpoint forward only at a drained point: every journal line published,
and the app's consumer group with no lag on any topic it reads, continuously for longer
than a series window, and every worker reachable and reporting no open series window
(``WorkersSettled``). At that point every event before the checkpoint is in PostgreSQL
and Doris, and files that are closed and fully checkpointed are deleted. Dead letters are
copied to an archive on disk before every checkpoint (feeders/dlq_archive.py), so after a
checkpoint nothing of value lives only in the embedded broker: ``up`` may then recycle it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

from core.errors import BrokerError
from feeders.journal import Checkpoint, complete_size, journal_files, journal_id, read_lines, writer_gone
from streams.broker import bootstrap_of, new_consumer
from streams.topology import STORAGE

__all__ = ["Relay", "LagProbe", "BrokerLag", "WorkersSettled"]

log = logging.getLogger(__name__)

#: Events sent before waiting for their acknowledgements.
CHUNK = 200


class EventSink(Protocol):
    async def publish(self, event: dict[str, Any], key: str | None, *, topic: str | None = None) -> None: ...

    async def publish_raw(self, value: bytes, key: str | None, *, topic: str | None = None) -> None: ...


class LagProbe(Protocol):
    async def total_lag(self) -> int: ...

    async def input_lag(self) -> int: ...


class BrokerLag:
    """Lag of the app's consumer group over the topics it reads (end minus committed offset)."""

    def __init__(self, broker_url: str, group: str, topics: list[str]) -> None:
        self.bootstrap = bootstrap_of(broker_url)
        self.group = group
        self.topics = topics
        #: One client for every probe (it never subscribes: looking cannot cause a rebalance). A
        #: new client per probe cost the relay and the broker about 0.5 ms CPU per instance.
        self._client: AIOKafkaConsumer | None = None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.stop()

    async def input_lag(self) -> int:
        """Lag of the storage events alone: what the relay published and ingest has not read yet.

        The outputs' lag is not the relay's to bound: the Doris stages hold up to a batch
        uncommitted on purpose, so the total sits at thousands while the pipeline keeps up.
        """
        return await self._lag([STORAGE])

    async def total_lag(self) -> int:
        return await self._lag(self.topics)

    async def _lag(self, topics: list[str]) -> int:
        try:
            if self._client is None:
                client = new_consumer(self.bootstrap, self.group)
                await client.start()
                self._client = client
            client = self._client
            tps = [TopicPartition(t, p) for t in topics for p in sorted(client.partitions_for_topic(t) or [])]
            missing = set(topics) - {tp.topic for tp in tps}
            if missing:
                await client.force_metadata_update()
                tps = [TopicPartition(t, p) for t in topics for p in sorted(client.partitions_for_topic(t) or [])]
                missing = set(topics) - {tp.topic for tp in tps}
            if missing:  # not created yet, or the broker is restarting: nothing proves a drain
                raise BrokerError(f"topics not in the broker's metadata: {sorted(missing)}")
            ends = await client.end_offsets(tps)
            lag = 0
            for tp in tps:
                committed = await client.committed(tp)
                lag += max(0, ends[tp] - (committed if committed is not None and committed >= 0 else 0))
            return lag
        except Exception:
            await self.close()  # a broken connection, or a new broker: start over next time
            raise


class LetterArchive(Protocol):
    """Where dead letters outlive the broker (feeders/dlq_archive.py)."""

    def start(self) -> None: ...

    async def sync(self) -> int: ...


#: How often the relay copies new dead letters to the archive (and always before a checkpoint).
ARCHIVE_EVERY_S = 5.0


class SettledProbe(Protocol):
    async def settled(self) -> bool: ...


class WorkersSettled:
    """Every worker reachable, and none with a series window still open (``windows_unsettled``).

    Zero lag alone does not prove a drain: an instance is acked once it is in a window, and
    the window reaches PostgreSQL only at its flush. A worker that is down, restarting or
    recovering its tables cannot say, so it fails the check (fail closed).
    """

    def __init__(self, metrics_urls: Callable[[], list[str]], *, timeout_s: float = 2.0) -> None:
        self.metrics_urls = metrics_urls
        self.timeout_s = timeout_s

    async def settled(self) -> bool:
        urls = self.metrics_urls()
        if not urls:
            return False
        for url in urls:
            try:
                text = await asyncio.to_thread(self._fetch, url)
            except OSError:
                return False
            pending = _unsettled(text)
            if pending is None or pending > 0:
                return False
        return True

    def _fetch(self, url: str) -> str:
        import urllib.request

        with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:  # noqa: S310 - the stack's own workers
            return str(resp.read().decode())


def _unsettled(text: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name.startswith("dicomflow_stage_events") and sample.labels.get("stage") == "series_window"
                    and sample.labels.get("what") == "windows_unsettled"):
                return float(sample.value)
    return None


class Relay:
    def __init__(self, directory: Path, publisher: EventSink, lag: LagProbe, *, settle_s: float,
                 interval_s: float = 0.5, workers: SettledProbe | None = None,
                 archive: LetterArchive | None = None, max_ahead: int = 0, chunk: int = CHUNK,
                 on_checkpoint: Callable[[float], Awaitable[None]] | None = None,
                 incarnation: Callable[[], Awaitable[str]] | None = None) -> None:
        self.directory = directory
        self.publisher = publisher
        self.lag = lag
        self.workers = workers
        self.settle_s = settle_s
        self.interval_s = interval_s
        self.archive = archive
        #: Publish no further while the pipeline's lag is this many events or more (0: no bound).
        #: It keeps a backlog in the journal rather than in the broker's memory, and a drain short.
        self.max_ahead = max_ahead
        #: Called at drained points of the running relay (not during a drain), with the time before
        #: which no event still to be published again was journaled (see :meth:`pending_since`).
        self.on_checkpoint = on_checkpoint
        #: The broker's incarnation id: a relay restarted on the same broker resumes after what its
        #: predecessor published there (``published.json``) instead of publishing it all again.
        self.incarnation = incarnation
        self.progress_path = directory / "published.json"
        self.chunk = chunk
        self.checkpoint = Checkpoint(directory)
        self.published: dict[str, int] = {}
        self.counters = {"published": 0, "checkpoints": 0, "files_deleted": 0}
        self._quiet_since: float | None = None
        #: What was published at the last drained point (None: not drained since start).
        self._drained_at: dict[str, int] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.published = dict(self.checkpoint.load().positions)
        log.info("relay start journal=%s files=%s checkpoint=%s", self.directory,
                 len(journal_files(self.directory)), self.published)

    async def _room(self) -> bool:
        return self.max_ahead <= 0 or await self.lag.input_lag() < self.max_ahead

    async def publish_new(self) -> int:
        """Publish the complete lines not yet published (while the pipeline keeps up); returns how many."""
        sent = 0
        for path in journal_files(self.directory):
            fid = journal_id(path)
            pending: list[Any] = []
            position = self.published.get(fid, 0)
            full = False
            with contextlib.suppress(FileNotFoundError):  # renamed on close: seen again next round
                for line in read_lines(path, position):
                    if not pending and not await self._room():  # asked only with something to send
                        full = True
                        break
                    pending.append(self.publisher.publish_raw(line.raw, line.key) if line.raw is not None
                                   else self.publisher.publish(line.event, line.key))
                    position = line.end
                    if len(pending) >= self.chunk:
                        await asyncio.gather(*pending)
                        sent += len(pending)
                        pending = []
                        self.published[fid] = position
            if pending:
                await asyncio.gather(*pending)
                sent += len(pending)
            self.published[fid] = position
            if full:
                break
        self.counters["published"] += sent
        return sent

    def _all_published(self) -> bool:
        for path in journal_files(self.directory):
            try:
                # A file nothing appends to any more may end in half a line (its writer was
                # killed mid-write): that tail was never acknowledged and never will be a line.
                size = complete_size(path) if writer_gone(path) else path.stat().st_size
            except FileNotFoundError:
                return False
            if self.published.get(journal_id(path), 0) < size:
                return False
        return True

    async def step(self, now: float, *, frozen: bool = False) -> bool:
        """One round: publish, look at the lag, checkpoint at a drained point. True when drained.

        ``frozen``: publish nothing new and checkpoint what was published once the pipeline has
        processed it. Lines appended meanwhile are left for the next relay; that is how a drain
        ends while the SCP keeps accepting (and journaling) instances.
        """
        sent = 0 if frozen else await self.publish_new()
        if (not frozen and not sent and self._drained_at is not None and self._drained_at == self.published
                and self._all_published()):
            # Nothing published since the last drained point: still drained. No lag probe, no
            # scrape of the workers: an idle stack costs the relay, the broker and the workers
            # nothing every round (issue #15). Only closed files it has passed are deleted.
            self._prune()
            self._drained_at = dict(self.published)
            return True
        lag = await self.lag.total_lag()
        if sent or lag or (not frozen and not self._all_published()):
            self._quiet_since = None
            return False
        if self._quiet_since is None:
            self._quiet_since = now
        if now - self._quiet_since < self.settle_s:
            return False
        if self.workers is not None and not await self.workers.settled():
            self._quiet_since = None
            return False
        if self.archive is not None:
            # Every letter of a checkpointed event is archived: it is never published again.
            await self.archive.sync()
        if self.published != self.checkpoint.positions:
            self.checkpoint.save(self.published)
            self.counters["checkpoints"] += 1
            log.info("relay checkpoint %s", self.published)
        self._prune()
        if self.on_checkpoint is not None and not frozen:
            await self.on_checkpoint(self.pending_since())
        if not frozen:
            self._drained_at = dict(self.published)
        return True

    def pending_since(self) -> float:
        """Wall-clock start of the oldest journal file not fully checkpointed (now when none).

        Every event that a restart may publish again was journaled after this time.
        """
        for path in journal_files(self.directory):  # oldest first
            try:
                if self.checkpoint.get(journal_id(path)) < complete_size(path):
                    return int(journal_id(path).split("-")[-2]) / 1e9
            except (FileNotFoundError, IndexError, ValueError):
                return 0.0  # cannot tell: nothing may be taken as past
        return time.time()

    async def _resume(self) -> None:
        """On the broker its predecessor published to, go on after what that one published."""
        if self.incarnation is None:
            return
        try:
            saved = json.loads(self.progress_path.read_text())
            current = await self.incarnation()
        except (OSError, ValueError):
            return
        if not isinstance(saved, dict) or saved.get("incarnation") != current:
            return  # a new broker: everything after the checkpoint must be published to it
        for fid, position in (saved.get("positions") or {}).items():
            if int(position) > self.published.get(fid, 0):
                self.published[fid] = int(position)
        log.info("relay resumes on broker incarnation %s at %s", current, self.published)

    async def save_progress(self) -> None:
        """Note what this relay published, and to which broker (no fsync: losing it only means
        publishing again what the broker already has)."""
        if self.incarnation is None:
            return
        try:
            doc = {"incarnation": await self.incarnation(), "positions": self.published}
            tmp = self.progress_path.with_name(".published.json.tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.progress_path)
        except Exception as exc:  # only an optimisation: the checkpoint is what counts
            log.warning("relay: progress not saved: %s", exc)

    def _prune(self) -> None:
        """Delete files nothing can append to any more and the checkpoint has passed entirely."""
        changed = False
        for path in journal_files(self.directory):
            fid = journal_id(path)
            try:
                done = self.checkpoint.get(fid) >= complete_size(path)
            except FileNotFoundError:
                continue
            if done and writer_gone(path):
                path.unlink(missing_ok=True)
                self.published.pop(fid, None)
                changed = True
                self.counters["files_deleted"] += 1
        if changed:
            self.checkpoint.save(self.published)

    async def run(self, stop: asyncio.Event) -> None:
        self.start()
        if self.archive is not None:
            self.archive.start()
        await self._resume()
        next_archive = 0.0
        while not stop.is_set():
            try:
                if self.archive is not None and time.monotonic() >= next_archive:
                    await self.archive.sync()
                    next_archive = time.monotonic() + ARCHIVE_EVERY_S
                await self.step(time.monotonic())
            except Exception as exc:  # the broker restarting, say: the journal keeps everything
                log.warning("relay round failed: %s", exc)
                self._quiet_since = None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def drain(self, timeout: float) -> bool:
        """At shutdown: publish nothing more, wait (bounded) until the pipeline has processed
        what was published, and checkpoint it.

        Freezing is what lets a drain end under load: lines not published yet stay in the
        journal for the next relay instead of keeping the pipeline busy forever, and with
        ``max_ahead`` what is left to process is bounded too.
        """
        try:
            return await self._drain(timeout)
        finally:
            await self.save_progress()

    async def _drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self.published == self.checkpoint.positions:
            # Nothing published since the last drained point, and nothing in flight (a
            # predecessor's events may be): an idle stack stops at once.
            try:
                if (await self.lag.total_lag() == 0
                        and (self.workers is None or await self.workers.settled())):
                    if self.archive is not None:
                        await self.archive.sync()
                    return True
            except Exception as exc:
                log.warning("relay drain: the idle check failed: %s", exc)
        while time.monotonic() < deadline:
            try:
                if await self.step(time.monotonic(), frozen=True):
                    return True
            except Exception as exc:
                log.warning("relay drain round failed: %s", exc)
            await asyncio.sleep(self.interval_s)
        log.warning("relay: not drained within %.0f s; the next start publishes again from the checkpoint",
                    timeout)
        return False
