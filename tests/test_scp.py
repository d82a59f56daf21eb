"""The C-STORE SCP feeder and the SCU, against the real Tansu broker and real associations.

Every network test runs a real pynetdicom SCP on a loopback port chosen by the OS
and talks to it with a real SCU (dicomflow's, a plain pynetdicom AE, or dcmtk's
``storescu`` when installed). The blocking SCU always runs in a worker thread:
the SCP's handlers publish through the test's event loop, which must stay free.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pydicom
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from bench.senders import find_dcmtk_storescu
from core.errors import BrokerError, Code, ConfigError, ExtractionError
from core.settings import EMBEDDED_PROFILE, Settings
from dicom.paths import TENANT_MARKER
from dicomflow.cli import main as cli_main
from dicomflow.embedded.broker import EmbeddedBroker
from dicomflow.tools.scu import send_paths
from feeders.publisher import EventPublisher
from feeders.scp import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    SPOOL_DIR,
    SUCCESS,
    LoopBridge,
    ScpConfig,
    StorageSCP,
    StoreDeps,
    handle_store,
    read_instance_header,
    serve,
)
from feeders.scp.association import server_ssl_context
from feeders.storage import UNKNOWN_STUDY_DATE, InstanceStore, safe_component
from feeders.tenancy import AssociationTenant, TenantResolver
from schemas.contract import validate_event
from schemas.records import series_key
from streams.topology import STORAGE

pytestmark = pytest.mark.integration

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
TEST_FILES = CT_SMALL.parent
# The partition count every test in the session must agree on (DICOMFLOW_PARTITIONS default).
PARTITIONS = 4
SCP_AET = "DICOMFLOW"
CREATED = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$")


# ----------------------------------------------------------------------------- data


@dataclass
class Study:
    study_uid: str
    folder: Path
    #: series uid -> [sop uids]
    series: dict[str, list[str]] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)

    @property
    def sop_uids(self) -> list[str]:
        return [s for sops in self.series.values() for s in sops]


def make_study(folder: Path, *, n_series: int = 2, n_instances: int = 3, study_date: str | None = "20240131",
               source: Path = CT_SMALL, **attrs: Any) -> Study:
    """Clones of ``source`` with fresh Study/Series/SOP UIDs, one file per instance."""
    folder.mkdir(parents=True, exist_ok=True)
    study = Study(study_uid=generate_uid(), folder=folder)
    for s in range(n_series):
        series_uid = generate_uid()
        study.series[series_uid] = []
        for i in range(n_instances):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID = study.study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = s + 1
            ds.InstanceNumber = i + 1
            ds.AccessionNumber = "ACC123"
            if study_date is None:
                if "StudyDate" in ds:
                    del ds.StudyDate
            else:
                ds.StudyDate = study_date
            for keyword, value in attrs.items():
                setattr(ds, keyword, value)
            path = folder / f"s{s}_i{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            study.series[series_uid].append(ds.SOPInstanceUID)
            study.paths.append(path)
    return study


def expected_path(root: Path, tenant: str, study: Study, series_uid: str, sop_uid: str,
                  date: str = "20240131") -> Path:
    return root / tenant / date / study.study_uid / series_uid / f"{sop_uid}.dcm"


async def collect_events(bootstrap: str, study_uids: set[str], expected: int,
                         timeout: float = 20.0) -> list[tuple[str | None, dict[str, Any]]]:
    """Storage events of the given studies, read from the beginning of the topic.

    The topic is shared by the whole session, so other tests' events are filtered out.
    Returns as soon as ``expected`` events arrived, or whatever arrived by the deadline.
    """
    consumer = AIOKafkaConsumer(STORAGE, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    found: list[tuple[str | None, dict[str, Any]]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(found) < expected and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    event = orjson.loads(rec.value)
                    if event.get("study_uid") in study_uids:
                        found.append((rec.key.decode() if rec.key else None, event))
    finally:
        await consumer.stop()
    return found


async def events_until_end(bootstrap: str) -> list[dict[str, Any]]:
    """Every storage event up to the topic's current end offsets (no waiting for absent ones)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(STORAGE, p) for p in sorted(consumer.partitions_for_topic(STORAGE) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(orjson.loads(r.value) for r in records)
        return out
    finally:
        await consumer.stop()


def files_under(root: Path) -> list[Path]:
    # Every file but the tenant directories' markers (dicom/paths.py): instances and leftovers.
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != TENANT_MARKER)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
async def publisher(broker: EmbeddedBroker) -> AsyncIterator[EventPublisher]:
    pub = EventPublisher(broker.url, EMBEDDED_PROFILE, partitions=PARTITIONS, request_timeout_s=5.0)
    await pub.start()
    try:
        yield pub
    finally:
        await pub.stop()


ScpFactory = Callable[..., StorageSCP]


async def _scp_factory(tmp_path: Path, engine: str) -> AsyncIterator[ScpFactory]:
    started: list[StorageSCP] = []

    def factory(pub: Any, *, tenancy: TenantResolver | None = None, **overrides: Any) -> StorageSCP:
        config = ScpConfig(
            storage_root=overrides.pop("storage_root", tmp_path / "storage"),
            tenancy=tenancy or TenantResolver(by_calling_ae={"MODALITY": "hospital-a"}),
            ae_title=SCP_AET, host="127.0.0.1", port=0, worker_node_id="test-worker", engine=engine,
            **overrides,
        )
        scp = StorageSCP(config, pub)
        scp.start()
        started.append(scp)
        return scp

    yield factory
    for scp in started:
        await scp.aclose(grace_s=5.0)


@pytest.fixture(params=["asyncio", "pynetdicom"])
async def start_scp(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[ScpFactory]:
    """Start an SCP on a free loopback port: ``start_scp(publisher, tenancy=..., **config)``; every
    test that uses it runs on both engines (feeders.scp.acceptor, and pynetdicom's)."""
    async for factory in _scp_factory(tmp_path, request.param):
        yield factory


@pytest.fixture
async def start_pynetdicom_scp(tmp_path: Path) -> AsyncIterator[ScpFactory]:
    """The pynetdicom engine only (tests of its reactors)."""
    async for factory in _scp_factory(tmp_path, "pynetdicom"):
        yield factory


@pytest.fixture
def chunked_send() -> Iterator[None]:
    """Send files' bytes as they are (no decode/re-encode by the SCU); restored afterwards."""
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


async def send(scp: StorageSCP, paths: list[Path], calling_aet: str = "MODALITY",
               called_aet: str = SCP_AET, progress: bool = False, **kw: Any) -> Any:
    host, port = scp.address
    return await asyncio.to_thread(send_paths, paths, host, port, called_aet, calling_aet, progress, **kw)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("spool_to_disk", [True, False], ids=["spooled", "in-memory"])
async def test_multi_series_study_is_stored_and_published(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
    spool_to_disk: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = make_study(tmp_path / "in")
    used: list[str] = []
    for method in ("adopt_file", "write_bytes"):
        original = getattr(InstanceStore, method)

        def spy(self: InstanceStore, *args: Any, _m: str = method, _o: Any = original) -> Any:
            used.append(_m)
            return _o(self, *args)

        monkeypatch.setattr(InstanceStore, method, spy)
    scp = start_scp(publisher, spool_to_disk=spool_to_disk)
    root = scp.config.storage_root

    summary = await send(scp, [study.folder])

    assert summary.succeeded == 6 and summary.failed == 0, summary.failures
    # Spooled data sets are moved from pynetdicom's spool file, never loaded into memory.
    assert used == ["adopt_file" if spool_to_disk else "write_bytes"] * 6
    if spool_to_disk:
        # pynetdicom spooled inside the storage root (so placing was a link), and left nothing there.
        assert (root / SPOOL_DIR).is_dir() and not any((root / SPOOL_DIR).iterdir())
    assert summary.statuses == {SUCCESS: 6}
    for series_uid, sops in study.series.items():
        for sop in sops:
            path = expected_path(root, "hospital-a", study, series_uid, sop)
            assert path.is_file()
            stored = pydicom.dcmread(path)
            assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert stored.SOPInstanceUID == sop
    # Exactly the six instances, and no temporary or spool leftovers beside them.
    assert len(files_under(root)) == 6

    events = await collect_events(broker.bootstrap, {study.study_uid}, expected=6)
    assert len(events) == 6
    by_sop = {e["sop_uid"]: (key, e) for key, e in events}
    assert set(by_sop) == set(study.sop_uids)
    for series_uid, sops in study.series.items():
        for sop in sops:
            key, event = by_sop[sop]
            validate_event(event)
            assert key == series_key("hospital-a", study.study_uid, series_uid)
            path = expected_path(root, "hospital-a", study, series_uid, sop)
            assert event["file_path"] == path.relative_to(root).as_posix()
            assert event["tenant_id"] == "hospital-a"
            assert event["series_uid"] == series_uid
            assert event["study_uid"] == study.study_uid
            assert event["file_size"] == path.stat().st_size
            assert event["transfer_syntax_uid"] == ExplicitVRLittleEndian
            assert event["source_ae"] == "MODALITY"
            assert event["source_ip"] == "127.0.0.1"
            assert event["worker_node_id"] == "test-worker"
            assert event["patient_id"] == pydicom.dcmread(CT_SMALL).PatientID
            assert event["study_date"] == "2024-01-31"
            assert event["accession_number"] == "ACC123"
            assert event["target_ts"] is None
            assert CREATED.match(event["created_time"])
            assert str(uuid.UUID(event["trace_id"])) == event["trace_id"]
    assert len({e["trace_id"] for _, e in events}) == 6


# Bundled pydicom files, one per transfer syntax the SCP must accept.
_SYNTAX_SAMPLES = [
    "MR_small_implicit.dcm",            # Implicit VR Little Endian
    "CT_small.dcm",                     # Explicit VR Little Endian
    "MR_small_bigendian.dcm",           # Explicit VR Big Endian
    "image_dfl.dcm",                    # Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm",            # JPEG Baseline
    "JPEG-lossy.dcm",                   # JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm",             # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",    # JPEG-LS Lossless
    "MR_small_jp2klossless.dcm",        # JPEG 2000 Lossless
    "JPEG2000.dcm",                     # JPEG 2000
    "MR_small_RLE.dcm",                 # RLE Lossless
]


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta information: the data set as encoded."""
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.read()


@pytest.mark.parametrize("spool_to_disk", [True, False], ids=["spooled", "in-memory"])
async def test_every_common_transfer_syntax_is_stored_byte_for_byte(
    tmp_path: Path, publisher: EventPublisher, start_scp: ScpFactory, chunked_send: None,
    spool_to_disk: bool,
) -> None:
    """Each syntax is accepted and the data set is kept exactly as it came over the wire."""
    sources = []
    for name in _SYNTAX_SAMPLES:
        ds = pydicom.dcmread(TEST_FILES / name)
        # Several samples share UIDs; fresh ones keep them from overwriting each other.
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        sources.append(path)
    scp = start_scp(publisher, spool_to_disk=spool_to_disk)

    summary = await send(scp, sources)

    assert summary.succeeded == len(sources), summary.failures
    stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
              for p in files_under(scp.config.storage_root)}
    for src in sources:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        out = stored[ds.SOPInstanceUID]
        assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID, src.name
        assert _dataset_bytes(out) == _dataset_bytes(src), src.name


async def test_non_ascii_patient_survives(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    study = make_study(tmp_path / "in", n_series=1, n_instances=1, SpecificCharacterSet="ISO_IR 192",
                       PatientName="Müller^Jürgen", PatientID="PID-ü-患者")
    scp = start_scp(publisher)

    summary = await send(scp, study.paths)

    assert summary.succeeded == 1, summary.failures
    (series_uid, [sop]), = study.series.items()
    stored = pydicom.dcmread(expected_path(scp.config.storage_root, "hospital-a", study, series_uid, sop))
    assert str(stored.PatientName) == "Müller^Jürgen"
    assert stored.PatientID == "PID-ü-患者"
    [(_, event)] = await collect_events(broker.bootstrap, {study.study_uid}, expected=1)
    assert event["patient_id"] == "PID-ü-患者"


async def test_concurrent_associations_all_succeed(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    studies = [make_study(tmp_path / f"in{i}", n_series=1, n_instances=3) for i in range(3)]
    scp = start_scp(publisher)
    in_flight = threading.Barrier(3, timeout=10)

    def send_one(study: Study) -> Any:
        in_flight.wait()  # all three associations open together
        host, port = scp.address
        return send_paths([study.folder], host, port, SCP_AET, "MODALITY")

    summaries = await asyncio.gather(*(asyncio.to_thread(send_one, s) for s in studies))

    for summary in summaries:
        assert summary.succeeded == 3 and summary.failed == 0, summary.failures
    events = await collect_events(broker.bootstrap, {s.study_uid for s in studies}, expected=9)
    assert len(events) == 9
    assert len(files_under(scp.config.storage_root)) == 9


async def test_missing_study_date_goes_to_zero_folder(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    study = make_study(tmp_path / "in", n_series=1, n_instances=1, study_date=None)
    scp = start_scp(publisher)

    summary = await send(scp, study.paths, progress=True)

    assert summary.succeeded == 1, summary.failures
    (series_uid, [sop]), = study.series.items()
    assert expected_path(scp.config.storage_root, "hospital-a", study, series_uid, sop,
                         date=UNKNOWN_STUDY_DATE).is_file()
    [(_, event)] = await collect_events(broker.bootstrap, {study.study_uid}, expected=1)
    assert event["study_date"] is None


async def test_serve_standalone(tmp_path: Path, broker: EmbeddedBroker) -> None:
    """``serve()`` (what ``dicomflow scp`` runs) owns its publisher and stops on request."""
    settings = Settings.from_env({
        "DICOMFLOW_HOME": str(tmp_path / "home"),
        "DICOMFLOW_BROKER": broker.url,
        "DICOMFLOW_DEFAULT_TENANT": "standalone",
        "DICOMFLOW_PARTITIONS": str(PARTITIONS),
    })
    stop = asyncio.Event()
    started: asyncio.Future[StorageSCP] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, profile=EMBEDDED_PROFILE, stop=stop, handle_signals=False,
                                     on_started=started.set_result, host="127.0.0.1", port=0))
    scp = await asyncio.wait_for(started, 20)
    study = make_study(tmp_path / "in", n_series=1, n_instances=2)

    summary = await send(scp, study.paths, calling_aet="ANYONE")

    stop.set()
    await asyncio.wait_for(task, 20)
    assert summary.succeeded == 2, summary.failures
    assert not scp.running
    assert len(files_under(settings.storage_root / "standalone")) == 2
    events = await collect_events(broker.bootstrap, {study.study_uid}, expected=2)
    assert {e["tenant_id"] for _, e in events} == {"standalone"}


# ----------------------------------------------------------------------------- tenancy


async def test_unknown_calling_ae_is_rejected_at_association(
    tmp_path: Path, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    scp = start_scp(publisher, tenancy=TenantResolver(by_calling_ae={"MODALITY": "hospital-a"}))
    host, port = scp.address

    def associate() -> tuple[bool, bool, Any]:
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(host, port, ae_title=SCP_AET)
        established = assoc.is_established
        if established:
            assoc.release()
        return established, assoc.is_rejected, assoc.acceptor.primitive

    established, rejected, rj = await asyncio.to_thread(associate)

    assert not established and rejected
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)  # calling AE not recognised
    study = make_study(tmp_path / "in", n_series=1, n_instances=1)
    summary = await send(scp, study.paths, calling_aet="STRANGER")
    assert summary.failed == 1 and "rejected" in summary.failures[0][1]
    assert files_under(scp.config.storage_root) == []


async def test_default_tenant_accepts_unknown_calling_ae(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    settings = Settings.from_env({
        "DICOMFLOW_HOME": str(tmp_path / "home"),
        "DICOMFLOW_DEFAULT_TENANT": "fallback",
        "DICOMFLOW_TENANT_BY_CALLING_AE": "MODALITY=hospital-a",
    })
    scp = start_scp(publisher, tenancy=TenantResolver.from_settings(settings))
    study = make_study(tmp_path / "in", n_series=1, n_instances=1)

    summary = await send(scp, study.paths, calling_aet="STRANGER")

    assert summary.succeeded == 1, summary.failures
    (series_uid, [sop]), = study.series.items()
    assert expected_path(scp.config.storage_root, "fallback", study, series_uid, sop).is_file()
    [(key, event)] = await collect_events(broker.bootstrap, {study.study_uid}, expected=1)
    assert event["tenant_id"] == "fallback" and event["source_ae"] == "STRANGER"
    assert key == series_key("fallback", study.study_uid, series_uid)


async def test_called_ae_and_private_tag_tenancy(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    tenancy = TenantResolver(by_called_ae={"HOSP_B": "hospital-b"}, default_tenant="fallback",
                             from_private_tag=True)
    scp = start_scp(publisher, tenancy=tenancy)
    by_called = make_study(tmp_path / "a", n_series=1, n_instances=1)
    tagged = make_study(tmp_path / "b", n_series=1, n_instances=1)
    for path in tagged.paths:
        ds = pydicom.dcmread(path)
        ds.add_new(0x12111217, "LO", "clinic-7")
        ds.save_as(path)

    assert (await send(scp, by_called.paths, calling_aet="ANY", called_aet="HOSP_B")).succeeded == 1
    assert (await send(scp, tagged.paths, calling_aet="ANY")).succeeded == 1

    events = await collect_events(broker.bootstrap, {by_called.study_uid, tagged.study_uid}, expected=2)
    tenants = {e["study_uid"]: e["tenant_id"] for _, e in events}
    assert tenants == {by_called.study_uid: "hospital-b", tagged.study_uid: "clinic-7"}


async def test_private_tag_cannot_move_an_unmapped_caller_into_a_mapped_tenant(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue #14 item 9a: with a default tenant and the private tag on, an unknown device
    # tagged its data with a mapped hospital's tenant and it was stored and published there.
    tenancy = TenantResolver(by_calling_ae={"MODALITY": "hospital-a"}, by_called_ae={"HOSP_B": "hospital-b"},
                             default_tenant="fallback", from_private_tag=True)
    scp = start_scp(publisher, tenancy=tenancy)
    victims = {tenant: make_study(tmp_path / tenant, n_series=1, n_instances=1)
               for tenant in ("hospital-a", "hospital-b")}
    allowed = make_study(tmp_path / "clinic", n_series=1, n_instances=1)
    for tenant, study in [*victims.items(), ("clinic-7", allowed)]:
        for path in study.paths:
            ds = pydicom.dcmread(path)
            ds.add_new(0x12111217, "LO", tenant)
            ds.save_as(path)

    with caplog.at_level("WARNING", logger="feeders"):
        refused = [await send(scp, study.paths, calling_aet="STRANGER") for study in victims.values()]
    ok = await send(scp, allowed.paths, calling_aet="STRANGER")

    for summary in refused:
        assert summary.failed == 1 and summary.statuses == {NOT_AUTHORISED: 1}, summary
    assert ok.succeeded == 1, ok.failures
    root = scp.config.storage_root
    assert not (root / "hospital-a").exists() and not (root / "hospital-b").exists()
    assert [p.relative_to(root).parts[0] for p in files_under(root)] == ["clinic-7"]
    assert "reason=private_tag_names_mapped_tenant" in caplog.text
    assert "tenant=hospital-a" in caplog.text and "calling_ae=STRANGER" in caplog.text
    # Every publish was acknowledged before its answer: the topic up to its end now is complete.
    uids = {s.study_uid for s in victims.values()} | {allowed.study_uid}
    events = [e for e in await events_until_end(broker.bootstrap) if e.get("study_uid") in uids]
    assert [e["tenant_id"] for e in events] == ["clinic-7"]


def test_tenant_resolution_precedence() -> None:
    r = TenantResolver(by_calling_ae={"CT1": "a"}, by_called_ae={"HOSP_B": "b"}, default_tenant="d",
                       from_private_tag=True)
    assert r.for_association("CT1", "HOSP_B") == AssociationTenant("a", mapped=True, source="calling_ae")
    assert r.for_association("X", "HOSP_B ") == AssociationTenant("b", mapped=True, source="called_ae")
    dflt = r.for_association("X", "Y")
    assert dflt == AssociationTenant("d", mapped=False, source="default")
    # The private tag replaces only the default; a mapped device keeps its tenant.
    assert r.for_instance(dflt, "tagged") == "tagged"
    assert r.for_instance(dflt, "../evil") == "d"
    assert r.for_instance(AssociationTenant("a", True, "calling_ae"), "tagged") == "a"
    assert TenantResolver(by_calling_ae={"CT1": "a"}).for_association("X", "Y") is None
    with pytest.raises(ConfigError):
        TenantResolver(default_tenant="no spaces allowed")
    with pytest.raises(ConfigError):
        TenantResolver(by_called_ae={"X": "../x"})


# ----------------------------------------------------------------------------- failures


async def test_broker_down_returns_a700_and_leaves_no_file(
    tmp_path: Path, start_scp: ScpFactory,
) -> None:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as dedicated:
        pub = EventPublisher(dedicated.url, EMBEDDED_PROFILE, partitions=PARTITIONS, request_timeout_s=2.0)
        await pub.start()
        try:
            scp = start_scp(pub, publish_timeout_s=4.0)
            dedicated.stop()
            study = make_study(tmp_path / "in", n_series=1, n_instances=1)

            summary = await send(scp, study.paths)
        finally:
            await pub.stop()

    assert summary.failed == 1
    assert summary.statuses == {OUT_OF_RESOURCES: 1}
    (series_uid, [sop]), = study.series.items()
    assert not expected_path(scp.config.storage_root, "hospital-a", study, series_uid, sop).exists()
    assert files_under(scp.config.storage_root) == []  # no temporary file left behind either


class _FailingPublisher:
    async def publish(self, event: dict[str, Any], key: str | None) -> None:
        raise BrokerError("broker did not acknowledge the event: test")


def _fake_store_event(data: bytes, sop_uid: str = "1.2.3") -> Any:
    """Just enough of a pynetdicom Event for handle_store (in-memory mode)."""
    rq = SimpleNamespace(calling_ae_title="MODALITY", called_ae_title=SCP_AET)
    requestor = SimpleNamespace(primitive=rq, ae_title="MODALITY", address="10.0.0.1")
    return SimpleNamespace(
        assoc=SimpleNamespace(requestor=requestor),
        context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian),
        request=SimpleNamespace(AffectedSOPInstanceUID=sop_uid),
        encoded_dataset=lambda: data,
    )


async def _deps(root: Path, publisher: Any = None) -> StoreDeps:
    return StoreDeps(store=InstanceStore(root), tenancy=TenantResolver(by_calling_ae={"MODALITY": "t"}),
                     publisher=publisher or _FailingPublisher(),
                     bridge=LoopBridge(asyncio.get_running_loop(), 5.0), worker_node_id="w")


async def test_status_codes_for_bad_data_and_write_errors(tmp_path: Path) -> None:
    good = CT_SMALL.read_bytes()
    deps = await _deps(tmp_path / "root")

    async def status(data: bytes, deps: StoreDeps = deps) -> int:
        return await asyncio.to_thread(handle_store, _fake_store_event(data), deps)

    assert await status(b"\x00" * 128 + b"DICM" + b"\xff" * 64) == CANNOT_UNDERSTAND
    ds = pydicom.dcmread(CT_SMALL)
    del ds.SeriesInstanceUID
    buf = tmp_path / "no_series.dcm"
    ds.save_as(buf)
    assert await status(buf.read_bytes()) == DATASET_MISMATCH
    # The storage root is a file: every write fails with an OSError.
    (tmp_path / "blocked").write_bytes(b"")
    assert await status(good, await _deps(tmp_path / "blocked")) == OUT_OF_RESOURCES
    # Broker refuses: 0xA700, and the placed file is revoked.
    assert await status(good) == OUT_OF_RESOURCES
    assert files_under(tmp_path / "root") == []


async def test_loop_bridge_times_out_and_refuses_its_own_loop() -> None:
    class Hanging:
        async def publish(self, event: dict[str, Any], key: str | None) -> None:
            await asyncio.sleep(60)

    bridge = LoopBridge(asyncio.get_running_loop(), 0.2)
    with pytest.raises(BrokerError, match="within 0.2s"):
        await asyncio.to_thread(bridge.publish, Hanging(), {}, None)
    with pytest.raises(RuntimeError, match="own event loop"):
        bridge.publish(Hanging(), {}, None)


def test_header_reader_rejects_garbage() -> None:
    with pytest.raises(ExtractionError) as info:
        read_instance_header(b"not dicom at all")
    assert info.value.code == Code.NOT_DICOM
    header = read_instance_header(CT_SMALL.read_bytes())
    assert header.study_uid and header.series_uid and header.sop_uid


# ----------------------------------------------------------------------------- storage


def test_path_components_cannot_escape_the_root(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    rel = store.relpath("t", "2024-01-01", "../../etc", "..", "/abs/../x")
    assert rel.parts == ("t", UNKNOWN_STUDY_DATE, "_._.._etc", "_", "_abs_.._x.dcm")
    assert all(p not in ("..", ".", "") for p in rel.parts)
    assert safe_component(".hidden") == "_hidden"
    assert store.relpath("t", "20241399", "1", "2", "3").parts[1] == UNKNOWN_STUDY_DATE
    assert store.relpath("t", "20241231", "1", "2", "3").parts[1] == "20241231"
    placement = store.write_bytes(rel, b"x")
    assert placement.path.resolve().is_relative_to(tmp_path.resolve())


def test_rollback_restores_an_earlier_version(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    rel = store.relpath("t", "20240101", "1.2", "1.3", "1.4")
    store.write_bytes(rel, b"first").commit()
    second = store.write_bytes(rel, b"second")
    assert second.path.read_bytes() == b"second"
    second.rollback()
    # A retransmission that could not be announced must not delete the announced copy.
    assert second.path.read_bytes() == b"first"
    assert files_under(tmp_path) == [second.path]
    third = store.write_bytes(store.relpath("t", "20240101", "1.2", "1.3", "1.5"), b"new")
    third.rollback()
    assert not third.path.exists()


def test_adopt_file_copies_across_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    spool = tmp_path / "spool.dcm"
    spool.write_bytes(b"payload")
    real_replace = os.replace

    def cross_device(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def replace(src: Any, dst: Any) -> None:
        if Path(src) == spool:
            cross_device(src, dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "link", cross_device)
    monkeypatch.setattr(os, "replace", replace)
    store = InstanceStore(tmp_path / "root")
    placement = store.adopt_file(store.relpath("t", None, "1", "2", "3"), spool)
    assert placement.path.read_bytes() == b"payload" and placement.size == 7


def test_adopt_file_links_a_new_instance_and_keeps_an_announced_one(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "root")
    rel = store.relpath("t", "20240101", "1.2", "1.3", "1.4")
    first = tmp_path / "spool-1.dcm"
    first.write_bytes(b"first")
    placed = store.adopt_file(rel, first)
    placed.sync()
    placed.commit()
    # A new instance is linked into place: the spool name is gone, one name remains.
    assert not first.exists()
    assert placed.path.read_bytes() == b"first" and placed.path.stat().st_nlink == 1
    assert oct(placed.path.stat().st_mode & 0o777) == oct(0o640)
    # A retransmission of the same instance replaces it revocably: rollback restores the first copy.
    second = tmp_path / "spool-2.dcm"
    second.write_bytes(b"second")
    again = store.adopt_file(rel, second)
    assert again.path.read_bytes() == b"second"
    again.rollback()
    assert placed.path.read_bytes() == b"first"
    assert files_under(tmp_path / "root") == [placed.path]


# ----------------------------------------------------------------------------- other clients


async def test_third_party_scu(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    """dcmtk ``storescu`` interoperability.

    When dcmtk is not installed this does NOT skip: it sends the same study with a
    plain pynetdicom AE instead (not dicomflow's SCU), so a client other than ours
    still exercises the SCP; the client used is printed (see it with ``-s``).
    Note pynetdicom installs its own ``storescu`` script, so dcmtk is recognised by
    its ``--version`` output, not by name.
    """
    study = make_study(tmp_path / "in", n_series=2, n_instances=2)
    scp = start_scp(publisher)
    host, port = scp.address
    storescu = find_dcmtk_storescu()
    if storescu:
        print(f"client=dcmtk storescu path={storescu}")
        proc = await asyncio.to_thread(
            subprocess.run,
            [storescu, "-aet", "MODALITY", "-aec", SCP_AET, host, str(port), *map(str, study.paths)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"},
        )
        assert proc.returncode == 0, proc.stderr
    else:
        print("client=pynetdicom AE (dcmtk storescu not installed)")

        def plain_send() -> list[int]:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate(host, port, ae_title=SCP_AET)
            assert assoc.is_established
            try:
                return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in study.paths]
            finally:
                assoc.release()

        assert await asyncio.to_thread(plain_send) == [SUCCESS] * 4
    assert len(files_under(scp.config.storage_root)) == 4
    events = await collect_events(broker.bootstrap, {study.study_uid}, expected=4)
    assert {e["sop_uid"] for _, e in events} == set(study.sop_uids)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


async def test_tls_association(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    cert, key = _self_signed(tmp_path)
    scp = start_scp(publisher, tls_cert=cert, tls_key=key)
    study = make_study(tmp_path / "in", n_series=1, n_instances=1)
    client = ssl.create_default_context(cafile=str(cert))

    summary = await send(scp, study.paths, ssl_context=client, server_hostname="localhost")
    plain = await send(scp, study.paths)

    assert summary.succeeded == 1, summary.failures
    assert plain.failed == 1  # a cleartext client cannot talk to the TLS listener
    [(_, event)] = await collect_events(broker.bootstrap, {study.study_uid}, expected=1)
    assert event["sop_uid"] == study.sop_uids[0]

    # The same over the CLI: trusting the certificate works, the system CAs alone do not.
    host, port = scp.address
    base = ["send", str(study.paths[0]), "--host", host, "--port", str(port), "--aet", SCP_AET,
            "--calling-aet", "MODALITY", "--no-progress"]
    trusted = await asyncio.to_thread(CliRunner().invoke, cli_main,
                                      [*base, "--tls-ca", str(cert), "--tls-server-name", "localhost"])
    untrusted = await asyncio.to_thread(CliRunner().invoke, cli_main, [*base, "--tls"])
    assert trusted.exit_code == 0, trusted.output
    assert ": 1 succeeded, 0 warnings, 0 failed" in trusted.output, trusted.output
    assert untrusted.exit_code == 1 and ": 0 succeeded, 0 warnings, 1 failed" in untrusted.output, untrusted.output


@dataclass(frozen=True)
class Pki:
    """A test CA, a server certificate for localhost, and client certificates (openssl CLI)."""

    folder: Path
    ca: Path

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.pem", self.folder / f"{name}.key"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", str(key), "-out", str(cert))
    return cert, key


def _issue(folder: Path, ca: tuple[Path, Path], name: str, cn: str, extensions: str) -> None:
    cert, key, csr, ext = (folder / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={cn}",
             "-keyout", str(key), "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "1", "-extfile", str(ext), "-out", str(cert))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "ca")
    rogue_ca = _make_ca(folder, "rogue-ca")
    _issue(folder, ca, "server", "localhost",
           "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    for name in ("ct-scanner-1", "workstation-9"):
        _issue(folder, ca, name, name, "extendedKeyUsage=clientAuth\n")
    _issue(folder, rogue_ca, "rogue", "ct-scanner-1", "extendedKeyUsage=clientAuth\n")
    return Pki(folder, ca[0])


def _client_context(pki: Pki, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if name is not None:
        cert, key = pki.pair(name)
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def test_tls_client_certificates_are_required_and_verified(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory, pki: Pki,
) -> None:
    # Issue #14 item 9b: with DICOMFLOW_SCP_TLS_CA only a client holding a certificate signed
    # by that CA can associate.
    cert, key = pki.pair("server")
    scp = start_scp(publisher, tls_cert=cert, tls_key=key, tls_ca=pki.ca)
    study = make_study(tmp_path / "in", n_series=1, n_instances=1)

    async def attempt(client: str | None) -> Any:
        return await send(scp, study.paths, ssl_context=_client_context(pki, client), server_hostname="localhost")

    without, rogue = await attempt(None), await attempt("rogue")
    assert without.failed == 1 and without.succeeded == 0, without
    assert rogue.failed == 1 and rogue.succeeded == 0, rogue
    assert files_under(scp.config.storage_root) == []
    trusted = await attempt("workstation-9")
    assert trusted.succeeded == 1, trusted.failures
    [(_, event)] = await collect_events(broker.bootstrap, {study.study_uid}, expected=1)
    assert event["tenant_id"] == "hospital-a"  # no CN map: the AE-title mapping decides


async def test_certificate_cn_decides_the_tenant(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory, pki: Pki,
) -> None:
    settings = Settings.from_env({
        "DICOMFLOW_HOME": str(tmp_path / "home"),
        "DICOMFLOW_SCP_TLS_CERT": str(pki.pair("server")[0]),
        "DICOMFLOW_SCP_TLS_KEY": str(pki.pair("server")[1]),
        "DICOMFLOW_SCP_TLS_CA": str(pki.ca),
        "DICOMFLOW_TENANT_BY_CERT_CN": "ct-scanner-1=hospital-c",
        "DICOMFLOW_TENANT_BY_CALLING_AE": "MODALITY=hospital-a",
        "DICOMFLOW_TENANT_FROM_PRIVATE_TAG": "1",
    })
    config = ScpConfig.from_settings(settings)
    assert config.tls_ca == pki.ca and config.describe()["tls_client_ca"] == str(pki.ca)
    scp = start_scp(publisher, tenancy=config.tenancy, tls_cert=config.tls_cert, tls_key=config.tls_key,
                    tls_ca=config.tls_ca)
    by_cert = make_study(tmp_path / "c", n_series=1, n_instances=1)
    for path in by_cert.paths:  # a tag cannot move a certificate-mapped caller either
        ds = pydicom.dcmread(path)
        ds.add_new(0x12111217, "LO", "clinic-7")
        ds.save_as(path)
    by_ae = make_study(tmp_path / "a", n_series=1, n_instances=1)

    # The certificate's CN wins over the calling AE's mapping; an unmapped CN falls back to the AE.
    first = await send(scp, by_cert.paths, calling_aet="MODALITY",
                       ssl_context=_client_context(pki, "ct-scanner-1"), server_hostname="localhost")
    second = await send(scp, by_ae.paths, calling_aet="MODALITY",
                        ssl_context=_client_context(pki, "workstation-9"), server_hostname="localhost")

    assert first.succeeded == 1 and second.succeeded == 1, (first.failures, second.failures)
    events = await collect_events(broker.bootstrap, {by_cert.study_uid, by_ae.study_uid}, expected=2)
    assert {e["study_uid"]: e["tenant_id"] for _, e in events} == {
        by_cert.study_uid: "hospital-c", by_ae.study_uid: "hospital-a"}


def test_client_certificate_settings_are_checked(tmp_path: Path, pki: Pki) -> None:
    base = {"DICOMFLOW_HOME": str(tmp_path)}
    tls = {**base, "DICOMFLOW_SCP_TLS_CERT": "c.pem", "DICOMFLOW_SCP_TLS_KEY": "k.pem"}
    with pytest.raises(ConfigError, match="DICOMFLOW_SCP_TLS_CA"):
        Settings.from_env({**base, "DICOMFLOW_SCP_TLS_CA": "ca.pem"})  # a CA without a server certificate
    with pytest.raises(ConfigError, match="DICOMFLOW_TENANT_BY_CERT_CN"):
        Settings.from_env({**tls, "DICOMFLOW_TENANT_BY_CERT_CN": "a=b"})  # a CN map without verification
    s = Settings.from_env({**tls, "DICOMFLOW_SCP_TLS_CA": "ca.pem", "DICOMFLOW_TENANT_BY_CERT_CN": "a=t1,b=t2"})
    assert s.scp_tls_ca == Path("ca.pem") and s.tenant_by_cert_cn == {"a": "t1", "b": "t2"}
    with pytest.raises(ConfigError, match="cannot load TLS client CA") as bad_ca:
        server_ssl_context(*pki.pair("server"), ca=tmp_path / "missing-ca.pem")
    assert bad_ca.value.field == "DICOMFLOW_SCP_TLS_CA"
    assert server_ssl_context(*pki.pair("server"), ca=pki.ca).verify_mode == ssl.CERT_REQUIRED
    assert server_ssl_context(*pki.pair("server")).verify_mode == ssl.CERT_NONE


def test_directory_sync_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    store = InstanceStore(tmp_path)
    placement = store.write_bytes(store.relpath("t", None, "1", "2", "3"), b"x")
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        placement.sync()  # the SCP then answers 0xA700 and revokes the file
    placement.rollback()  # lenient: a rollback must not fail on the same error
    assert not placement.path.exists()


def _thread_cpu_ticks(native_ids: list[int]) -> int:
    """utime + stime of this process's threads, in clock ticks (from /proc)."""
    total = 0
    for tid in native_ids:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


async def test_an_open_association_does_not_poll(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_pynetdicom_scp: ScpFactory,
) -> None:
    """pynetdicom's reactors poll every millisecond (about 0.13 of a core per association, measured);
    the SCP's reactors wait for work instead (feeders.scp.reactor), and stores still go through."""
    study = make_study(tmp_path / "in", n_series=1, n_instances=3)
    scp = start_pynetdicom_scp(publisher)
    host, port = scp.address
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = await asyncio.to_thread(ae.associate, host, port, ae_title=SCP_AET)
    try:
        assert assoc.is_established
        server = scp._server
        assert server is not None
        served = server.active_associations
        assert len(served) == 1
        ids = [t.native_id for t in (served[0], served[0].dul) if t.native_id is not None]
        assert len(ids) == 2
        before = _thread_cpu_ticks(ids)
        await asyncio.sleep(2.0)  # idle: the polling reactors burnt 0.09 s of CPU here (measured)
        idle_ticks = _thread_cpu_ticks(ids) - before
        hz = os.sysconf("SC_CLK_TCK")
        assert idle_ticks <= 0.03 * hz, f"{idle_ticks / hz:.3f} s of CPU in 2 s of an idle association"
        for path in study.paths:
            ds = pydicom.dcmread(path)
            status = await asyncio.to_thread(assoc.send_c_store, ds)
            assert status.Status == 0x0000
    finally:
        await asyncio.to_thread(assoc.release)
    assert len(files_under(scp.config.storage_root)) == 3


async def test_the_scu_keeps_c_store_responses_for_its_sender(
    tmp_path: Path, broker: EmbeddedBroker, publisher: EventPublisher, start_scp: ScpFactory,
) -> None:
    """pynetdicom's requestor reactor can take a response meant for send_c_store (a race in its
    pause), which then times out and aborts: seen once in a few thousand C-STOREs from 4
    associations. With the guard, the reactor's non-blocking poll never takes one."""
    from dicomflow.tools.scu import keep_responses_for_the_sender

    study = make_study(tmp_path / "in", n_series=1, n_instances=2)
    scp = start_scp(publisher)
    host, port = scp.address
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = await asyncio.to_thread(ae.associate, host, port, ae_title=SCP_AET)
    try:
        assert assoc.is_established
        keep_responses_for_the_sender(assoc)
        assoc.dimse.msg_queue.put((1, "a response"))  # as if it had just arrived
        assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's poll takes nothing
        assert assoc.dimse.get_msg(block=True) == (1, "a response")  # the sender gets it
        for path in study.paths:
            status = await asyncio.to_thread(assoc.send_c_store, pydicom.dcmread(path))
            assert status.Status == 0x0000
    finally:
        await asyncio.to_thread(assoc.release)


def test_the_scp_journals_from_its_handler_threads_without_the_event_loop(tmp_path: Path) -> None:
    """On the embedded stack the journal line is appended with no event loop in between (issue #15):
    here the publisher's loop never runs, and every C-STORE still gets Success after its line."""
    from feeders.journal import JournalPublisher, journal_files, read_lines

    study = make_study(tmp_path / "in", n_series=1, n_instances=3)
    journal = JournalPublisher(tmp_path / "journal", "scp")
    journal.writer.open()
    config = ScpConfig(storage_root=tmp_path / "storage", tenancy=TenantResolver(by_calling_ae={"MODALITY": "t1"}),
                       ae_title=SCP_AET, host="127.0.0.1", port=0, worker_node_id="test-worker",
                       publish_timeout_s=2.0)
    loop = asyncio.new_event_loop()  # never run: a publish through it could only time out
    scp = StorageSCP(config, journal)
    scp.start(loop=loop)
    try:
        host, port = scp.address
        summary = send_paths([study.folder], host, port, SCP_AET, "MODALITY")
    finally:
        scp.stop(grace_s=2.0)
        loop.close()
        journal.writer.close()
    assert summary.succeeded == 3 and summary.failed == 0, summary.failures
    lines = [line for path in journal_files(tmp_path / "journal") for line in read_lines(path, 0)]
    assert sorted(line.event["sop_uid"] for line in lines) == sorted(study.sop_uids)
