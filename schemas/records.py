"""Typed records: the seeds' DicomStateMeta, DicomImageMeta, DicomObjectMeta, and the storage event.

Field names and length bounds follow the seeds' tables exactly (schemas/sql/). A
record serialised by :mod:`schemas.codec` is a row of the Doris table of the same
name, so the seeds' Routine Load column lists accept the topic messages unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, ClassVar

__all__ = [
    "DicomStateMeta",
    "DicomImageMeta",
    "DicomObjectMeta",
    "DicomJsonMeta",
    "StorageEvent",
    "OUTPUT_RECORDS",
    "Route",
    "bounds",
    "series_key",
]


def _len(n: int) -> dict[str, int]:
    """Field metadata: a string bounded to ``n`` bytes (the seeds' BoundedString<N>)."""
    return {"max_len": n}


def bounds(cls: type) -> dict[str, int]:
    """Length bound of every bounded string field of a record class."""
    return {f.name: f.metadata["max_len"] for f in dataclasses.fields(cls) if "max_len" in f.metadata}


def series_key(tenant_id: str, study_uid: str, series_uid: str) -> str:
    """The message key that keeps one series in one partition."""
    return f"{tenant_id}/{study_uid}/{series_uid}"


@dataclass(frozen=True, slots=True)
class Route:
    """Where an output record goes: its topic and the Doris table kind (``dicom_{kind}_meta``)."""

    topic: str
    doris_kind: str | None = None
    #: Debounced per series (by the series window) before it reaches its topic.
    per_series: bool = False
    #: Loaded into a DUPLICATE KEY table: de-duplicated by (trace id, status).
    dedup_trace: bool = False


@dataclass(slots=True)
class _SeriesRow:
    """The leading columns of every row that belongs to a known series (series and instance tables)."""

    tenant_id: str = field(metadata=_len(64))
    patient_id: str = field(metadata=_len(64))
    study_uid: str = field(metadata=_len(64))
    series_uid: str = field(metadata=_len(64))

    @property
    def key(self) -> str:
        return series_key(self.tenant_id, self.study_uid, self.series_uid)


class _MaybeSeriesKey:
    """``key`` of a record whose study and series may be unknown (events, failed transfers)."""

    __slots__ = ()
    tenant_id: str
    study_uid: str | None
    series_uid: str | None

    @property
    def key(self) -> str | None:
        if self.study_uid and self.series_uid:
            return series_key(self.tenant_id, self.study_uid, self.series_uid)
        return None


@dataclass(slots=True)
class DicomStateMeta(_SeriesRow):
    """Series-level state (PostgreSQL and Doris ``dicom_state_meta``)."""

    #: Debounced per series by the series window before it reaches its topic.
    ROUTE: ClassVar[Route] = Route("dicom_state_queue", "state", per_series=True)

    study_uid_hash: str = field(metadata=_len(20))
    series_uid_hash: str = field(metadata=_len(20))
    study_date_origin: str = field(metadata=_len(8))
    study_date: date
    accession_number: str = field(metadata=_len(16))
    patient_name: str | None = field(default=None, metadata=_len(64))
    patient_sex: str | None = field(default=None, metadata=_len(1))
    patient_birth_date: date | None = None
    patient_birth_time: time | None = None
    patient_age: str | None = field(default=None, metadata=_len(16))
    patient_size: float | None = None
    patient_weight: float | None = None
    pregnancy_status: int | None = None
    study_time: time | None = None
    study_id: str | None = field(default=None, metadata=_len(16))
    study_description: str | None = field(default=None, metadata=_len(64))
    modality: str | None = field(default=None, metadata=_len(16))
    series_number: int | None = None
    series_date: date | None = None
    series_time: time | None = None
    series_description: str | None = field(default=None, metadata=_len(256))
    body_part_examined: str | None = field(default=None, metadata=_len(64))
    protocol_name: str | None = field(default=None, metadata=_len(64))
    series_related_instances: int | None = None
    created_time: datetime | None = None
    #: When the series stage flushed this state, in UTC (informational; see ``version``).
    updated_time: datetime | None = None
    #: Per-series version, one more at every flush, kept with the instance facts in
    #: PostgreSQL: what orders states (newest wins), never a wall clock. 0 without PostgreSQL.
    version: int = 0


@dataclass(slots=True)
class DicomImageMeta(_SeriesRow):
    """Instance-level image metadata (Doris ``dicom_image_meta``)."""

    ROUTE: ClassVar[Route] = Route("dicom_image_queue", "image")

    sop_uid: str = field(metadata=_len(64))
    study_uid_hash: str = field(metadata=_len(20))
    series_uid_hash: str = field(metadata=_len(20))
    study_date_origin: str = field(metadata=_len(8))
    transfer_syntax_uid: str = field(metadata=_len(64))
    sop_class_uid: str = field(metadata=_len(64))
    content_date: date | None = None
    content_time: time | None = None
    instance_number: int | None = None
    image_type: str | None = field(default=None, metadata=_len(128))
    image_orientation_patient: str | None = field(default=None, metadata=_len(128))
    image_position_patient: str | None = field(default=None, metadata=_len(64))
    slice_thickness: float | None = None
    spacing_between_slices: float | None = None
    slice_location: float | None = None
    samples_per_pixel: int | None = None
    photometric_interpretation: str | None = field(default=None, metadata=_len(32))
    width: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    high_bit: int | None = None
    pixel_representation: int | None = None
    rescale_intercept: float | None = None
    rescale_slope: float | None = None
    rescale_type: str | None = field(default=None, metadata=_len(64))
    window_center: str | None = field(default=None, metadata=_len(64))
    window_width: str | None = field(default=None, metadata=_len(64))
    pixel_data_location: str | None = field(default=None, metadata=_len(512))
    thumbnail_location: str | None = field(default=None, metadata=_len(512))
    image_status: str | None = field(default=None, metadata=_len(32))
    space_size: int | None = None
    created_time: datetime | None = None
    updated_time: datetime | None = None


@dataclass(slots=True)
class DicomObjectMeta(_MaybeSeriesKey):
    """One row of the per-file transfer log (Doris ``dicom_object_meta``).

    Written for every storage event, successful or not: ``transfer_status`` is
    ``SUCCESS`` or the error code that dead-lettered the event.
    """

    #: A DUPLICATE KEY table: a row replayed after a crash would be a second row, so the
    #: sink de-duplicates by (trace id, transfer status).
    ROUTE: ClassVar[Route] = Route("log_queue", "object", dedup_trace=True)

    trace_id: str = field(metadata=_len(36))
    worker_node_id: str = field(metadata=_len(64))
    tenant_id: str = field(metadata=_len(64))
    patient_id: str = field(metadata=_len(64))
    study_uid: str | None = field(default=None, metadata=_len(64))
    series_uid: str | None = field(default=None, metadata=_len(64))
    sop_uid: str | None = field(default=None, metadata=_len(64))
    file_size: int | None = None
    file_path: str | None = field(default=None, metadata=_len(512))
    transfer_syntax_uid: str | None = field(default=None, metadata=_len(64))
    number_of_frames: int | None = None
    created_time: datetime | None = None
    series_uid_hash: str | None = field(default=None, metadata=_len(20))
    study_uid_hash: str | None = field(default=None, metadata=_len(20))
    accession_number: str | None = field(default=None, metadata=_len(64))
    target_ts: str | None = field(default=None, metadata=_len(64))
    study_date: date | None = None
    transfer_status: str | None = field(default=None, metadata=_len(64))
    source_ip: str | None = field(default=None, metadata=_len(64))
    source_ae: str | None = field(default=None, metadata=_len(64))


@dataclass(slots=True)
class DicomJsonMeta:
    """Bookkeeping of a series' generated JSON (``dicom_json_meta``, the seeds' DicomJsonMeta).

    The JSON generator writes one per series with the series' ``updated_time`` as
    ``flag_time``; a series whose state moved on (another ``updated_time``) is due again
    (``sinks.index.SeriesIndex.stale_json``). Not a topic record: only the series index holds it.
    """

    tenant_id: str = field(metadata=_len(64))
    study_uid: str = field(metadata=_len(64))
    series_uid: str = field(metadata=_len(64))
    study_uid_hash: str = field(metadata=_len(20))
    series_uid_hash: str = field(metadata=_len(20))
    study_date_origin: str = field(metadata=_len(8))
    #: The ``updated_time`` of the series state the JSON was generated from.
    flag_time: datetime
    #: When the row was first written; None: the index stamps it (and keeps the first one).
    created_time: datetime | None = None
    json_status: int = 0
    retry_times: int = 0

    @property
    def key(self) -> str:
        return series_key(self.tenant_id, self.study_uid, self.series_uid)


@dataclass(slots=True)
class StorageEvent(_MaybeSeriesKey):
    """What a feeder publishes to ``storage_queue`` (contract: storage_event.v1.schema.json).

    ``tenant_id``, ``file_path`` and ``trace_id`` are required; every other field is an
    optional ``dicom_object_meta`` column known at receive time.
    """

    tenant_id: str
    file_path: str
    trace_id: str
    worker_node_id: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    file_size: int | None = None
    transfer_syntax_uid: str | None = None
    number_of_frames: int | None = None
    created_time: str | None = None
    series_uid_hash: str | None = None
    study_uid_hash: str | None = None
    accession_number: str | None = None
    target_ts: str | None = None
    study_date: str | None = None
    transfer_status: str | None = None
    source_ip: str | None = None
    source_ae: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StorageEvent:
        """Build from an already-validated event dict (see :mod:`schemas.contract`)."""
        return cls(**data)


#: The records one stored instance becomes, in the order their outputs are produced. A new
#: output is a record class here (with its ROUTE) built by dicom/extract.py.
OUTPUT_RECORDS: tuple[type[Any], ...] = (DicomStateMeta, DicomImageMeta, DicomObjectMeta)
