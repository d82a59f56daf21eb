"""The series index: one provider interface with the seeds' six operations, on PostgreSQL or MySQL.

The seeds' ``DbProvider`` trait (PostgreSQL and MySQL implementations) maps to
:class:`SeriesIndex` like this:

==========================================  ==========================================
seeds (``DbProvider``)                      dicomflow (:class:`SeriesIndex`)
==========================================  ==========================================
``save_state_info(state)``                  ``save_state(row)``
``save_state_list(states)``                 ``save_states(rows)``
``save_json_list(json_metas)``              ``save_json_metas(rows)``
``get_state_metaes(tenant, study)``         ``series_of_study(tenant_id, study_uid)``
``get_json_metaes(end_time)``               ``stale_json(end_time, limit=100)``
``get_json_meta(tenant, study, series)``    ``json_meta(tenant_id, study_uid, series_uid)``
==========================================  ==========================================

Where dicomflow departs from the seeds, on both providers alike:

* Writes of states are upserts where the newest state wins by ``(version, updated_time)``
  (a replayed or reordered older state never overwrites a newer one) and ``created_time``
  keeps the first insert's value. The seeds overwrote unconditionally.
* ``save_states`` writes a list in a fixed handful of statements, and a row the server
  refuses as data is returned (naming the column) while the others land; the seeds
  rolled the whole list back. ``save_state`` raises :class:`~core.errors.SinkDataError`
  for a refused row. Transient failures raise :class:`~core.errors.SinkRetryableError`.
* ``save_json_metas`` upserts by (tenant, study, series); a row never replaces one with a
  newer ``flag_time`` (a late writer cannot mark a series done for an older state), and
  ``created_time`` keeps the first value. ``json_status`` and ``retry_times`` are stored as
  the caller gives them (the generator owns their meaning).
* ``json_meta`` returns None for an unknown series (the seeds returned an error).
* ``stale_json`` takes a ``limit`` (the seeds hard-coded 10) and is one LEFT JOIN.

Each implementation is also the worker's batching sink of the state topic
(:class:`sinks.base.BatchingSink`): the state stage, ``save_states`` and ``save_state`` go
through the same ``write``. :func:`open_index` picks the provider from the settings
(``DICOMFLOW_INDEX_DSN``, else ``DICOMFLOW_POSTGRES_DSN``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from core.errors import ConfigError, SinkDataError
from core.settings import Secret, index_kind, mask_dsn
from schemas.records import DicomJsonMeta, DicomStateMeta
from sinks.base import Rejected, SinkBatch, SinkItem

if TYPE_CHECKING:
    from core.settings import Settings
    from sinks.mysql import MySQLIndex
    from sinks.postgres import PostgresSink

__all__ = ["SeriesIndex", "open_index", "index_for_dsn", "JSON_COLUMNS", "direct_batch", "save_one", "json_values",
           "json_row", "newest_json"]


@runtime_checkable
class SeriesIndex(Protocol):
    """The seeds' database provider: series state and JSON bookkeeping, written and read."""

    #: ``postgres`` or ``mysql``.
    name: str

    async def start(self) -> None:
        """Connect and apply the schema (idempotent)."""

    async def stop(self) -> None:
        """Close connections."""

    async def save_state(self, row: DicomStateMeta) -> None:
        """Upsert one series state (seeds: ``save_state_info``); SinkDataError if refused."""

    async def save_states(self, rows: Sequence[DicomStateMeta]) -> Sequence[Rejected[DicomStateMeta]]:
        """Upsert series states (seeds: ``save_state_list``); returns the refused ones.

        A refused row's ``item.offset`` is its position in ``rows``.
        """
        ...

    async def save_json_metas(self, rows: Sequence[DicomJsonMeta]) -> None:
        """Upsert JSON bookkeeping rows by series key (seeds: ``save_json_list``)."""

    async def series_of_study(self, tenant_id: str, study_uid: str) -> list[DicomStateMeta]:
        """Every series state of a study, by series number then UID (seeds: ``get_state_metaes``)."""
        ...

    async def stale_json(self, end_time: datetime, limit: int = 100) -> list[DicomStateMeta]:
        """Series whose JSON is missing or older than their state, updated before ``end_time``,
        oldest first (seeds: ``get_json_metaes``)."""
        ...

    async def json_meta(self, tenant_id: str, study_uid: str, series_uid: str) -> DicomJsonMeta | None:
        """The JSON bookkeeping row of one series, or None (seeds: ``get_json_meta``)."""
        ...


def index_for_dsn(dsn: str | Secret, **options: Any) -> PostgresSink | MySQLIndex:
    """The index implementation for a DSN (``postgresql://`` / ``postgres://`` or ``mysql://`` / ``mariadb://``)."""
    secret = dsn if isinstance(dsn, Secret) else Secret(dsn)
    kind = index_kind(secret.get())
    if kind == "mysql":
        from sinks.mysql import MySQLIndex

        return MySQLIndex(secret, **options)
    if kind == "postgres":
        from sinks.postgres import PostgresSink

        return PostgresSink(secret, **options)
    raise ConfigError(f"unsupported series index DSN {mask_dsn(secret.get())!r}: use postgresql:// or mysql://",
                      field="DICOMFLOW_INDEX_DSN")


def open_index(settings: Settings, **options: Any) -> PostgresSink | MySQLIndex | None:
    """The configured series index (not started), or None when no index is configured."""
    if settings.index_dsn is None:
        return None
    if index_kind(settings.index_dsn.get()) == "mysql":
        options.setdefault("variable", settings.index_dsn_variable)
    return index_for_dsn(settings.index_dsn, **options)


# -- shared by both providers: the direct-call write path and the JSON bookkeeping columns --

#: The pseudo-topic of rows written by a direct call (``save_states``), shown in logs.
DIRECT_TOPIC = "direct"
JSON_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DicomJsonMeta))
JSON_KEY = ("tenant_id", "study_uid", "series_uid")


def direct_batch(rows: Sequence[DicomStateMeta]) -> SinkBatch[DicomStateMeta]:
    """``rows`` as one sink batch; each item's offset is its position in ``rows``."""
    items = [SinkItem(value=row, key=row.key, topic=DIRECT_TOPIC, partition=0, offset=i)
             for i, row in enumerate(rows)]
    return SinkBatch(DIRECT_TOPIC, 0, items)


async def save_one(save_states: Callable[[Sequence[DicomStateMeta]], Awaitable[Sequence[Rejected[DicomStateMeta]]]],
                   row: DicomStateMeta) -> None:
    """``save_state``: ``save_states`` of one row, raising the refusal."""
    rejected = await save_states([row])
    if rejected:
        error = rejected[0].error
        raise error if isinstance(error, SinkDataError) else SinkDataError(error.message, field=error.field)


def json_values(row: DicomJsonMeta, now: datetime) -> tuple[object, ...]:
    """The row's column values; a missing created_time is stamped ``now`` (the DDL's NOT NULL)."""
    return tuple((row.created_time or now) if c == "created_time" else getattr(row, c) for c in JSON_COLUMNS)


def json_row(values: Sequence[object]) -> DicomJsonMeta:
    return DicomJsonMeta(**dict(zip(JSON_COLUMNS, values, strict=True)))  # type: ignore[arg-type]


def newest_json(rows: Sequence[DicomJsonMeta]) -> list[DicomJsonMeta]:
    """One row per series key (an upsert statement cannot touch a row twice): the newest flag_time,
    the later one in the list on a tie."""
    by_key: dict[tuple[str, str, str], DicomJsonMeta] = {}
    for row in rows:
        key = (row.tenant_id, row.study_uid, row.series_uid)
        kept = by_key.get(key)
        if kept is None or row.flag_time >= kept.flag_time:
            by_key[key] = row
    return list(by_key.values())
