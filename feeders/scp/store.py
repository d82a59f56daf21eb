"""The C-STORE handler: store as received, publish, and answer truthfully.

For every C-STORE request it

1. reads the header of the data set as it arrived (never the pixel data),
2. resolves the tenant (:mod:`feeders.tenancy`),
3. places the encoded bytes, untouched, under the storage root (:mod:`feeders.storage`),
4. publishes a storage event (:mod:`feeders.events`) keyed by ``tenant/study_uid/series_uid``
   and waits for the broker's acknowledgement,
5. answers ``0x0000`` only after that acknowledgement.

When the broker does not acknowledge, the stored file is revoked and the status is
``0xA700`` (out of resources), so the modality retries and no file claims to be
stored that no event announces. A data set that cannot be decoded gets ``0xC210``;
one without Study/Series Instance UID ``0xA900``; a failed write ``0xA700``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

from core.errors import BrokerError, ContractError, ExtractionError, FileAccessError
from dicom.reader import read_instance_header
from feeders.events import build_event, event_key, validated
from feeders.scp.association import peer
from feeders.scp.bridge import LoopBridge, Publisher
from feeders.storage import InstanceStore, Placement
from feeders.tenancy import AssociationTenant, TenantResolver
from schemas.records import DicomObjectMeta, bounds

if TYPE_CHECKING:
    from pynetdicom.events import Event

__all__ = ["SUCCESS", "OUT_OF_RESOURCES", "DATASET_MISMATCH", "CANNOT_UNDERSTAND", "NOT_AUTHORISED", "StoreDeps",
           "StoreRequest", "handle_store", "store_instance"]

log = logging.getLogger(__name__)

# DIMSE statuses (PS3.4 Annex B.2.3 / PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
NOT_AUTHORISED = 0x0124

# A UID names the stored file's folders and the event: it must fit the records' columns.
_UID_MAX = bounds(DicomObjectMeta)["sop_uid"]


@dataclass(frozen=True)
class StoreDeps:
    """The C-STORE handler's dependencies, bound via ``evt_handlers`` arguments."""

    store: InstanceStore
    tenancy: TenantResolver
    publisher: Publisher
    bridge: LoopBridge
    worker_node_id: str


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One C-STORE as either acceptor received it: who sent it, and the Part 10 bytes (in a
    spool file under the storage root, or in memory)."""

    calling_ae: str
    called_ae: str
    source_ip: str
    transfer_syntax: str
    #: The command's Affected SOP Instance UID (used when the data set has none).
    affected_sop_uid: str | None
    spool: Path | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.spool is None) == (self.data is None):
            raise ValueError("a StoreRequest carries its data set either spooled or in memory")


def _valid_uid(value: str | None) -> bool:
    return value is not None and 0 < len(value) <= _UID_MAX


def _spool_path(event: Event) -> Path | None:
    try:
        return Path(event.dataset_path)
    except (AttributeError, TypeError):
        return None


def _revoke(placement: Placement, trace_id: str) -> None:
    try:
        placement.rollback()
    except OSError as exc:
        log.error("revoke failed trace_id=%s path=%s error=%s", trace_id, placement.relpath, exc)


def handle_store(event: Event, deps: StoreDeps) -> int:
    """EVT_C_STORE (pynetdicom): store as received, publish, and answer truthfully."""
    calling, called, ip = peer(event.assoc)
    spool = _spool_path(event)
    return store_instance(StoreRequest(
        calling, called, ip, str(event.context.transfer_syntax),
        str(getattr(event.request, "AffectedSOPInstanceUID", "") or "") or None,
        spool=spool, data=event.encoded_dataset() if spool is None else None), deps)


def store_instance(req: StoreRequest, deps: StoreDeps) -> int:
    """Store as received, publish, and answer truthfully: the DIMSE status to send."""
    started = time.monotonic()
    trace_id = str(uuid.uuid4())
    calling, called, ip = req.calling_ae, req.called_ae, req.source_ip
    assoc_tenant: AssociationTenant | None = deps.tenancy.for_association(calling, called)
    if assoc_tenant is None:  # only if the association's own check was not bound
        log.warning("store refused trace_id=%s reason=no_tenant calling_ae=%s", trace_id, calling)
        return NOT_AUTHORISED
    transfer_syntax = req.transfer_syntax
    spool, data = req.spool, req.data
    try:
        header = read_instance_header(spool if spool is not None else cast(bytes, data))
    except (ExtractionError, FileAccessError) as exc:
        log.warning("store refused trace_id=%s reason=undecodable calling_ae=%s source_ip=%s error=%s",
                    trace_id, calling, ip, exc.message)
        return CANNOT_UNDERSTAND
    study_uid, series_uid = header.study_uid, header.series_uid
    sop_uid = header.sop_uid or req.affected_sop_uid or None
    if not (_valid_uid(study_uid) and _valid_uid(series_uid) and _valid_uid(sop_uid)):
        log.warning("store refused trace_id=%s reason=missing_uid calling_ae=%s study_uid=%r "
                    "series_uid=%r sop_uid=%r", trace_id, calling, study_uid, series_uid, sop_uid)
        return DATASET_MISMATCH
    study_uid, series_uid, sop_uid = cast(str, study_uid), cast(str, series_uid), cast(str, sop_uid)
    tenant = deps.tenancy.for_instance(assoc_tenant, header.private_tenant)
    relpath = deps.store.relpath(tenant, header.study_date, study_uid, series_uid, sop_uid)
    try:
        if spool is None:
            placement = deps.store.write_bytes(relpath, cast(bytes, data))
        else:
            placement = deps.store.adopt_file(relpath, spool)
    except OSError as exc:
        log.error("store failed trace_id=%s reason=write path=%s error=%s", trace_id, relpath, exc)
        return OUT_OF_RESOURCES
    try:
        record = validated(build_event(
            tenant=tenant, header=replace(header, sop_uid=sop_uid), file_path=placement.relpath.as_posix(),
            file_size=placement.size, trace_id=trace_id, worker_node_id=deps.worker_node_id, now=datetime.now(),
            source_ae=calling, source_ip=ip, transfer_syntax_uid=transfer_syntax,
        ), trace_id)
        # The directory fsync that makes the new name durable overlaps the broker round trip.
        deps.bridge.publish(deps.publisher, record, event_key(record), meanwhile=placement.sync)
    except BrokerError as exc:
        _revoke(placement, trace_id)
        log.error("store failed trace_id=%s reason=broker path=%s elapsed_ms=%.1f error=%s", trace_id,
                  relpath, (time.monotonic() - started) * 1000, exc.message)
        return OUT_OF_RESOURCES
    except ContractError as exc:
        _revoke(placement, trace_id)
        log.warning("store refused trace_id=%s reason=contract field=%s error=%s", trace_id, exc.field,
                    exc.message)
        return CANNOT_UNDERSTAND
    except OSError as exc:  # the directory sync failed: the name may not survive a crash
        _revoke(placement, trace_id)
        log.error("store failed trace_id=%s reason=sync path=%s error=%s", trace_id, relpath, exc)
        return OUT_OF_RESOURCES
    except BaseException:
        _revoke(placement, trace_id)
        raise
    placement.commit()
    log.info("stored trace_id=%s tenant=%s calling_ae=%s source_ip=%s sop_uid=%s path=%s bytes=%d "
             "transfer_syntax=%s elapsed_ms=%.1f", trace_id, tenant, calling, ip, sop_uid, relpath,
             placement.size, transfer_syntax, (time.monotonic() - started) * 1000)
    return SUCCESS
