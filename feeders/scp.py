"""The C-STORE SCP feeder: receive DICOM instances, store them as received, publish events.

For every C-STORE request the handler

1. reads the header of the data set as it arrived (never the pixel data),
2. resolves the tenant (:mod:`feeders.tenancy`),
3. places the encoded bytes, untouched, under the storage root (:mod:`feeders.storage`),
4. publishes a storage event (contract: ``schemas/storage_event.v1.schema.json``) keyed
   by ``tenant/study_uid/series_uid`` and waits for the broker's acknowledgement,
5. answers ``0x0000`` only after that acknowledgement.

When the broker does not acknowledge, the stored file is revoked and the status is
``0xA700`` (out of resources), so the modality retries and no file claims to be
stored that no event announces. A data set that cannot be decoded gets ``0xC210``;
one without Study/Series Instance UID ``0xA900``; a failed write ``0xA700``.

pynetdicom runs handlers on its own threads, while the publisher lives on an asyncio
loop. :class:`StorageSCP` is therefore started *from* a loop (``start()`` and
``stop()`` do not block it) and bridges each publish with
``asyncio.run_coroutine_threadsafe(...).result(timeout)``. :func:`serve` is the
standalone form (``dicomflow scp``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import signal
import ssl
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.errors import BrokerError, Code, ConfigError, ContractError, ExtractionError
from core.net import no_delay
from dicom.extract import TENANT_PRIVATE_TAG
from dicom.headerscan import ScannedHeader, scan_bytes, scan_file
from dicom.values import accession_fallback, parse_da, uid_hash
from feeders.storage import InstanceStore, Placement
from feeders.tenancy import AssociationTenant, TenantResolver
from schemas.codec import format_datetime
from schemas.contract import validate_event
from schemas.records import series_key

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

    from core.settings import BrokerProfile, Settings

__all__ = [
    "STORAGE_TRANSFER_SYNTAXES",
    "SUCCESS",
    "OUT_OF_RESOURCES",
    "DATASET_MISMATCH",
    "CANNOT_UNDERSTAND",
    "Publisher",
    "InstanceHeader",
    "read_instance_header",
    "ScpConfig",
    "StoreDeps",
    "LoopBridge",
    "build_ae",
    "server_ssl_context",
    "handle_association_request",
    "handle_store",
    "StorageSCP",
    "serve",
]

log = logging.getLogger(__name__)

#: Accepted for every storage SOP class. The data set is stored in whichever of
#: these the sender chose; nothing is transcoded, so any syntax is as cheap as another.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

#: pynetdicom's spool files, inside the storage root so that placing one is a link.
SPOOL_DIR = ".spool"

# DIMSE statuses (PS3.4 Annex B.2.3 / PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
NOT_AUTHORISED = 0x0124

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE not recognised.
_RJ_PERMANENT, _RJ_SERVICE_USER, _RJ_CALLING_AE = 0x01, 0x01, 0x03

_PATIENT_ID, _STUDY_DATE, _ACCESSION = 0x00100020, 0x00080020, 0x00080050
_STUDY_UID, _SERIES_UID, _SOP_UID, _FRAMES = 0x0020000D, 0x0020000E, 0x00080018, 0x00280008
_HEADER_TAGS: frozenset[int] = frozenset((0x00080005, _PATIENT_ID, _STUDY_UID, _SERIES_UID, _SOP_UID, _STUDY_DATE,
                                 _ACCESSION, _FRAMES, TENANT_PRIVATE_TAG))
_REQUIRED_EVENT_FIELDS = frozenset({"tenant_id", "file_path", "trace_id"})


class Publisher(Protocol):
    """What the SCP needs from :class:`feeders.publisher.EventPublisher`."""

    async def publish(self, event: dict[str, Any], key: str | None) -> None: ...


# ----------------------------------------------------------------------------- header


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few header values the SCP needs at receive time."""

    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    study_date: str | None
    accession_number: str | None
    number_of_frames: int | None
    private_tenant: str | None


def _value_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        # Private tags read with implicit VR come back undecoded (VR UN).
        text = value.decode("utf-8", "replace")
    elif isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip(" \x00")
    return text or None


def _text(ds: Dataset | ScannedHeader, tag: int, *, required: bool = False) -> str | None:
    try:
        if isinstance(ds, ScannedHeader):
            return _value_text(ds.value(tag))
        elem = ds.get(tag)
        return None if elem is None else _value_text(ds[tag].value)
    except Exception:
        # pydicom decodes lazily: a malformed element fails here, not at read time.
        if required:
            raise
        return None


def _read(source: Path | bytes) -> Dataset | ScannedHeader:
    scanned = scan_bytes(source, _HEADER_TAGS) if isinstance(source, bytes) else scan_file(source, _HEADER_TAGS)
    if scanned is not None:
        return scanned
    fp: Any = BytesIO(source) if isinstance(source, bytes) else source
    return pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=[Tag(t) for t in _HEADER_TAGS])


def read_instance_header(source: Path | bytes) -> InstanceHeader:
    """Read the header of a received data set (a Part 10 file or its bytes).

    The fast scan (:mod:`dicom.headerscan`) reads it when it can, pydicom otherwise.
    Raises :class:`ExtractionError` (NOT_DICOM) when the data set cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _read(source)
            header = InstanceHeader(
                patient_id=_text(ds, _PATIENT_ID),
                study_uid=_text(ds, _STUDY_UID, required=True),
                series_uid=_text(ds, _SERIES_UID, required=True),
                sop_uid=_text(ds, _SOP_UID, required=True),
                study_date=_text(ds, _STUDY_DATE),
                accession_number=_text(ds, _ACCESSION),
                number_of_frames=_positive_int(_text(ds, _FRAMES)),
                private_tenant=_text(ds, TENANT_PRIVATE_TAG),
            )
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise ExtractionError(f"cannot decode the data set: {type(exc).__name__}: {exc}",
                              code=Code.NOT_DICOM) from None
    if header.study_uid is None and header.series_uid is None and header.sop_uid is None:
        # pydicom reads almost any byte soup without raising; a data set with none of
        # the identifying UIDs is what such soup looks like, so call it undecodable.
        raise ExtractionError("no Study, Series or SOP Instance UID: not a decodable instance",
                              code=Code.NOT_DICOM)
    return header


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def _valid_uid(value: str | None) -> bool:
    return value is not None and 0 < len(value) <= 64


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ScpConfig:
    """Everything the SCP needs; build with :meth:`from_settings`."""

    storage_root: Path
    tenancy: TenantResolver
    ae_title: str = "DICOMFLOW"
    host: str = "0.0.0.0"
    #: 0 lets the OS choose; read the bound port from :attr:`StorageSCP.address`.
    port: int = 11112
    worker_node_id: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Longer than the publisher's own request timeout, so its BrokerError wins the race.
    publish_timeout_s: float = 15.0
    #: Spool incoming data sets to disk (pynetdicom STORE_RECV_CHUNKED_DATASET).
    spool_to_disk: bool = True
    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    extra_transfer_syntaxes: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ScpConfig:
        config = cls(
            storage_root=settings.storage_root,
            tenancy=TenantResolver.from_settings(settings),
            ae_title=settings.scp_aet,
            host=settings.scp_host,
            port=settings.scp_port,
            worker_node_id=settings.worker_id,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
        )
        return replace(config, **overrides) if overrides else config

    def describe(self) -> dict[str, Any]:
        """The effective configuration for the start-up log line (no secrets here)."""
        return {
            "ae_title": self.ae_title,
            "listen": f"{self.host}:{self.port}",
            "storage_root": str(self.storage_root),
            "tls": self.tls_cert is not None,
            "spool_to_disk": self.spool_to_disk,
            "max_associations": self.max_associations,
            "default_tenant": self.tenancy.default_tenant,
            "calling_ae_tenants": len(self.tenancy.by_calling_ae),
            "called_ae_tenants": len(self.tenancy.by_called_ae),
            "tenant_from_private_tag": self.tenancy.from_private_tag,
        }


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context for ``start_server(ssl_context=...)``; TLS 1.2 at least."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}",
                          field="DICOMFLOW_SCP_TLS_CERT") from exc
    return ctx


def build_ae(config: ScpConfig) -> AE:
    """The acceptor AE: every storage SOP class in every syntax we store, plus Verification."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.acse_timeout = config.acse_timeout_s
    ae.dimse_timeout = config.dimse_timeout_s
    ae.network_timeout = config.network_timeout_s
    # Any called AE title is accepted: with tenant_by_called_ae one listener serves
    # several titles, and the tenancy check at association time is what gates access.
    ae.require_called_aet = False
    syntaxes = list(dict.fromkeys((*STORAGE_TRANSFER_SYNTAXES, *config.extra_transfer_syntaxes)))
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
    ae.add_supported_context(Verification)
    return ae


# ----------------------------------------------------------------------------- bridge


class LoopBridge:
    """Runs a publisher coroutine on the owner's event loop from a pynetdicom thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s

    def publish(self, publisher: Publisher, event: dict[str, Any], key: str | None,
                meanwhile: Callable[[], None] | None = None) -> None:
        """Publish and wait for the acknowledgement; :class:`BrokerError` on any failure.

        ``meanwhile`` runs on this thread while the broker acknowledges (the SCP syncs
        the stored file's directory there); its exception is raised after the wait.
        """
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            # Blocking the loop on a future that needs the loop can only time out.
            raise RuntimeError("LoopBridge.publish called on its own event loop thread")
        coro = publisher.publish(event, key)
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError as exc:  # the loop is closed
            coro.close()
            raise BrokerError(f"publisher event loop unavailable: {exc}") from exc
        side_error: BaseException | None = None
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException as exc:  # raised once the publish has settled
                side_error = exc
        try:
            fut.result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            # Cancelling cannot recall a record already handed to the producer: a late
            # delivery would name a revoked file, which ingest reports as FILE_MISSING.
            fut.cancel()
            raise BrokerError(f"no broker acknowledgement within {self.timeout_s}s") from None
        except concurrent.futures.CancelledError:
            raise BrokerError("publish cancelled: the publisher's loop is shutting down") from None
        except BrokerError:
            raise
        except Exception as exc:
            raise BrokerError(f"publish failed: {type(exc).__name__}: {exc}") from exc
        if side_error is not None:
            raise side_error


# ----------------------------------------------------------------------------- handlers


@dataclass(frozen=True)
class StoreDeps:
    """The C-STORE handler's dependencies, bound via ``evt_handlers`` arguments."""

    store: InstanceStore
    tenancy: TenantResolver
    publisher: Publisher
    bridge: LoopBridge
    worker_node_id: str


def _peer(assoc: Association) -> tuple[str, str, str]:
    """(calling AE, called AE, peer IP) of an association, from its A-ASSOCIATE-RQ."""
    rq = assoc.requestor.primitive
    calling = str(getattr(rq, "calling_ae_title", "") or assoc.requestor.ae_title).strip()
    called = str(getattr(rq, "called_ae_title", "") or "").strip()
    try:
        ip = assoc.requestor.address
    except ValueError:
        ip = ""
    return calling, called, ip


def _on_connection_open(event: Event) -> None:
    no_delay(event.assoc)


def handle_association_request(event: Event, tenancy: TenantResolver) -> None:
    """EVT_REQUESTED: reject an association that no tenant can be resolved for."""
    calling, called, ip = _peer(event.assoc)
    resolved = tenancy.for_association(calling, called)
    if resolved is not None:
        log.info("association accepted calling_ae=%s called_ae=%s source_ip=%s tenant=%s tenant_source=%s",
                 calling, called, ip, resolved.tenant, resolved.source)
        return
    log.warning("association rejected reason=calling_ae_not_recognised calling_ae=%s called_ae=%s "
                "source_ip=%s", calling, called, ip)
    event.assoc.acse.send_reject(_RJ_PERMANENT, _RJ_SERVICE_USER, _RJ_CALLING_AE)
    # As pynetdicom's own ACSE rejection does: wait for the peer to take the
    # A-ASSOCIATE-RJ and close, so it sees a rejection rather than a dropped socket.
    event.assoc.kill()


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


def _validated(event: dict[str, Any], trace_id: str) -> dict[str, Any]:
    """Validate against the contract; an optional field that breaks it is dropped, not fatal.

    The file is stored as received either way; ingest re-reads the header and
    dead-letters the instance with the precise extraction error if it must.
    """
    for _ in range(len(event)):
        try:
            validate_event(event)
            return event
        except ContractError as exc:
            if exc.field is None or exc.field in _REQUIRED_EVENT_FIELDS or event.get(exc.field) is None:
                raise
            log.warning("event field dropped trace_id=%s field=%s reason=%s", trace_id, exc.field,
                        exc.message)
            event[exc.field] = None
    validate_event(event)
    return event


def build_event(*, tenant: str, header: InstanceHeader, study_uid: str, series_uid: str, sop_uid: str,
                placement: Placement, trace_id: str, worker_node_id: str, source_ip: str,
                source_ae: str, transfer_syntax_uid: str, now: datetime) -> dict[str, Any]:
    """The storage event for one placed instance (not yet validated)."""
    study_date: str | None = None
    if header.study_date:
        with contextlib.suppress(ValueError):
            study_date = parse_da(header.study_date).isoformat()
    accession = header.accession_number
    # The same rule as dicom.extract, so the event and the extracted rows agree.
    if accession is None or len(accession.encode("utf-8")) > 16:
        accession = accession_fallback(tenant, study_uid)
    return {
        "tenant_id": tenant,
        "file_path": placement.relpath.as_posix(),
        "trace_id": trace_id,
        "worker_node_id": worker_node_id or None,
        "patient_id": header.patient_id,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "sop_uid": sop_uid,
        "file_size": placement.size,
        "transfer_syntax_uid": transfer_syntax_uid,
        "number_of_frames": header.number_of_frames,
        "created_time": format_datetime(now),
        "series_uid_hash": uid_hash(series_uid),
        "study_uid_hash": uid_hash(study_uid),
        "accession_number": accession,
        "target_ts": None,
        "study_date": study_date,
        "source_ip": source_ip or None,
        "source_ae": source_ae or None,
    }


def handle_store(event: Event, deps: StoreDeps) -> int:
    """EVT_C_STORE: store as received, publish, and answer truthfully."""
    started = time.monotonic()
    trace_id = str(uuid.uuid4())
    calling, called, ip = _peer(event.assoc)
    assoc_tenant: AssociationTenant | None = deps.tenancy.for_association(calling, called)
    if assoc_tenant is None:  # only if the EVT_REQUESTED check was not bound
        log.warning("store refused trace_id=%s reason=no_tenant calling_ae=%s", trace_id, calling)
        return NOT_AUTHORISED
    transfer_syntax = str(event.context.transfer_syntax)
    spool = _spool_path(event)
    data: bytes | None = None
    try:
        if spool is None:
            data = event.encoded_dataset()
            header = read_instance_header(data)
        else:
            header = read_instance_header(spool)
    except ExtractionError as exc:
        log.warning("store refused trace_id=%s reason=undecodable calling_ae=%s source_ip=%s error=%s",
                    trace_id, calling, ip, exc.message)
        return CANNOT_UNDERSTAND
    study_uid, series_uid = header.study_uid, header.series_uid
    sop_uid = header.sop_uid or str(getattr(event.request, "AffectedSOPInstanceUID", "") or "") or None
    if not (_valid_uid(study_uid) and _valid_uid(series_uid) and _valid_uid(sop_uid)):
        log.warning("store refused trace_id=%s reason=missing_uid calling_ae=%s study_uid=%r "
                    "series_uid=%r sop_uid=%r", trace_id, calling, study_uid, series_uid, sop_uid)
        return DATASET_MISMATCH
    study_uid, series_uid, sop_uid = cast(str, study_uid), cast(str, series_uid), cast(str, sop_uid)
    tenant = deps.tenancy.for_instance(assoc_tenant, header.private_tenant)
    relpath = deps.store.relpath(tenant, header.study_date, study_uid, series_uid, sop_uid)
    try:
        if data is not None:
            placement = deps.store.write_bytes(relpath, data)
        else:
            placement = deps.store.adopt_file(relpath, cast(Path, spool))
    except OSError as exc:
        log.error("store failed trace_id=%s reason=write path=%s error=%s", trace_id, relpath, exc)
        return OUT_OF_RESOURCES
    try:
        record = _validated(build_event(
            tenant=tenant, header=header, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
            placement=placement, trace_id=trace_id, worker_node_id=deps.worker_node_id,
            source_ip=ip, source_ae=calling, transfer_syntax_uid=transfer_syntax, now=datetime.now(),
        ), trace_id)
        # The directory fsync that makes the new name durable overlaps the broker round trip.
        deps.bridge.publish(deps.publisher, record, series_key(tenant, study_uid, series_uid),
                            meanwhile=placement.sync)
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


# ----------------------------------------------------------------------------- server


class StorageSCP:
    """The SCP as a component of an asyncio application.

    ``start()`` binds and returns at once (pynetdicom serves on its own threads);
    publishes run on the loop ``start()`` was given or called from. ``stop()``
    blocks until associations end, so from a coroutine use ``await aclose()``.

    ``spool_to_disk`` sets pynetdicom's process-wide ``STORE_RECV_CHUNKED_DATASET``
    while the SCP runs (restored by ``stop()``), and spools into
    ``{storage_root}/.spool`` rather than the system temp directory: on the storage
    filesystem the final placement is a hard link, not a copy (readers of the storage
    root skip dot-entries).
    """

    def __init__(self, config: ScpConfig, publisher: Publisher) -> None:
        self.config = config
        self.publisher = publisher
        self._server: ThreadedAssociationServer | None = None
        self._saved_chunked: bool | None = None
        self._saved_spool: Any = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when the config asked for 0."""
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Bind and serve in background threads. Without ``loop``, the running loop is used."""
        if self._server is not None:
            raise RuntimeError("the SCP is already started")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError("StorageSCP.start() needs loop= when called outside a coroutine") \
                    from None
        config = self.config
        ssl_context = (server_ssl_context(config.tls_cert, config.tls_key)
                       if config.tls_cert and config.tls_key else None)
        deps = StoreDeps(
            store=InstanceStore(config.storage_root),
            tenancy=config.tenancy,
            publisher=self.publisher,
            bridge=LoopBridge(loop, config.publish_timeout_s),
            worker_node_id=config.worker_node_id,
        )
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, _on_connection_open),
            (evt.EVT_REQUESTED, handle_association_request, [config.tenancy]),
            (evt.EVT_C_STORE, handle_store, [deps]),
        ]
        config.storage_root.mkdir(parents=True, exist_ok=True)
        ae = build_ae(config)
        self._saved_chunked = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = config.spool_to_disk
        if config.spool_to_disk:
            self._spool_into(config.storage_root / SPOOL_DIR)
        try:
            server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers,
                                     ssl_context=ssl_context)
        except BaseException:
            self._restore_config()
            raise
        self._server = cast("ThreadedAssociationServer", server)
        host, port = self.address
        tenancy = config.tenancy
        if not (tenancy.by_calling_ae or tenancy.by_called_ae or tenancy.default_tenant):
            log.warning("no tenant mapping and no default tenant: every association will be rejected; "
                        "set DICOMFLOW_DEFAULT_TENANT or DICOMFLOW_TENANT_BY_CALLING_AE")
        log.info("scp listening host=%s port=%s %s", host, port,
                 " ".join(f"{k}={v}" for k, v in config.describe().items()))

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, abort the rest."""
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.shutdown()
            deadline = time.monotonic() + grace_s
            for assoc in server.active_associations:
                assoc.join(max(0.0, deadline - time.monotonic()))
            for assoc in server.active_associations:
                log.warning("association aborted at shutdown calling_ae=%s", _peer(assoc)[0])
                assoc.abort()
        finally:
            self._restore_config()
        log.info("scp stopped")

    async def aclose(self, grace_s: float = 10.0) -> None:
        """:meth:`stop` off the loop, so handlers waiting on the loop can finish."""
        await asyncio.to_thread(self.stop, grace_s)

    async def __aenter__(self) -> StorageSCP:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _spool_into(self, folder: Path) -> None:
        # pynetdicom creates its spool files with a bare NamedTemporaryFile(); give it a
        # directory. Process-wide, like STORE_RECV_CHUNKED_DATASET itself.
        if not hasattr(_dimse_messages, "NamedTemporaryFile"):
            log.warning("pynetdicom spools to the system temp directory: no NamedTemporaryFile hook")
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._saved_spool = _dimse_messages.NamedTemporaryFile
        _dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment]
            tempfile.NamedTemporaryFile, dir=folder)

    def _restore_config(self) -> None:
        if self._saved_chunked is not None:
            _config.STORE_RECV_CHUNKED_DATASET = self._saved_chunked
            self._saved_chunked = None
        if self._saved_spool is not None:
            _dimse_messages.NamedTemporaryFile = self._saved_spool
            self._saved_spool = None


async def serve(settings: Settings, *, broker_url: str | None = None, profile: BrokerProfile | None = None,
                stop: asyncio.Event | None = None, handle_signals: bool = True,
                on_started: Callable[[StorageSCP], None] | None = None, **overrides: Any) -> None:
    """Run the SCP standalone until ``stop`` is set or SIGINT/SIGTERM (``dicomflow scp``).

    ``broker_url`` defaults to ``settings.broker``; ``profile`` to the production
    profile (pass ``EMBEDDED_PROFILE`` when the broker is the embedded Tansu).
    ``on_started`` is called with the running SCP (e.g. to print its address);
    ``overrides`` replace :class:`ScpConfig` fields (e.g. ``port=0``).
    """
    from core.settings import PRODUCTION_PROFILE
    from feeders.publisher import EventPublisher

    url = broker_url or settings.broker
    if url is None:
        raise ConfigError("the SCP needs a broker: set DICOMFLOW_BROKER (or run `dicomflow up`)",
                          field="DICOMFLOW_BROKER")
    config = ScpConfig.from_settings(settings, **overrides)
    publisher = EventPublisher(url, profile or PRODUCTION_PROFILE, partitions=settings.partitions)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
    scp = StorageSCP(config, publisher)
    try:
        await publisher.start()
        scp.start(loop)
        if on_started is not None:
            on_started(scp)
        await stop.wait()
    finally:
        await scp.aclose()
        await publisher.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)
