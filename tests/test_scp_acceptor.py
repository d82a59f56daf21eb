"""The asyncio engine of the SCP (feeders.scp.acceptor) at the protocol's edges.

The common paths (every transfer syntax, tenancy, TLS, broker down) run on both engines in
tests/test_scp.py. Here: what a peer can do that a well-behaved SCU does not, seen from the
outside. PDUs are built by pynetdicom's own encoders (an independent implementation of PS3.8)
and sent on a raw socket; results are read back as pynetdicom decodes them, and as files on
disk and lines in the journal.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_FIND_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ABORT,
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)

from feeders.journal import JournalPublisher, journal_files, read_lines
from feeders.scp import ScpConfig, StorageSCP
from feeders.scp.acceptor import SPOOL_DIR
from feeders.tenancy import TenantResolver

pytestmark = pytest.mark.integration

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
SCP_AET = "DICOMFLOW"


class JournalScp:
    """An asyncio-engine SCP that journals (no broker, no event loop needed), and what it left."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.journal_dir = tmp_path / "journal"
        self.journal = JournalPublisher(self.journal_dir, "scp")
        self.journal.writer.open()
        self.root = tmp_path / "storage"
        config = ScpConfig(storage_root=self.root, tenancy=TenantResolver(by_calling_ae={"MODALITY": "t1"}),
                           ae_title=SCP_AET, host="127.0.0.1", port=0, engine="asyncio", **overrides)
        self.loop = asyncio.new_event_loop()  # the publisher's; never run: the journal needs none
        self.scp = StorageSCP(config, self.journal)
        self.scp.start(loop=self.loop)

    @property
    def port(self) -> int:
        return self.scp.address[1]

    def stop(self) -> None:
        self.scp.stop(grace_s=2.0)
        self.loop.close()
        self.journal.writer.close()

    def stored(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*.dcm") if SPOOL_DIR not in p.parts)

    def spooled(self) -> list[Path]:
        spool = self.root / SPOOL_DIR
        return sorted(spool.iterdir()) if spool.is_dir() else []

    def journaled(self) -> list[str]:
        return [line.event["sop_uid"] for path in journal_files(self.journal_dir) for line in read_lines(path, 0)]


@pytest.fixture
def journal_scp(tmp_path: Path) -> Iterator[Any]:
    started: list[JournalScp] = []

    def start(**overrides: Any) -> JournalScp:
        scp = JournalScp(tmp_path, **overrides)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


# ----------------------------------------------------------------------------- a raw peer


def _associate_rq(contexts: list[tuple[str, str]], max_length: int = 16382) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "MODALITY"
    prim.called_ae_title = SCP_AET
    definitions = []
    for i, (abstract, syntax) in enumerate(contexts):
        cx = build_context(abstract, syntax)
        cx.context_id = 2 * i + 1
        definitions.append(cx)
    prim.presentation_context_definition_list = definitions
    length = MaximumLengthNotification()
    length.maximum_length_received = max_length
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    prim.user_information = [length, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def _store_pdus(ds: Dataset, max_pdu: int = 4096) -> list[bytes]:
    """A C-STORE-RQ of ``ds`` on context 1 as P-DATA-TF PDUs, the way pynetdicom's SCU fragments it."""
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return [_p_data(p) for p in msg.encode_msg(1, max_pdu)]


def _p_data(primitive: Any) -> bytes:
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


class RawPeer:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def pdu(self) -> tuple[int, bytes]:
        head = self._exactly(6)
        kind, _, length = struct.unpack(">BBI", head)
        return kind, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the SCP")
            out += chunk
        return out

    def associate(self, contexts: list[tuple[str, str]]) -> None:
        self.sock.sendall(_associate_rq(contexts))
        kind, _ = self.pdu()
        assert kind == 0x02, f"A-ASSOCIATE-AC expected, got PDU 0x{kind:02X}"

    def response(self) -> Dataset:
        """The next DIMSE response's command set (one or more P-DATA-TF PDUs)."""
        command = b""
        while True:
            kind, body = self.pdu()
            assert kind == 0x04, f"P-DATA-TF expected, got PDU 0x{kind:02X}"
            i = 0
            while i < len(body):
                length = struct.unpack_from(">I", body, i)[0]
                control = body[i + 5]
                assert control & 0x01, "a response carries a command only"
                command += body[i + 6:i + 4 + length]
                i += 4 + length
                if control & 0x02:
                    return decode(BytesIO(command), True, True)

    def abort(self) -> None:
        prim = A_ABORT()
        prim.abort_source = 0
        pdu = A_ABORT_RQ()
        pdu.from_primitive(prim)
        self.sock.sendall(bytes(pdu.encode()))

    def close(self) -> None:
        self.sock.close()


def _clone(tmp_path: Path) -> Dataset:
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("how", ["a-abort", "dropped"])
def test_a_data_set_cut_short_stores_nothing_and_leaves_no_spool_file(tmp_path: Path, journal_scp: Any,
                                                                       how: str) -> None:
    """Half a data set, then an A-ABORT or a dropped connection: no file placed, no journal line,
    no spool file left; the next association stores normally."""
    scp = journal_scp()
    ds = _clone(tmp_path)
    pdus = _store_pdus(ds)
    assert len(pdus) > 4
    peer = RawPeer(scp.port)
    peer.associate([(CTImageStorage, ExplicitVRLittleEndian)])
    for pdu in pdus[: len(pdus) // 2]:
        peer.sock.sendall(pdu)
    _until(lambda: scp.spooled(), 10, "the data set was not being spooled")
    if how == "a-abort":
        peer.abort()
    peer.close()
    _until(lambda: not scp.spooled(), 10, f"spool files left: {scp.spooled()}")
    assert scp.stored() == [] and scp.journaled() == []

    whole = RawPeer(scp.port)
    whole.associate([(CTImageStorage, ExplicitVRLittleEndian)])
    for pdu in pdus:
        whole.sock.sendall(pdu)
    rsp = whole.response()
    whole.close()
    assert rsp.Status == 0x0000 and rsp.MessageIDBeingRespondedTo == 7
    assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID and rsp.CommandField == 0x8001
    assert scp.journaled() == [ds.SOPInstanceUID] and len(scp.stored()) == 1
    assert pydicom.dcmread(scp.stored()[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_contexts_it_does_not_serve_are_refused_one_by_one(journal_scp: Any) -> None:
    """A query model is not served (result 3), a syntax outside the accepted ones is refused
    (result 4), and the storage context beside them is accepted."""
    scp = journal_scp()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.4.100")  # MPEG2: stored by no one here
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    try:
        assert assoc.is_established
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        refused = {(str(cx.abstract_syntax), cx.result) for cx in assoc.rejected_contexts}
        assert (str(CTImageStorage), ExplicitVRLittleEndian) in accepted
        assert refused == {(str(PatientRootQueryRetrieveInformationModelFind), 3), (str(CTImageStorage), 4)}
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_associations_beyond_the_limit_are_rejected_as_transient(journal_scp: Any) -> None:
    scp = journal_scp(max_associations=2)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    first = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    second = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    assert first.is_established and second.is_established
    third = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    assert third.is_rejected
    rj = third.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient: local limit
    first.release()
    _until(lambda: (a := ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)).is_established and not a.release(),
           10, "no room after a release")
    second.release()


def test_silent_peers_are_let_go(journal_scp: Any) -> None:
    """No A-ASSOCIATE-RQ within the ACSE timeout: the connection closes. An established
    association with nothing on it for the network timeout: aborted."""
    scp = journal_scp(acse_timeout_s=1.0, network_timeout_s=1.0)
    silent = RawPeer(scp.port)
    started = time.monotonic()
    assert silent.sock.recv(64) == b""  # closed by the SCP (the socket's own timeout is 10 s)
    assert time.monotonic() - started < 5
    silent.close()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    assert assoc.is_established
    _until(lambda: assoc.is_aborted or not assoc.is_alive(), 10, "an idle association was kept open")


def test_answers_fit_a_peer_with_a_small_maximum_pdu(tmp_path: Path, journal_scp: Any) -> None:
    """The response is fragmented to the peer's maximum PDU length (here smaller than the
    C-STORE-RSP command set), and the data set still arrives whole."""
    scp = journal_scp()
    ds = _clone(tmp_path)
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = 64
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    try:
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert scp.journaled() == [ds.SOPInstanceUID]
    assert pydicom.dcmread(scp.stored()[0]).PixelData == ds.PixelData


def test_a_command_it_does_not_serve_is_answered_unrecognised(tmp_path: Path, journal_scp: Any) -> None:
    """A C-FIND-RQ (with its identifier) sent on a storage context: answered 0x0211, nothing
    stored, and the association goes on to store an instance."""
    scp = journal_scp()
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientID = "*"
    req = C_FIND()
    req.MessageID = 3
    req.AffectedSOPClassUID = CTImageStorage
    req.Priority = 2
    req.Identifier = BytesIO(encode(identifier, False, True))
    msg = C_FIND_RQ()
    msg.primitive_to_message(req)
    peer = RawPeer(scp.port)
    try:
        peer.associate([(CTImageStorage, ExplicitVRLittleEndian)])
        for p in msg.encode_msg(1, 4096):
            peer.sock.sendall(_p_data(p))
        rsp = peer.response()
        assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8020, 3, 0x0211)
        ds = _clone(tmp_path)
        for pdu in _store_pdus(ds):
            peer.sock.sendall(pdu)
        assert peer.response().Status == 0x0000
    finally:
        peer.close()
    assert scp.journaled() == [ds.SOPInstanceUID]


# ----------------------------------------------------------------------------- hostile or broken peers


def _command_pdu(elements: list[tuple[int, bytes]], *, last: bool = True) -> bytes:
    """A P-DATA-TF carrying a hand-made command set (group 0000, Implicit VR Little Endian)."""
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    pdv = struct.pack(">IBB", len(body) + 2, 1, 0x03 if last else 0x01) + body
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _aborted(peer: RawPeer) -> bool:
    try:
        kind, _ = peer.pdu()
    except ConnectionError:
        return False
    return kind == 0x07


@pytest.mark.parametrize("bad", ["command-field-of-one-byte", "endless-command-set", "non-ascii-sop-class"])
def test_a_malformed_command_aborts_its_association_and_the_server_goes_on(tmp_path: Path, journal_scp: Any,
                                                                           bad: str) -> None:
    scp = journal_scp()
    peer = RawPeer(scp.port)
    peer.associate([(CTImageStorage, ExplicitVRLittleEndian)])
    if bad == "command-field-of-one-byte":
        peer.sock.sendall(_command_pdu([(0x0100, b"\x01"), (0x0110, b"\x01\x00"), (0x0800, b"\x01\x01")]))
    elif bad == "endless-command-set":
        chunk = _command_pdu([(0x0002, b"1" * 16_000)], last=False)
        for _ in range(6):  # ~96 KB of command set, never its last fragment
            peer.sock.sendall(chunk)
    else:
        peer.sock.sendall(_command_pdu([(0x0002, "1.2.\u00e9".encode("latin-1")), (0x0100, b"\x01\x00"),
                                        (0x0110, b"\x01\x00"), (0x0800, b"\x00\x00"),
                                        (0x1000, b"1.2.3.4\x00")]))
    assert _aborted(peer), "the association was not aborted with an A-ABORT"
    peer.close()
    ds = _clone(tmp_path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    assert scp.journaled() == [ds.SOPInstanceUID] and not scp.spooled()


def test_a_spool_that_cannot_be_written_answers_out_of_resources(tmp_path: Path, journal_scp: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    scp = journal_scp()

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    ds = _clone(tmp_path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    try:
        with monkeypatch.context() as patch:
            patch.setattr("feeders.scp.acceptor.tempfile.mkstemp", full)
            assert assoc.send_c_store(ds).Status == 0xA700
        assert assoc.send_c_store(ds).Status == 0x0000  # the same association, the disk back
    finally:
        assoc.release()
    assert scp.journaled() == [ds.SOPInstanceUID] and len(scp.stored()) == 1


def test_a_defect_in_the_store_answers_a_failure_not_a_hang(tmp_path: Path, journal_scp: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    scp = journal_scp()

    def broken(*args: Any) -> int:
        raise RuntimeError("a defect")

    monkeypatch.setattr("feeders.scp.acceptor.store_instance", broken)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
    try:
        assert assoc.send_c_store(_clone(tmp_path)).Status == 0xC211
        assert assoc.is_established
    finally:
        assoc.release()
    assert scp.journaled() == [] and not scp.spooled()


def test_connections_that_never_associate_take_no_association_slot(journal_scp: Any) -> None:
    """Health checks and port scans open TCP connections and say nothing: they must not make
    the SCP refuse a real sender while the limit is not reached."""
    scp = journal_scp(max_associations=1)
    idle = [RawPeer(scp.port) for _ in range(3)]
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AET)
        assert assoc.is_established
        assoc.release()
    finally:
        for peer in idle:
            peer.close()


def test_spool_files_a_killed_scp_left_are_swept_at_start(tmp_path: Path) -> None:
    spool = tmp_path / "storage" / SPOOL_DIR
    spool.mkdir(parents=True)
    old, recent = spool / ".rx-left-by-a-kill", spool / ".rx-another-scp-writing"
    old.write_bytes(b"partial")
    recent.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    scp = JournalScp(tmp_path)
    try:
        assert not old.exists() and recent.exists()
    finally:
        scp.stop()
