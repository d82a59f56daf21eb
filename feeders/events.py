"""The storage event every feeder publishes: one builder, one validator.

The SCP and backfill both describe a stored file with :func:`build_event` from the
header read by :func:`dicom.reader.read_instance_header`, and both publish only what
:func:`validated` passed (contract: ``schemas/storage_event.v1.schema.json``).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from typing import Any

from core.errors import ContractError
from dicom.reader import InstanceHeader
from dicom.values import accession_number, parse_da, uid_hash
from schemas.codec import format_datetime
from schemas.contract import validate_event
from schemas.records import DicomObjectMeta, bounds, series_key

__all__ = ["REQUIRED_FIELDS", "build_event", "validated", "event_key"]

log = logging.getLogger(__name__)

#: The contract's required fields: an event whose value breaks one is not published.
REQUIRED_FIELDS = frozenset({"tenant_id", "file_path", "trace_id"})
_UID_MAX = bounds(DicomObjectMeta)["study_uid"]


def _uid(value: str | None) -> str | None:
    # An over-long UID is left out with its hash, not sent for the contract to drop.
    return value if value and len(value.encode("utf-8")) <= _UID_MAX else None


def build_event(*, tenant: str, header: InstanceHeader | None, file_path: str, file_size: int, trace_id: str,
                worker_node_id: str, now: datetime, source_ae: str | None = None, source_ip: str | None = None,
                transfer_syntax_uid: str | None = None) -> dict[str, Any]:
    """The storage event for one stored file (not yet validated: see :func:`validated`).

    ``header`` is None when the file's header could not be read (backfill publishes
    such files anyway, for ingest to dead-letter with the reason). ``transfer_syntax_uid``
    overrides the file meta's (the SCP knows the negotiated one).
    """
    h = header or InstanceHeader(None, None, None, None, None, None, None, None)
    study_date: str | None = None
    if h.study_date:
        with contextlib.suppress(ValueError):
            study_date = parse_da(h.study_date).isoformat()
    study_uid, series_uid = _uid(h.study_uid), _uid(h.series_uid)
    return {
        "tenant_id": tenant,
        "file_path": file_path,
        "trace_id": trace_id,
        "worker_node_id": worker_node_id or None,
        "patient_id": h.patient_id,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "sop_uid": _uid(h.sop_uid),
        "file_size": file_size,
        "transfer_syntax_uid": transfer_syntax_uid or h.transfer_syntax_uid,
        "number_of_frames": h.number_of_frames,
        "created_time": format_datetime(now),
        "series_uid_hash": uid_hash(series_uid) if series_uid else None,
        "study_uid_hash": uid_hash(study_uid) if study_uid else None,
        # The rule of dicom.extract, so the event and the extracted rows agree.
        "accession_number": accession_number(h.accession_number, tenant, study_uid) if study_uid else None,
        "target_ts": None,
        "study_date": study_date,
        "source_ip": source_ip or None,
        "source_ae": source_ae or None,
    }


def validated(event: dict[str, Any], trace_id: str) -> dict[str, Any]:
    """Validate against the contract; an optional field that breaks it is dropped, not fatal.

    Raises :class:`ContractError` (with the field and the reason) when a required field
    breaks it. The file is stored either way; ingest re-reads the header and
    dead-letters the instance with the precise extraction error if it must.
    """
    for _ in range(len(event)):
        try:
            validate_event(event)
            return event
        except ContractError as exc:
            if exc.field is None or exc.field in REQUIRED_FIELDS or event.get(exc.field) is None:
                raise
            log.warning("event field dropped trace_id=%s field=%s reason=%s", trace_id, exc.field,
                        exc.message)
            event[exc.field] = None
    validate_event(event)
    return event


def event_key(event: dict[str, Any]) -> str | None:
    """The message key that keeps a series in one partition; None until both UIDs are known."""
    study, series = event.get("study_uid"), event.get("series_uid")
    return series_key(event["tenant_id"], study, series) if study and series else None
