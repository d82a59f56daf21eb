"""One instance as the DICOM JSON Model (PS3.18 F.2), the object WADO-RS "metadata" returns.

pydicom's own JSON support (``DataElement.to_json_dict`` with ``bulk_data_threshold`` and a
``bulk_data_element_handler``) defines every value here. It costs about 8 ms per CT header,
eight times the header parse, so the common elements take a fast path that produces exactly
what pydicom would (``tests/test_series_json_model.py`` compares the two on every bundled
pydicom file); anything the fast path is not sure of (a non-ASCII text value, an ambiguous or
unknown VR, a person name with component groups, an odd number, big endian) goes to pydicom.

Bulk data: a binary value whose base64 form would exceed the threshold (pydicom's rule) becomes
``{"vr": …, "BulkDataURI": …}``. Such values are never read: the file is parsed with
``defer_size`` at the same bound, so Pixel Data is skipped with a seek. Long text and number
values stay inline (pydicom's rule, and dcm2json's).

The BulkDataURI names the instance and the element's path, WADO-RS style:
``{base}/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}[/{item}/{tag}…]``.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.tag import BaseTag

from core.errors import Code, ExtractionError

__all__ = ["DEFAULT_BULK_THRESHOLD", "InstanceJson", "JsonOptions", "instance_json", "dataset_json",
           "series_objects", "sort_key", "bulk_uri"]

#: Bytes of base64 above which a binary value becomes a BulkDataURI (pydicom's default too).
DEFAULT_BULK_THRESHOLD = 1024

INSTANCE_NUMBER, SOP_UID, STUDY_UID, SERIES_UID, CHARSET = 0x00200013, 0x00080018, 0x0020000D, 0x0020000E, 0x00080005

# What the fast path decodes itself; the rule for each is pydicom's converter of that VR.
_SPLIT_RSTRIP = frozenset(("CS", "AS", "DA", "TM", "DT", "UI"))   # multi_string: rstrip(" \0"), then split
_SPLIT_EACH = frozenset(("SH", "LO", "UC"))                       # convert_text: split, rstrip("\0 ") each
_SINGLE = frozenset(("LT", "ST", "UT", "UR"))                     # one value, rstrip("\0 ") (UR: rstrip " ")
_BINARY_NUMBERS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("L", 4), "SL": ("l", 4), "FL": ("f", 4),
                   "FD": ("d", 8), "UV": ("Q", 8), "SV": ("q", 8)}
_BYTES = frozenset(("OB", "OW", "OF", "OD", "OL", "OV", "UN"))
#: The element keys ("GGGGEEEE"), formatted once per tag, not once per instance.
_KEYS: dict[int, str] = {}
_STRUCTS: dict[tuple[str, int], struct.Struct] = {}
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: always a BulkDataURI.
_PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))


@dataclass(frozen=True, slots=True)
class JsonOptions:
    """How instances become JSON objects."""

    #: Base64 length above which a binary value becomes a BulkDataURI.
    bulk_threshold: int = DEFAULT_BULK_THRESHOLD
    #: Prefix of every BulkDataURI (e.g. the WADO-RS root ``https://pacs/dicomweb``); empty: a relative URI.
    bulk_uri_base: str = ""
    #: The tenant the document belongs to: named in every BulkDataURI (``?tenant=``), so that the
    #: URI resolves as written (the worker's routes need a tenant); None: not named.
    tenant: str | None = None

    @property
    def defer_size(self) -> int:
        """Values longer than this are bulk data if binary: not read at all (pydicom's criterion)."""
        return (self.bulk_threshold // 4) * 3


@dataclass(frozen=True, slots=True)
class InstanceJson:
    """One instance's JSON object, encoded, with what orders it in its series."""

    key: tuple[int, int, str]
    study_uid: str
    series_uid: str
    sop_uid: str
    data: bytes


def sort_key(instance_number: int | None, sop_uid: str) -> tuple[int, int, str]:
    """InstanceNumber, then SOP Instance UID; instances without a number come last."""
    return (0, instance_number, sop_uid) if instance_number is not None else (1, 0, sop_uid)


def bulk_uri(options: JsonOptions, study: str, series: str, sop: str, path: Iterable[str]) -> str:
    uri = f"{options.bulk_uri_base}/studies/{study}/series/{series}/instances/{sop}/bulkdata/{'/'.join(path)}"
    return uri if options.tenant is None else f"{uri}?tenant={quote(options.tenant, safe='')}"


def _struct(fmt: str, count: int) -> struct.Struct:
    s = _STRUCTS.get((fmt, count))
    if s is None:
        s = _STRUCTS[(fmt, count)] = struct.Struct(f"<{count}{fmt}")
    return s


def _resolve_deferred_vr(ds: Dataset, tag: int, vr: str) -> str:
    """pydicom's own resolution of an ambiguous VR (OB or OW: by transfer syntax and BitsAllocated),
    on a stand-in element, so the deferred value is not read."""
    stand_in = DataElement(tag, vr, b"")
    return str(correct_ambiguous_vr_element(stand_in, ds, True).VR)


class _Converter:
    """Converts one dataset (recursively) with a bulk handler that knows each element's path."""

    __slots__ = ("options", "uri", "dropped")

    def __init__(self, options: JsonOptions, uri: Callable[[list[str]], str]) -> None:
        self.options = options
        self.uri = uri
        #: Elements pydicom could not encode (tag path, reason): left out, as its suppress_invalid_tags does.
        self.dropped: list[tuple[str, str]] = []

    def dataset(self, ds: Dataset, path: list[str], ascii_text: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        raw_dict = ds._dict  # noqa: SLF001 - the raw, unconverted elements: what makes this fast
        table = _TEXT_TABLE if ascii_text else _TABLE
        keys = _KEYS
        for btag, elem in list(raw_dict.items()):
            tag = int(btag)  # a plain int: BaseTag's Python-level __eq__ made every dict lookup slow
            key = keys.get(tag)
            if key is None:
                key = keys[tag] = f"{tag:08X}"
            entry: dict[str, Any] | None = None
            if tag in _PIXEL_TAGS:
                entry = self._pixels(ds, tag, elem, path, key)
            elif type(elem) is RawDataElement:
                vr, value = elem.VR, elem.value
                convert = table.get(vr) if value and elem.is_little_endian else None  # type: ignore[arg-type]
                if convert is not None:
                    entry = convert(vr, value)  # type: ignore[arg-type]
                if entry is None:
                    entry = self._fast(ds, tag, elem, path, key, ascii_text)
            if entry is None:
                entry = self._slow(ds, tag, path, key, ascii_text)
                if entry is None:
                    continue
            out[key] = entry
        return out

    def _slow(self, ds: Dataset, tag: int, path: list[str], key: str, ascii_text: bool) -> dict[str, Any] | None:
        raw = ds._dict[BaseTag(tag)]  # noqa: SLF001
        little = raw.is_little_endian if isinstance(raw, RawDataElement) else ds.original_encoding[1] is not False
        try:
            elem: DataElement = ds[tag]
        except Exception as exc:  # noqa: BLE001 - one undecodable value must not lose the instance
            self.dropped.append((key, f"{type(exc).__name__}: {exc}"))
            return None
        if elem.VR == "SQ":
            items = [self.dataset(item, [*path, key, str(i)], ascii_text and _ascii_text(item))
                     for i, item in enumerate(elem.value)]
            return {"vr": "SQ", "Value": items}
        handler = (lambda _e: self.uri([*path, key]))  # noqa: E731 - the element's own path
        try:
            result: dict[str, Any] = elem.to_json_dict(handler, self.options.bulk_threshold)
        except Exception as exc:  # noqa: BLE001 - pydicom's suppress_invalid_tags: drop it, say so
            self.dropped.append((key, f"{type(exc).__name__}: {exc}"))
            return None
        return _standard(result, little)

    def _pixels(self, ds: Dataset, tag: int, elem: DataElement | RawDataElement, path: list[str],
                key: str) -> dict[str, Any] | None:
        """Pixel Data is bulk data at any size (the issue, and PS3.18: encapsulated fragments have no
        InlineBinary form); its value is never read. None: empty, left to pydicom."""
        if isinstance(elem, RawDataElement):
            if not elem.length or (elem.value is not None and not elem.value):
                return None
            vr = elem.VR or dictionary_VR(tag)
        else:
            if elem.is_empty:
                return None
            vr = str(elem.VR)
        if " or " in vr:
            vr = _resolve_deferred_vr(ds, tag, vr)
        return {"vr": vr, "BulkDataURI": self.uri([*path, key])}

    def _fast(self, ds: Dataset, tag: int, raw: RawDataElement, path: list[str], key: str,
              ascii_text: bool) -> dict[str, Any] | None:
        """What the table does not decide: implicit VR, deferred (bulk) values, binary values."""
        vr = raw.VR
        if vr is None:
            if tag & 0x10000:  # private, implicit VR: pydicom looks in its private dictionary
                return None
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                return None
        value = raw.value
        if value is None and raw.length:  # deferred: longer than the bulk bound, never read
            if " or " in vr:
                vr = _resolve_deferred_vr(ds, tag, vr)
            if vr in _BYTES and (vr != "UN" or tag & 0x10000):
                return {"vr": vr, "BulkDataURI": self.uri([*path, key])}
            return None
        if " or " in vr or vr == "UN" or not raw.is_little_endian:
            return None
        if not value:
            return {"vr": vr} if vr != "SQ" else None
        if vr in _BYTES:
            if len(value) > self.options.defer_size:
                return {"vr": vr, "BulkDataURI": self.uri([*path, key])}
            return {"vr": vr, "InlineBinary": base64.b64encode(value).decode()}
        convert = (_TEXT_TABLE if ascii_text else _TABLE).get(vr)
        return convert(vr, value) if convert is not None else None


def _unpad(vr: str, values: list[str]) -> list[str]:
    """Padding of each value of a multi-valued code string, date, time or UID (PS3.5 6.2: leading and
    trailing spaces of CS, trailing of the others, are not significant); pydicom strips only the last."""
    if vr == "CS":
        return [v.strip(" ") for v in values]
    return [v.rstrip(" \x00") for v in values]


def _nulls(values: list[str]) -> list[str | None]:
    """PS3.18 F.2.5: an empty value among several is null (pydicom writes "")."""
    return [v or None for v in values] if len(values) > 1 else list(values)


_SWAP = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _standard(entry: dict[str, Any], little_endian: bool) -> dict[str, Any]:
    """Where pydicom's JSON departs from PS3.18 F.2, put it right: an empty value among several
    is null (pydicom: ""), and InlineBinary of OW/OF/OL/OD/OV is little endian (pydicom: the
    file's byte order)."""
    values = entry.get("Value")
    if values is not None and len(values) > 1 and entry["vr"] != "SQ":
        if entry["vr"] in _SPLIT_RSTRIP:
            values = _unpad(entry["vr"], [v for v in values])
        entry["Value"] = [None if v == "" or v == {"Alphabetic": ""} else v for v in values]
    inline = entry.get("InlineBinary")
    size = _SWAP.get(entry["vr"])
    if inline is not None and size and not little_endian:
        data = bytearray(base64.b64decode(inline))
        cut = len(data) - len(data) % size
        for i in range(size // 2):  # reverse each word: swap byte i and byte size - 1 - i
            data[i:cut:size], data[size - 1 - i:cut:size] = data[size - 1 - i:cut:size], data[i:cut:size]
        entry["InlineBinary"] = base64.b64encode(bytes(data)).decode()
    return entry


# The table: VR -> converter of a non-empty little-endian value, each pydicom's rule for that VR
# (its converter in pydicom.values, then DataElement.to_json_dict); None: leave it to pydicom.
Entry = dict[str, Any] | None


def _numbers(fmt: str, size: int) -> Callable[[str, bytes], Entry]:
    one = struct.Struct(f"<{fmt}")
    floats = fmt in "fd"

    def convert(vr: str, value: bytes) -> Entry:
        if len(value) == size:  # the common case: one value
            numbers: tuple[Any, ...] = one.unpack(value)
        else:
            count, rest = divmod(len(value), size)
            if rest:
                return None
            numbers = _struct(fmt, count).unpack(value)
        if floats and any(n != n or n in _INFINITIES for n in numbers):
            return None  # NaN and infinities have no JSON number: pydicom decides
        return {"vr": vr, "Value": list(numbers)}
    return convert


_INFINITIES = (float("inf"), float("-inf"))


def _split_rstrip(vr: str, value: bytes) -> Entry:  # multi_string: rstrip(" \0"), then split
    if not value.isascii():
        return None
    stripped = value.rstrip(b" \x00")
    if not stripped:
        return {"vr": vr}
    parts = stripped.decode().split("\\")
    return {"vr": vr, "Value": _nulls(_unpad(vr, parts) if len(parts) > 1 else parts)}


def _split_each(vr: str, value: bytes) -> Entry:  # convert_text: split, rstrip("\0 ") each
    if not value.isascii():
        return None
    parts = [p.rstrip("\x00 ") for p in value.decode().split("\\")]
    return {"vr": vr} if len(parts) == 1 and not parts[0] else {"vr": vr, "Value": _nulls(parts)}


def _single(vr: str, value: bytes) -> Entry:  # convert_single_string: one value, rstrip("\0 ")
    if not value.isascii():
        return None
    text = value.decode().rstrip(" " if vr == "UR" else "\x00 ")
    return {"vr": vr, "Value": [text]} if text else {"vr": vr}


def _integer_string(vr: str, value: bytes) -> Entry:
    # Only digits, signs and spaces; int() then refuses whatever the IS syntax refuses ("1 2", "+-1", "").
    stripped = value.rstrip(b" \x00")
    if not stripped or stripped.translate(None, b"0123456789+- \\"):
        return None
    try:
        return {"vr": vr, "Value": [int(p) for p in stripped.split(b"\\")]}
    except ValueError:
        return None


def _decimal_string(vr: str, value: bytes) -> Entry:
    # Only DS characters (no "nan", "inf", "_"); float() then refuses what the DS syntax refuses.
    stripped = value.strip(b" \x00")
    if not stripped or stripped.translate(None, b"0123456789+-.eE \\"):
        return None
    try:
        return {"vr": vr, "Value": [float(p) for p in stripped.split(b"\\")]}
    except ValueError:
        return None


def _person_name(vr: str, value: bytes) -> Entry:
    stripped = value.rstrip(b" \x00")
    if not stripped or b"=" in stripped or not stripped.isascii():
        return None
    return {"vr": vr, "Value": [{"Alphabetic": p} if p else None for p in stripped.decode().split("\\")]}


def _application_entity(vr: str, value: bytes) -> Entry:
    if not value.isascii():
        return None
    parts = [p.strip() for p in value.decode().split("\\")]
    return {"vr": vr} if len(parts) == 1 and not parts[0] else {"vr": vr, "Value": _nulls(parts)}


_TABLE: dict[str, Callable[[str, bytes], Entry]] = {
    **{vr: _numbers(fmt, size) for vr, (fmt, size) in _BINARY_NUMBERS.items()},
    **dict.fromkeys(_SPLIT_RSTRIP, _split_rstrip),
    "IS": _integer_string, "DS": _decimal_string, "AE": _application_entity,
}
#: Text VRs decoded by the character set: only when all-ASCII decodes as ASCII (see _ascii_text).
_TEXT_TABLE: dict[str, Callable[[str, bytes], Entry]] = {
    **_TABLE, **dict.fromkeys(_SPLIT_EACH, _split_each), **dict.fromkeys(_SINGLE, _single), "PN": _person_name,
}


# Character sets in which an all-ASCII byte string decodes to the same ASCII text (pydicom's
# decoders of every other set are left to pydicom).
_ASCII_SAFE = frozenset(("", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 144",
                         "ISO_IR 127", "ISO_IR 126", "ISO_IR 138", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192",
                         "GB18030", "GBK", "ISO 2022 IR 6", "ISO 2022 IR 100"))


def _ascii_text(ds: Dataset) -> bool:
    """True when every all-ASCII text value of ``ds`` decodes as ASCII under its character set."""
    elem = ds._dict.get(BaseTag(CHARSET))  # noqa: SLF001
    if elem is None:
        return True
    value = elem.value
    if isinstance(value, bytes):
        names = value.decode("ascii", "replace").split("\\")
    elif isinstance(value, str):
        names = [value]
    elif isinstance(value, Iterable):
        names = [str(v) for v in value]
    else:
        return value is None
    return all(n.strip() in _ASCII_SAFE for n in names)


def dataset_json(ds: Dataset, options: JsonOptions, uri: Callable[[list[str]], str]) -> dict[str, Any]:
    """``ds`` as a DICOM JSON object; ``uri(path)`` names the bulk data at a tag path."""
    return _Converter(options, uri).dataset(ds, [], _ascii_text(ds))


def _uid(ds: Dataset, tag: int) -> str:
    """A UID, read without converting the element (the fast path wants it raw)."""
    elem = ds._dict.get(BaseTag(tag))  # noqa: SLF001
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value or "").strip("\x00 ")


def _instance_number(obj: dict[str, Any]) -> int | None:
    values = obj.get("00200013", {}).get("Value")
    if not values or not isinstance(values[0], int):
        return None
    return int(values[0])


def instance_json(path: str | Path, options: JsonOptions) -> InstanceJson:
    """Read one Part 10 file (bulk values skipped, never read) and encode its JSON object."""
    try:
        try:
            ds = pydicom.dcmread(path, defer_size=options.defer_size)
        except InvalidDicomError:
            # No preamble (ACR-NEMA style, a raw data set): the pipeline's reader accepts these.
            ds = pydicom.dcmread(path, defer_size=options.defer_size, force=True)
    except (InvalidDicomError, EOFError, ValueError, struct.error, AttributeError, KeyError) as exc:
        raise ExtractionError(f"not a readable DICOM file: {exc}", code=Code.NOT_DICOM,
                              field="file") from exc
    study, series, sop = _uid(ds, STUDY_UID), _uid(ds, SERIES_UID), _uid(ds, SOP_UID)
    if not study or not series or not sop:
        missing = "StudyInstanceUID" if not study else "SeriesInstanceUID" if not series else "SOPInstanceUID"
        raise ExtractionError(f"{missing} is missing or empty", code=Code.MISSING_REQUIRED_FIELD, field=missing)

    def uri(tag_path: list[str]) -> str:
        return bulk_uri(options, study, series, sop, tag_path)

    obj = dataset_json(ds, options, uri)
    return InstanceJson(sort_key(_instance_number(obj), sop), study, series, sop, orjson.dumps(obj))


def series_objects(paths: Iterable[str | Path], options: JsonOptions,
                   on_error: Callable[[Path, Exception], None] | None = None) -> Iterator[InstanceJson]:
    """Each file's object, one at a time (a series is never held in memory); unreadable files go to
    ``on_error`` (or raise)."""
    for p in paths:
        try:
            yield instance_json(p, options)
        except ExtractionError as exc:
            if on_error is None:
                raise
            on_error(Path(p), exc)
