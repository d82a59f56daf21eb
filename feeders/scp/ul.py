"""The DICOM upper layer and DIMSE messages an acceptor of C-STORE needs (PS3.8, PS3.7), as bytes.

Pure encoding and decoding, no I/O: :mod:`feeders.scp.acceptor` reads and writes the PDUs.
Only what a storage SCP takes part in: A-ASSOCIATE-RQ in; A-ASSOCIATE-AC/RJ, A-RELEASE-RP
and A-ABORT out; P-DATA-TF both ways; DIMSE command sets in Implicit VR Little Endian
(PS3.7 6.3.1), always, whatever the data set's transfer syntax.

Why not pynetdicom's DUL and DIMSE providers: they run two polling threads per association
and decode every command set through pydicom; an instance costs the whole pynetdicom SCP
~3.8 ms of CPU, against ~0.5 ms for this layer on asyncio (issue #15, ``bench.cost``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.uid import generate_uid

__all__ = [
    "UlError", "AssociateRQ", "PresentationContext", "parse_associate_rq", "associate_ac", "associate_rj",
    "release_rp", "abort", "iter_pdvs", "p_data", "parse_command", "command", "file_meta", "uid_bytes", "uid_text",
    "UNRECOGNISED_PDU", "UNEXPECTED_PDU", "INVALID_PARAMETER",
    "A_ASSOCIATE_RQ", "A_ASSOCIATE_AC", "A_ASSOCIATE_RJ", "P_DATA_TF", "A_RELEASE_RQ", "A_RELEASE_RP", "A_ABORT",
    "APPLICATION_CONTEXT", "IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION",
]

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Derived once from a fixed name under pydicom's root: the same UID in every process and release.
IMPLEMENTATION_CLASS_UID = str(generate_uid(entropy_srcs=["dicomflow storage SCP"]))
IMPLEMENTATION_VERSION = "DICOMFLOW"

_HEADER = struct.Struct(">BBI")
_ITEM = struct.Struct(">BBH")
_PDV = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")


#: A-ABORT reasons (PS3.8 9.3.8, source 2: the service provider).
UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 1, 2, 6


class UlError(ValueError):
    """A PDU or a command set that does not follow PS3.8 / PS3.7: the association is aborted
    with ``reason`` (PS3.8 9.3.8)."""

    def __init__(self, message: str, reason: int = INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PresentationContext:
    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(slots=True)
class AssociateRQ:
    protocol_version: int
    called_ae: bytes
    calling_ae: bytes
    application_context: str = ""
    contexts: list[PresentationContext] = field(default_factory=list)
    #: The requestor's maximum PDU length (0: unlimited).
    max_length: int = 0

    @property
    def calling(self) -> str:
        return self.calling_ae.decode("ascii", "replace").strip()

    @property
    def called(self) -> str:
        return self.called_ae.decode("ascii", "replace").strip()


def uid_text(raw: bytes | memoryview) -> str:
    """A UID (or AE title) value as text; :class:`UlError` if it is not ASCII."""
    try:
        return bytes(raw).rstrip(b"\0 ").decode("ascii")
    except UnicodeDecodeError:
        raise UlError(f"a UID that is not ASCII: {bytes(raw)[:64]!r}") from None



def uid_bytes(value: str) -> bytes:
    """A UID value as DICOM encodes it: ASCII, padded to even length with a NUL."""
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _items(data: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    i, n = start, len(data)
    while i < n:
        if i + 4 > n:
            raise UlError(f"truncated item header at byte {i}")
        kind, _, length = _ITEM.unpack_from(data, i)
        if i + 4 + length > n:
            raise UlError(f"item 0x{kind:02X} at byte {i} runs past its PDU ({length} bytes)")
        yield kind, data[i + 4:i + 4 + length]
        i += 4 + length


def parse_associate_rq(body: bytes) -> AssociateRQ:
    """The variable part of an A-ASSOCIATE-RQ (the PDU without its 6-byte header)."""
    if len(body) < 68:
        raise UlError(f"A-ASSOCIATE-RQ of {len(body)} bytes (at least 68)")
    rq = AssociateRQ(protocol_version=struct.unpack_from(">H", body, 0)[0], called_ae=body[4:20],
                     calling_ae=body[20:36])
    for kind, item in _items(body, 68):
        if kind == 0x10:
            rq.application_context = uid_text(item)
        elif kind == 0x20:
            if len(item) < 4:
                raise UlError("presentation context item shorter than 4 bytes")
            abstract, syntaxes = "", []
            for sub, value in _items(item, 4):
                if sub == 0x30:
                    abstract = uid_text(value)
                elif sub == 0x40:
                    syntaxes.append(uid_text(value))
            rq.contexts.append(PresentationContext(item[0], abstract, tuple(syntaxes)))
        elif kind == 0x50:
            for sub, value in _items(item, 0):
                if sub == 0x51 and len(value) == 4:
                    rq.max_length = struct.unpack(">I", value)[0]
    return rq


def _item(kind: int, data: bytes) -> bytes:
    return _ITEM.pack(kind, 0, len(data)) + data


def _pdu(kind: int, data: bytes) -> bytes:
    return _HEADER.pack(kind, 0, len(data)) + data


def associate_ac(rq: AssociateRQ, results: list[tuple[int, int, str]], max_length: int) -> bytes:
    """A-ASSOCIATE-AC: ``results`` as (context id, result, transfer syntax); result 0 accepts,
    3 refuses the abstract syntax, 4 every proposed transfer syntax (PS3.8 9.3.3.2)."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    items += [_item(0x21, bytes((cid, 0, result, 0)) + _item(0x40, ts.encode("ascii")))
              for cid, result, ts in results]
    items.append(_item(0x50, _item(0x51, struct.pack(">I", max_length))
                       + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
                       + _item(0x55, IMPLEMENTATION_VERSION.encode())))
    return _pdu(A_ASSOCIATE_AC, b"\0\1\0\0" + rq.called_ae + rq.calling_ae + bytes(32) + b"".join(items))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient; source 1 service user,
    2 service provider (ACSE), 3 service provider (presentation)."""
    return _pdu(A_ASSOCIATE_RJ, bytes((0, result, source, reason)))


def release_rp() -> bytes:
    return _pdu(A_RELEASE_RP, bytes(4))


def abort(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT: source 0 service user, 2 service provider (then ``reason``, PS3.8 9.3.8)."""
    return _pdu(A_ABORT, bytes((0, 0, source, reason)))


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of each PDV of a P-DATA-TF body."""
    i, n = 0, len(body)
    while i < n:
        if i + 6 > n:
            raise UlError("truncated PDV item")
        length, cid, control = _PDV.unpack_from(body, i)
        if length < 2 or i + 4 + length > n:
            raise UlError(f"PDV item of length {length} at byte {i} of a {n}-byte P-DATA-TF")
        yield cid, control, body[i + 6:i + 4 + length]
        i += 4 + length


def p_data(context_id: int, command_set: bytes, max_length: int) -> bytes:
    """A command set as P-DATA-TF PDUs, fragmented to the peer's maximum PDU length."""
    room = (max_length - 6) if max_length else len(command_set)  # 6: PDV length, context, control
    if room <= 0:
        raise UlError(f"the peer's maximum PDU length {max_length} cannot carry a PDV")
    out = []
    for start in range(0, len(command_set), room):
        fragment = command_set[start:start + room]
        last = 0x03 if start + room >= len(command_set) else 0x01
        out.append(_pdu(P_DATA_TF, _PDV.pack(len(fragment) + 2, context_id, last) + fragment))
    return b"".join(out)


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set (group 0000, Implicit VR Little Endian): element number -> value bytes."""
    out: dict[int, bytes] = {}
    i, n = 0, len(data)
    while i < n:
        if i + 8 > n:
            raise UlError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(data, i)
        if group != 0 or i + 8 + length > n:
            raise UlError(f"command element ({group:04X},{element:04X}) of length {length} is out of bounds")
        out[element] = data[i + 8:i + 8 + length]
        i += 8 + length
    return out


def command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set from (element, value) pairs in ascending order, with its group length."""
    body = b"".join(_ELEMENT.pack(0, e, len(v)) + v for e, v in elements)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def file_meta(sop_class: str, sop_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) for a received data set."""
    def element(number: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH", 2, number) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", 2, number) + vr + struct.pack("<H", len(value)) + value

    ae = source_ae.encode("ascii", "replace")
    body = (element(0x0001, b"OB", b"\0\1") + element(0x0002, b"UI", uid_bytes(sop_class))
            + element(0x0003, b"UI", uid_bytes(sop_uid)) + element(0x0010, b"UI", uid_bytes(transfer_syntax))
            + element(0x0012, b"UI", uid_bytes(IMPLEMENTATION_CLASS_UID))
            + element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode() + b" " * (len(IMPLEMENTATION_VERSION) % 2))
            + (element(0x0016, b"AE", ae + b" " * (len(ae) % 2)) if ae else b""))
    return bytes(128) + b"DICM" + element(0x0000, b"UL", struct.pack("<I", len(body))) + body
