"""A fast, strict scan of a Part 10 header: the raw bytes of the few elements the rules read.

pydicom's reader builds an element object for every element of the header and then
converts each value the rules ask for through several layers; for a CT header that is
about half of the whole ingest cost. Here the file is walked with struct offsets, only
the wanted elements' bytes are kept, and the common values (ASCII text, US numbers)
are converted directly.

The scan is a shortcut, never a second opinion. It *declines* (returns ``None``)
anything it is not certain to read exactly as pydicom does: no preamble, deflate or
big endian, a transfer syntax it does not know, an unknown VR, an element cut off by
the end of the file, a dataset whose VR style contradicts its transfer syntax. The
caller then reads the file with pydicom as before. Values it does not convert itself
(non-ASCII text, escape sequences, person names with component groups, odd numbers, a
VR other than the dictionary's) are handed to pydicom one by one, with the file's
character set; ``tests/test_headerscan.py`` checks both paths agree, value by value.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

__all__ = ["ScannedHeader", "scan_bytes", "scan_file", "DELEGATE", "LimitExceeded", "MAX_DEPTH", "MAX_ELEMENTS",
           "too_deep", "too_many"]

_IMPLICIT_LE = "1.2.840.10008.1.2"
_CHARSET_TAG = 0x00080005
_TRANSFER_SYNTAX_TAG = 0x00020010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# pydicom's stop_before_pixels stops at any of these.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

_VRS = frozenset(vr.encode() for vr in (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    "UR US UT UV").split())
# VRs with a reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset(vr.encode() for vr in "OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

#: The first read covers a typical header (CT, MR, CR: 2-20 KB); a longer one is read further.
_FIRST_READ = 64 * 1024
_MAX_HEADER_READ = 16 * 1024 * 1024

#: Bounds on a header's structure, which every reader enforces (the scan here, pydicom's read in
#: dicom/reader.py). Real headers nest sequences a dozen levels at most (SR content trees) and hold
#: well under 200,000 elements (an enhanced multi-frame's per-frame groups); beyond these a file is
#: hostile or broken, and walking it would exhaust the stack (600 nested sequences fit in 22 KB).
MAX_DEPTH = 64
MAX_ELEMENTS = 250_000


def too_deep() -> str:
    return f"sequences nested deeper than {MAX_DEPTH} levels"


def too_many() -> str:
    return f"more than {MAX_ELEMENTS} data elements in the header"


class LimitExceeded(Exception):
    """The header breaks :data:`MAX_DEPTH` or :data:`MAX_ELEMENTS`: a rejection, not a decline."""


_TAG_LEN = struct.Struct("<HHI")
_TAG_VR_LEN16 = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")

_IS = re.compile(r"[+-]?[0-9]+")
_DS = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class _Delegate:
    """Marker: this value is converted by pydicom, not here."""

    def __repr__(self) -> str:
        return "DELEGATE"


DELEGATE = _Delegate()


class _Malformed(Exception):
    """The scan declines the file."""


class _CutOff(_Malformed):
    """The bytes end mid-element: a truncated file, or only the start of one was read."""


@dataclass(slots=True)
class ScannedHeader:
    """What the scan found: the transfer syntax and the wanted elements' raw values."""

    transfer_syntax: str
    implicit: bool
    #: tag -> (VR as read or from the dictionary, value bytes, file offset of the value)
    elements: dict[int, tuple[str, bytes, int]]
    _fallback: Dataset | None = field(default=None, repr=False)
    _values: dict[int, Any] = field(default_factory=dict, repr=False)

    def value(self, tag: int) -> Any:
        """The element's value as pydicom would give it, or ``None`` when absent or empty.

        Text comes back as ``str`` or a list of ``str`` (numbers as their text, as
        ``str()`` of pydicom's DS/IS gives them); US as ``int`` or a list of ``int``.
        Raises whatever pydicom raises for a value it cannot convert.
        """
        try:
            return self._values[tag]
        except KeyError:
            pass
        found = self.elements.get(tag)
        if found is None:
            value = None
        else:
            vr, raw, _ = found
            value = _fast_value(tag, vr, raw)
            if value is DELEGATE:
                value = self._pydicom_value(tag)
        self._values[tag] = value
        return value

    def _pydicom_value(self, tag: int) -> Any:
        if self._fallback is None:
            ds = Dataset()
            for t, (vr, raw, tell) in self.elements.items():
                ds[BaseTag(t)] = RawDataElement(BaseTag(t), None if self.implicit else vr, len(raw), raw,
                                                      tell, self.implicit, True)
            self._fallback = ds
        return self._fallback[BaseTag(tag)].value


def _fast_value(tag: int, vr: str, raw: bytes) -> Any:
    if not raw:
        return None
    expected = _dictionary_vr(tag)
    if vr != expected:
        return DELEGATE
    if vr == "US":
        if len(raw) % 2:
            return DELEGATE
        numbers = struct.unpack(f"<{len(raw) // 2}H", raw)
        return numbers[0] if len(numbers) == 1 else list(numbers)
    if not raw.isascii() or b"\x1b" in raw:
        return DELEGATE  # a character set decodes it: pydicom's job
    text = raw.decode("ascii")
    if vr in ("SH", "LO"):
        items = [v.rstrip("\0 ") for v in text.split("\\")]
    elif vr in ("CS", "AS", "DA", "TM"):
        items = text.rstrip(" \x00").split("\\")
    elif vr == "UI":
        items = [v.strip() for v in text.rstrip("\0 ").rstrip(" \x00").split("\\")]  # UID() strips
    elif vr == "PN":
        if "=" in text:
            return DELEGATE  # component groups: PersonName reassembles them
        items = raw.rstrip(b"\x00 ").decode("ascii").split("\\")
    elif vr == "DS":
        items = text.strip().rstrip(" \x00").split("\\")
        if not all(_DS.fullmatch(v) for v in items):
            return DELEGATE
    elif vr == "IS":
        items = text.rstrip(" \x00").split("\\")
        if not all(_IS.fullmatch(v) for v in items):
            return DELEGATE
    else:
        return DELEGATE
    if len(items) == 1:
        return items[0] or None
    return items


_VR_CACHE: dict[int, str] = {}


def _dictionary_vr(tag: int) -> str:
    try:
        return _VR_CACHE[tag]
    except KeyError:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
        _VR_CACHE[tag] = vr
        return vr


def _little_endian_explicit(uid: str) -> bool:
    ts = UID(uid)
    return ts.is_transfer_syntax and ts.is_little_endian and not ts.is_implicit_VR and not ts.is_deflated


def _walk(buf: Any, pos: int, end: int, implicit: bool, wanted: frozenset[int] | None,
          out: dict[int, tuple[str, bytes, int]], depth: int, budget: int) -> tuple[int, int]:
    """Walk a dataset from ``pos`` (``depth`` sequences down; ``budget`` elements left to read).

    Returns where it ended (pixel data, item end or ``end``) and the budget left.
    """
    tag_len, tag_vr = _TAG_LEN.unpack_from, _TAG_VR_LEN16.unpack_from
    u32 = _U32.unpack_from
    nested = depth > 0
    while pos < end:
        budget -= 1
        if budget < 0:
            raise LimitExceeded(too_many())
        if pos + 8 > end:
            raise _CutOff("element header cut off")
        if implicit:
            group, elem, length = tag_len(buf, pos)
            tag = group << 16 | elem
            vr = b""
            start = pos + 8
        else:
            group, elem, vr, length = tag_vr(buf, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:
                vr = b""
                length = u32(buf, pos + 4)[0]
                start = pos + 8
            elif vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _CutOff("element header cut off")
                length = u32(buf, pos + 8)[0]
                start = pos + 12
            elif vr in _VRS:
                start = pos + 8
            else:
                raise _Malformed(f"unknown VR {vr!r}")
        if group == 0xFFFE:
            if nested and tag == _ITEM_END:
                return start, budget + 1  # a delimiter is not an element
            raise _Malformed("item tag outside a sequence")
        if not nested and tag in _PIXEL_TAGS:
            return pos, budget + 1
        if length == _UNDEFINED:
            if wanted is not None and tag in wanted:
                raise _Malformed("a wanted element is a sequence")
            if implicit or vr == b"SQ":
                pos, budget = _skip_sequence(buf, start, end, implicit, depth + 1, budget)
            elif vr == b"UN":
                # PS3.5 6.2.2: UN of undefined length is implicit
                pos, budget = _skip_sequence(buf, start, end, True, depth + 1, budget)
            else:
                raise _Malformed("undefined length on a non-sequence VR")
            continue
        stop = start + length
        if stop > end:
            raise _CutOff("element value cut off")
        if wanted is not None and tag in wanted:
            out[tag] = (vr.decode() if vr else _dictionary_vr(tag), bytes(buf[start:stop]), start)
        pos = stop
    if nested:
        raise _CutOff("item without its delimiter")
    return pos, budget


def _skip_sequence(buf: Any, pos: int, end: int, implicit: bool, depth: int, budget: int) -> tuple[int, int]:
    """Skip an undefined-length sequence's items (at ``depth``); returns the position after its
    delimiter and the element budget left."""
    if depth > MAX_DEPTH:
        raise LimitExceeded(too_deep())
    while True:
        if pos + 8 > end:
            raise _CutOff("sequence cut off")
        group, elem, length = _TAG_LEN.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return pos + 8, budget
        if tag != _ITEM:
            raise _Malformed("sequence content is not an item")
        if length == _UNDEFINED:
            pos, budget = _walk(buf, pos + 8, end, implicit, None, {}, depth, budget)
        else:
            pos += 8 + length
            if pos > end:
                raise _CutOff("item cut off")


class _NeedMore(Exception):
    """The header goes on past the bytes read so far."""


def _scan(buf: Any, size: int, wanted: frozenset[int], complete: bool = True) -> ScannedHeader | None:
    """Scan ``buf[:size]``; with ``complete=False`` it is only the start of the file, and a
    header that goes on past it raises :class:`_NeedMore` instead of reading as cut off."""
    if size < 132 or bytes(buf[128:132]) != b"DICM":
        return None
    meta: dict[int, tuple[str, bytes, int]] = {}
    pos = 132
    try:
        # File meta: explicit VR little endian, group 0002 only (pydicom reads it the same way).
        while pos + 8 <= size and _TAG_LEN.unpack_from(buf, pos)[0] == 0x0002:
            group, elem, vr, length = _TAG_VR_LEN16.unpack_from(buf, pos)
            start = pos + 8
            if vr in _LONG_VRS:
                length = _U32.unpack_from(buf, pos + 8)[0]
                start = pos + 12
            elif vr not in _VRS:
                return None
            if length == _UNDEFINED or start + length > size:
                return None
            meta[group << 16 | elem] = (vr.decode(), bytes(buf[start:start + length]), start)
            pos = start + length
        ts_raw = meta.get(_TRANSFER_SYNTAX_TAG)
        if ts_raw is None or not ts_raw[1].isascii():
            return None
        ts = ts_raw[1].decode("ascii").rstrip("\0 ").strip().strip(" \x00")
        if ts == _IMPLICIT_LE:
            implicit = True
        elif _little_endian_explicit(ts):
            implicit = False
        else:
            return None
        if pos + 6 <= size and not _consistent_vr_style(bytes(buf[pos + 4:pos + 6]), implicit):
            return None  # pydicom would switch VR style here; let it
        elements: dict[int, tuple[str, bytes, int]] = {}
        if _walk(buf, pos, size, implicit, wanted, elements, 0, MAX_ELEMENTS)[0] >= size and not complete:
            raise _NeedMore  # no pixel data yet: more elements may follow
    except _CutOff:
        if not complete:
            raise _NeedMore from None
        return None
    except (_Malformed, struct.error, UnicodeDecodeError):
        return None
    return ScannedHeader(ts, implicit, elements)


def _consistent_vr_style(vr: bytes, implicit: bool) -> bool:
    # pydicom's own test (filereader._is_implicit_vr): two capital letters mean explicit.
    looks_explicit = len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B
    return looks_explicit != implicit


def _wanted(tags: Iterable[int]) -> frozenset[int]:
    # The character set always travels with the values: delegated text needs it. Callers on
    # the per-event path pass a frozenset that has it already: no new set per file.
    if isinstance(tags, frozenset) and _CHARSET_TAG in tags:
        return tags
    return frozenset((*tags, _CHARSET_TAG))


def scan_bytes(data: bytes, wanted: Iterable[int]) -> ScannedHeader | None:
    """Scan a Part 10 file held in memory; ``None`` when the scan declines it.

    Raises :class:`LimitExceeded` for a header beyond :data:`MAX_DEPTH` or :data:`MAX_ELEMENTS`.
    """
    return _scan(data, len(data), _wanted(wanted))


def scan_file(path: str | os.PathLike[str], wanted: Iterable[int]) -> ScannedHeader | None:
    """Scan a Part 10 file; ``None`` when the scan declines it. OSError and
    :class:`LimitExceeded` propagate.

    Reads the start of the file and more only while the header goes on (never the pixel
    data of a large file). Read, not mapped: a file truncated while it is being read must
    not end the process with SIGBUS.
    """
    tags = _wanted(wanted)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(min(size, _FIRST_READ))
        while True:
            complete = len(data) >= size
            try:
                return _scan(data, len(data), tags, complete)
            except _NeedMore:
                if len(data) >= _MAX_HEADER_READ:
                    return None  # an enormous header: pydicom streams it
                more = fh.read(min(size, _MAX_HEADER_READ, 8 * len(data)) - len(data))
                if not more:
                    return _scan(data, len(data), tags, True)  # the file shrank: judge what is there
                data += more
