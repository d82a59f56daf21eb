"""Series JSON stage: dicom_state_queue -> one DICOM JSON document per series, and dicom_json_meta.

Triggered by the series flushes on the state topic (not by polling the index): each flush
(re)schedules its series for ``json_quiet_seconds`` after its ``updated_time``, so a series
that keeps arriving is written once, after it went quiet (the seeds' debounce). The event is
acked once scheduled; the schedule itself is not durable and need not be: the series index
holds the truth (``stale_json``: a state no JSON covers), and the stage reads it once after
every assignment change, for the partitions it owns.

When a series is due the stage reads its state from the index. If the index is behind the
event (the PostgreSQL stage has not written it yet), it waits. If ``dicom_json_meta`` already
covers that state (``flag_time`` = its ``updated_time``), nothing is written: a replayed or
repeated flush never regenerates. Otherwise it writes the document (dicom/json_model.py,
sinks/json_documents.py) in a thread and upserts ``dicom_json_meta`` with the seeds'
semantics: ``flag_time`` = the covered state's ``updated_time``, ``json_status`` 1 (ok) or 2
(failed), ``retry_times`` = failures of that state. A failure is retried with doubling backoff
up to ``json_max_retries``; then it is reported (an ERROR line, ``json_documents_total
{result="failed"}``) and left until the series changes again.

Load gate (measured, not guessed as the seeds' CPU/memory thresholds): before JSON work the
stage reads the app's consumer lag from the broker (end minus committed offsets of the topics
the app consumes, at most every 2 s); above ``json_max_lag`` the work waits (counter
``deferred_by_load``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
from aiokafka.partitioner import DefaultPartitioner
from faust import Stream
from faust.types import StreamT

from agents.gaps import GapGuard
from agents.sink_support import release, stopping
from agents.web_series import register as register_web
from core.errors import FileAccessError
from dicom.json_model import JsonOptions
from dicom.paths import path_components
from schemas import codec
from schemas.records import DicomJsonMeta, DicomStateMeta, series_key
from sinks.base import RetryAborted, retry_until_done, start_or_defer
from sinks.json_documents import (
    SeriesDocument,
    document_path,
    instance_files,
    series_directory,
    write_series_document,
)
from sinks.series_facts import FactsBase, InstanceFile
from streams.broker import committed_offsets, end_offsets
from streams.topology import STATE, consumed_topics

if TYPE_CHECKING:
    from core.settings import Settings
    from sinks.index import SeriesIndex
    from streams.app import DicomflowApp

__all__ = ["SeriesJsonStage", "Pending", "register", "STATUS_OK", "STATUS_FAILED"]

log = logging.getLogger(__name__)

STATUS_OK = 1
STATUS_FAILED = 2
#: Longest wait between two attempts of a failed series.
MAX_BACKOFF_S = 3600.0
#: How long a due series waits for the index to catch up with its event before looking again.
INDEX_BEHIND_WAIT_S = 1.0
#: After this long behind, the index is taken to have refused the state (the PostgreSQL stage dead-letters).
INDEX_BEHIND_GIVE_UP_S = 600.0
LAG_REFRESH_S = 2.0
RECONCILE_LIMIT = 100_000


def _epoch(value: datetime | None) -> float:
    """A UTC wall time (naive, as the records hold it) as epoch seconds."""
    if value is None:
        return time.time()
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


@dataclass(slots=True)
class Pending:
    """A series whose JSON does not cover its newest known state."""

    tenant_id: str
    study_uid: str
    series_uid: str
    version: int
    updated_time: datetime | None
    #: When the series is due (epoch seconds).
    due: float
    #: When its JSON stopped being current (epoch seconds): the oldest uncovered state.
    stale_since: float
    attempts: int = 0
    #: Times the index was found behind this state.
    behind: int = 0

    @property
    def key(self) -> str:
        return series_key(self.tenant_id, self.study_uid, self.series_uid)


class SeriesJsonStage:
    """The schedule, the gate and the generation; see the module docstring."""

    def __init__(self, app: DicomflowApp, settings: Settings, index: SeriesIndex,
                 facts: FactsBase | None = None) -> None:
        self.app = app
        self.settings = settings
        self.index = index
        #: Where each instance's file is (recorded by the series stage); without it, only the
        #: C-STORE SCP's layout is looked at.
        self.facts = facts
        self.quiet_s = settings.json_quiet_seconds
        self.options = JsonOptions(bulk_threshold=settings.json_bulk_threshold,
                                   bulk_uri_base=settings.json_bulkdata_base)
        self.pending: dict[str, Pending] = {}
        self.guard = GapGuard(app, STATE)
        self.tick_s = max(0.05, min(1.0, self.quiet_s / 4 if self.quiet_s else 0.25))
        self.counters: dict[str, float] = {"scheduled": 0, "generated": 0, "failed": 0, "reported": 0,
                                           "already_covered": 0, "deferred_by_load": 0, "index_behind": 0,
                                           "reconciled": 0, "undecodable": 0, "lag": 0}
        self._seen_actives: frozenset[Any] = frozenset()
        self._lag_checked = 0.0
        self._lag_ok = True
        self._partitioner = DefaultPartitioner()

    # -- scheduling ---------------------------------------------------------------------------

    def schedule(self, state: DicomStateMeta, *, now: float | None = None) -> Pending:
        """A flush of ``state``: the series is due ``quiet`` after it, unless a newer one comes."""
        now = time.time() if now is None else now
        updated = _epoch(state.updated_time)
        key = series_key(state.tenant_id, state.study_uid, state.series_uid)
        old = self.pending.get(key)
        if old is not None and (old.version, _epoch(old.updated_time)) > (state.version, updated):
            return old  # a replayed older flush: the newer one already decides
        due = max(updated, old.due - self.quiet_s if old is not None else updated) + self.quiet_s
        entry = Pending(state.tenant_id, state.study_uid, state.series_uid, state.version, state.updated_time,
                        due=due, stale_since=old.stale_since if old is not None else min(updated, now))
        self.pending[key] = entry
        self.counters["scheduled"] += 1
        return entry

    async def consume(self, stream: StreamT[Any]) -> None:
        """Schedule every flush, then ack it: what is durable is the state in the index."""
        manual = cast(Stream[Any], stream).noack()
        should_stop = stopping(self.app)
        async for event in manual.events():
            m = event.message
            try:
                _, missing = await retry_until_done(partial(self.guard.check, m.partition, m.offset),
                                                    what="series JSON gap check", should_stop=should_stop)
            except RetryAborted:
                self.guard.forget([(STATE, m.partition)])
                release(self.app, [event])
                continue
            for raw in [r.value for r in missing] + [event.value]:
                self._on_state(raw if isinstance(raw, bytes) else bytes(raw or b""))
            await manual.ack(event)

    def _on_state(self, raw: bytes) -> None:
        try:
            state = codec.from_row(DicomStateMeta, orjson.loads(raw))
        except Exception as exc:  # noqa: BLE001 - the PostgreSQL stage dead-letters it; here it is only skipped
            self.counters["undecodable"] += 1
            log.warning("series JSON: undecodable state message skipped: %s", exc)
            return
        self.schedule(state)

    async def reconcile(self, owned: set[int] | None = None) -> None:
        """Schedule the series the index says are stale and this worker owns (start, rebalance);
        ``owned``: the state topic's partitions (default: this worker's active assignment)."""
        if owned is None:
            owned = {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == STATE}
        if not owned:
            return
        rows = await self.index.stale_json(datetime.now(UTC).replace(tzinfo=None), RECONCILE_LIMIT)
        for row in rows:
            if self._partition(row) in owned:
                self.schedule(row)
                self.counters["reconciled"] += 1
        log.info("series JSON: %s stale series in the index, %s on this worker's partitions", len(rows),
                 len(self.pending))

    def _partition(self, row: DicomStateMeta) -> int:
        # The series stage sends states keyed by the series key with the producer's default
        # partitioner (murmur2, as Kafka's): the same function tells which partition holds it.
        key = series_key(row.tenant_id, row.study_uid, row.series_uid).encode()
        parts = list(range(self.settings.partitions))
        return int(self._partitioner(key, parts, parts))

    # -- the gate -----------------------------------------------------------------------------

    async def load_ok(self) -> bool:
        """False while the app's consumer lag is above ``json_max_lag`` (re-measured every 2 s)."""
        now = time.monotonic()
        if now - self._lag_checked < LAG_REFRESH_S:
            return self._lag_ok
        self._lag_checked = now
        try:
            ends = await end_offsets(self.app.bootstrap, list(consumed_topics(self.settings.doris_enabled)))
            committed = await committed_offsets(self.app.bootstrap, self.settings.app_id, list(ends))
        except Exception as exc:  # noqa: BLE001 - unmeasurable: do not block JSON work on monitoring
            log.warning("series JSON: lag not measurable (%s); the gate stays open", exc)
            self._lag_ok = True
            return True
        lag = sum(max(0, end - committed.get(tp, 0)) for tp, end in ends.items())
        self.counters["lag"] = lag
        self._lag_ok = lag <= self.settings.json_max_lag
        return self._lag_ok

    # -- the work -----------------------------------------------------------------------------

    def update_gauges(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        metrics = self.app.metrics
        metrics.json_stale_series.set(len(self.pending))
        oldest = min((p.stale_since for p in self.pending.values()), default=now)
        metrics.json_oldest_stale_seconds.set(max(0.0, now - oldest))

    async def tick(self) -> None:
        """The timer: reconcile after an assignment change, then generate what is due."""
        actives = frozenset(self.app.assignor.assigned_actives())
        if actives != self._seen_actives:
            self._seen_actives = actives
            try:
                await self.reconcile()
            except Exception as exc:  # noqa: BLE001 - the index may be starting: look again next tick
                self._seen_actives = frozenset()
                log.warning("series JSON: reconcile failed, retrying: %s", exc)
        self.update_gauges()
        should_stop = stopping(self.app)
        now = time.time()
        due = sorted((p for p in self.pending.values() if p.due <= now), key=lambda p: p.due)
        for entry in due:
            if should_stop():
                return
            if not await self.load_ok():
                self.counters["deferred_by_load"] += 1
                return
            await self.run_one(entry)
            self.update_gauges()

    def _drop(self, entry: Pending) -> None:
        if self.pending.get(entry.key) is entry:
            del self.pending[entry.key]

    async def run_one(self, entry: Pending) -> None:
        """Generate one due series (or find it covered); never raises."""
        try:
            await self._run_one(entry)
        except Exception as exc:  # noqa: BLE001 - the index unreachable, etc.: try again shortly
            entry.due = time.time() + max(1.0, self.tick_s)
            log.warning("series JSON: %s postponed: %s", entry.key, exc)

    async def _run_one(self, entry: Pending) -> None:
        rows = await self.index.series_of_study(entry.tenant_id, entry.study_uid)
        row = next((r for r in rows if r.series_uid == entry.series_uid), None)
        if row is None or (row.version, _epoch(row.updated_time)) < (entry.version, _epoch(entry.updated_time)):
            # The index has not written this state yet (the PostgreSQL stage reads the same flush).
            self.counters["index_behind"] += 1
            entry.behind += 1
            if entry.behind * INDEX_BEHIND_WAIT_S > INDEX_BEHIND_GIVE_UP_S:
                # The index refused that state (dead-lettered as data): nothing to cover. A later
                # state of the series schedules it again; the start-up reconcile finds what is stale.
                log.warning("series JSON: %s state version=%s never reached the index; dropped", entry.key,
                            entry.version)
                self._drop(entry)
                return
            entry.due = time.time() + INDEX_BEHIND_WAIT_S
            return
        meta = await self.index.json_meta(entry.tenant_id, entry.study_uid, entry.series_uid)
        covered = meta is not None and meta.flag_time == row.updated_time
        if covered and meta is not None and (meta.json_status == STATUS_OK or meta.retry_times > self._max_retries):
            self.counters["already_covered"] += 1
            self._drop(entry)
            return
        failures = meta.retry_times if covered and meta is not None and meta.json_status == STATUS_FAILED else 0
        listed = await self.facts.instances(row.tenant_id, row.study_uid, row.series_uid) if self.facts else []
        started = time.perf_counter()
        try:
            document = await asyncio.to_thread(self._generate, row, listed)
        except Exception as exc:  # noqa: BLE001 - any failure of this series is recorded and retried
            await self._failed(entry, row, failures + 1, exc)
            return
        elapsed = time.perf_counter() - started
        await self.index.save_json_metas([self._meta(row, STATUS_OK, 0)])
        metrics = self.app.metrics
        metrics.json_documents.labels("ok").inc()
        metrics.json_bytes.inc(document.bytes_written)
        metrics.json_generation_seconds.observe(elapsed)
        self.counters["generated"] += 1
        log.info("series JSON written key=%s instances=%s bytes=%s seconds=%.3f skipped=%s path=%s", entry.key,
                 document.instances, document.bytes_written, elapsed, len(document.skipped), document.path)
        for what, why in document.skipped[:5]:
            log.warning("series JSON: %s left out of %s: %s", what, entry.key, why)
        self._drop(entry)

    @property
    def _max_retries(self) -> int:
        return self.settings.json_max_retries

    async def _failed(self, entry: Pending, row: DicomStateMeta, failures: int, exc: Exception) -> None:
        await self.index.save_json_metas([self._meta(row, STATUS_FAILED, failures)])
        self.app.metrics.json_documents.labels("failed").inc()
        self.counters["failed"] += 1
        if failures > self._max_retries:
            self.counters["reported"] += 1
            log.error("series JSON FAILED for good key=%s state=%s after %s attempts: %s (json_status=2; "
                      "retried when the series changes)", entry.key, row.updated_time, failures, exc)
            self._drop(entry)
            return
        backoff = min(MAX_BACKOFF_S, self.settings.json_retry_seconds * 2 ** (failures - 1))
        entry.due = time.time() + backoff
        entry.attempts = failures
        log.warning("series JSON failed key=%s attempt=%s retry_in=%.1fs: %s", entry.key, failures, backoff, exc)

    def _meta(self, row: DicomStateMeta, status: int, retries: int) -> DicomJsonMeta:
        assert row.updated_time is not None  # NOT NULL in the index
        return DicomJsonMeta(tenant_id=row.tenant_id, study_uid=row.study_uid, series_uid=row.series_uid,
                             study_uid_hash=row.study_uid_hash, series_uid_hash=row.series_uid_hash,
                             study_date_origin=row.study_date_origin, flag_time=row.updated_time,
                             created_time=datetime.now(UTC).replace(tzinfo=None), json_status=status,
                             retry_times=retries)

    def _files(self, row: DicomStateMeta, listed: list[InstanceFile]) -> list[Path]:
        """The series' instance files: the paths the index records (any layout a backfill read),
        plus the SCP's series directory only for instances recorded without a path (or none)."""
        root = Path(self.settings.storage_root)
        files: dict[Path, None] = {}
        for instance in listed:
            if instance.path is None:
                continue
            try:  # the same rule the ingest applied: inside the root, no '..', no dot-files
                files[root.joinpath(*path_components(root, instance.path))] = None
            except FileAccessError as exc:
                log.warning("series JSON: indexed path of %s refused: %s", instance.sop_uid, exc)
        if not listed or any(i.path is None for i in listed):
            directory = series_directory(root, row.tenant_id, row.study_date_origin, row.study_uid, row.series_uid)
            files.update(dict.fromkeys(instance_files(directory)))
        return list(files)

    def _generate(self, row: DicomStateMeta, listed: list[InstanceFile]) -> SeriesDocument:
        """Runs in a thread: list the series' files, write the document."""
        s = self.settings
        files = self._files(row, listed)
        directory = series_directory(s.storage_root, row.tenant_id, row.study_date_origin, row.study_uid,
                                     row.series_uid)
        if not files:
            raise FileNotFoundError(f"no instance files: {len(listed)} instances indexed, none with a usable "
                                    f"path, none in {directory}")
        target = document_path(s.json_documents_root, row.tenant_id, row.study_date_origin, row.study_uid,
                               row.series_uid, compressed=s.json_gzip)
        options = dataclasses.replace(self.options, tenant=row.tenant_id)
        document = write_series_document(files, target, options, series_uid=row.series_uid,
                                         compress=s.json_gzip)
        if document.instances == 0:
            raise ValueError(f"none of the {len(files)} files of the series (indexed paths, {directory}) is a "
                             f"readable instance of it")
        # The other form (gzip switched on or off) would be served first otherwise: remove it.
        other = document_path(s.json_documents_root, row.tenant_id, row.study_date_origin, row.study_uid,
                              row.series_uid, compressed=not s.json_gzip)
        with contextlib.suppress(FileNotFoundError):
            other.unlink()
        return document


def register(app: DicomflowApp, settings: Settings) -> None:
    """The ``series_json`` agent on the state topic and its timer, with the web views, if an index is set."""
    if not settings.json_enabled:
        log.info("DICOMFLOW_JSON=0: series JSON generation is off")
        return
    from sinks.index import open_index

    index = open_index(settings, max_size=2)  # its own small pool: reads, and one upsert per series
    if index is None:
        log.warning("no series index configured: series JSON generation is off")
        return
    from sinks.series_facts import open_facts

    # Its own small connection, as the index's: reads where each instance's file is.
    facts = open_facts(settings.index_dsn) if settings.index_dsn is not None else None
    stage = SeriesJsonStage(app, settings, index, facts)

    async def start() -> None:
        await start_or_defer(index)  # the index may still be starting: its first call starts it

    app.start_with(start)
    app.close_on_shutdown(index.stop)
    if facts is not None:
        app.close_on_shutdown(facts.stop)
    stage.guard.watch_revocations(app)
    app.metrics.register_counters("series_json", stage.counters)
    app.metrics.register_counters("series_json_gaps", stage.guard.stats)
    app.agent(app.queues.state, name="series_json")(stage.consume)
    app.timer(stage.tick_s, name="series_json_tick")(stage.tick)
    register_web(app, settings, index, facts)

