"""The one DICOM header reader: ingest (``extract``), ``inspect``, the SCP and backfill read here.

A header is read by the fast scan (:mod:`dicom.headerscan`) when it can read the data
exactly as pydicom does, by pydicom otherwise; either way values come out through
:func:`text` (one text decoding) and the feeders' summary through
:func:`read_instance_header`. Pixel data is never read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from core.errors import Code, ExtractionError, FileAccessError
from dicom.headerscan import (
    MAX_DEPTH,
    MAX_ELEMENTS,
    LimitExceeded,
    ScannedHeader,
    scan_bytes,
    scan_file,
    too_deep,
    too_many,
)

__all__ = [
    "Header",
    "Source",
    "InstanceHeader",
    "DEFAULT_TRANSFER_SYNTAX",
    "TENANT_PRIVATE_TAG",
    "INSTANCE_TAGS",
    "read",
    "read_header",
    "looks_truncated",
    "raw_value",
    "text",
    "transfer_syntax",
    "read_instance_header",
]

DEFAULT_TRANSFER_SYNTAX = "1.2.840.10008.1.2"
#: The seeds' private tag carrying a tenant id (used by the SCP when configured).
TENANT_PRIVATE_TAG = 0x12111217

CHARSET_TAG = 0x00080005
PATIENT_ID, STUDY_DATE, ACCESSION = 0x00100020, 0x00080020, 0x00080050
STUDY_UID, SERIES_UID, SOP_UID, FRAMES = 0x0020000D, 0x0020000E, 0x00080018, 0x00280008
#: What a feeder needs at receive time; the character set decodes the private tag's bytes.
INSTANCE_TAGS: frozenset[int] = frozenset((CHARSET_TAG, PATIENT_ID, STUDY_UID, SERIES_UID, SOP_UID, STUDY_DATE,
                                           ACCESSION, FRAMES, TENANT_PRIVATE_TAG))

#: What the rules read values from: pydicom's Dataset, or the fast scan of a file.
Header = Dataset | ScannedHeader
#: A Part 10 file (its path) or the bytes of one (what an SCP received).
Source = str | os.PathLike[str] | bytes

# Text VRs split on backslash only; pydicom's default delimiter set for LO/SH/CS.
_TEXT_DELIMITERS = {0x5C}


#: Values longer than this are skipped, not read, when pydicom reads a header (a header the scan
#: gives up on can be hundreds of MB of private blobs); one the rules ask for is read on access.
DEFER_SIZE = 256 * 1024


def _file(source: Source) -> Any:
    return BytesIO(source) if isinstance(source, bytes) else source


def _malformed(message: str) -> ExtractionError:
    return ExtractionError(f"malformed DICOM: {message}", code=Code.MALFORMED_DICOM, field="file_path")


def _check_structure(ds: Dataset) -> None:
    """Enforce the scan's bounds on what pydicom read (sequences it parsed, elements it holds).

    Iterative: the point is not to recurse over a hostile structure. Sequences pydicom left
    unparsed (defined length) are not opened here; the rules never read one.
    """
    budget = MAX_ELEMENTS
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for elem in current.values():
            budget -= 1
            if budget < 0:
                raise _malformed(too_many())
            value = elem.value
            if isinstance(value, Sequence):
                if depth + 1 > MAX_DEPTH:
                    raise _malformed(too_deep())
                stack.extend((item, depth + 1) for item in value)


def read_header(source: Source) -> Dataset:
    """Read a DICOM header with pydicom, without pixel data.

    Raises :class:`FileAccessError` (FILE_MISSING / FILE_UNREADABLE) or
    :class:`ExtractionError` (NOT_DICOM).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # No specific_tags: pydicom's per-element tag filter costs more than it saves,
                # and values are only decoded when the rules ask for them.
                ds = pydicom.dcmread(_file(source), stop_before_pixels=True, defer_size=DEFER_SIZE)
                _check_structure(ds)
                return ds
            except InvalidDicomError:
                # Files without the 128-byte preamble (ACR-NEMA style, or a raw dataset) are
                # still DICOM; accept them only if a forced read finds real elements.
                ds = pydicom.dcmread(_file(source), stop_before_pixels=True, force=True, defer_size=DEFER_SIZE)
                _check_structure(ds)
                if not any(elem.tag.group >= 0x0008 and elem.keyword for elem in ds):
                    raise ExtractionError(
                        "not a DICOM file: no preamble/DICM prefix and no recognisable elements",
                        code=Code.NOT_DICOM, field="file_path",
                    ) from None
                return ds
    except FileNotFoundError:
        raise FileAccessError(f"file not found: {source!s:.200}", code=Code.FILE_MISSING,
                              field="file_path") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise FileAccessError(f"cannot read file: {exc.strerror}", code=Code.FILE_UNREADABLE,
                              field="file_path") from None
    except ExtractionError:
        raise
    except RecursionError:
        # pydicom parses undefined-length sequences recursively, several frames a level: the
        # stack runs out well past MAX_DEPTH levels, so this is the bound's rejection.
        raise _malformed(too_deep()) from None
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise ExtractionError(f"cannot parse DICOM header: {type(exc).__name__}: {exc}",
                              code=Code.NOT_DICOM, field="file_path") from None


def read(source: Source, tags: Iterable[int]) -> Header:
    """The header by the fast scan when it can read the data exactly, else by pydicom.

    ``tags`` are the elements the caller will ask for (pass a frozenset built once:
    the scan reuses it). Raises as :func:`read_header` does.
    """
    try:
        scanned = scan_bytes(source, tags) if isinstance(source, bytes) else scan_file(source, tags)
    except LimitExceeded as exc:
        raise _malformed(str(exc)) from None
    except (OSError, ValueError):
        scanned = None  # read_header classifies the failure (missing, unreadable, ...)
    return scanned if scanned is not None else read_header(source)


_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00",
               b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09")


def looks_truncated(path: str | os.PathLike[str]) -> bool:
    """Whether the header ends mid-element (pydicom reads such files silently).

    The top-level element read last must end exactly at end of file, or right before
    the pixel data (where reading stops). Only used to explain a missing required
    tag: a cut-off file is a transfer problem, not a bad header.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=16, force=True)
        size = os.path.getsize(path)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and str(meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":
            return False  # deflated: offsets do not map onto the file
        last = None
        for tag in ds.keys():
            last = ds.get_item(tag)
        if last is None:
            # A file meta header (or just the DICM preamble) with no dataset after it.
            with open(path, "rb") as fh:
                fh.seek(128)
                return fh.read(4) == b"DICM"
        tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            return False
        end = int(tell) + int(length)
        if end > size:
            return True
        if end == size:
            return False
        with open(path, "rb") as fh:
            fh.seek(end)
            return fh.read(4) not in _PIXEL_TAGS
    except Exception:
        return False


def _value(ds: Header, tag: int) -> Any:
    """The element's value (raises what pydicom's lazy decoding raises)."""
    if isinstance(ds, ScannedHeader):
        return ds.value(tag)
    return None if ds.get_item(tag) is None else ds[tag].value


def raw_value(ds: Header, tag: int, *, strict: bool = False) -> Any:
    """The element's value, or None when absent, empty, a sequence or undecodable.

    ``strict`` raises instead of answering None for a value pydicom cannot decode.
    """
    try:
        value = _value(ds, tag)
    except Exception:  # lazy decoding of a malformed element
        if strict:
            raise
        return None
    if value is None or value == "" or isinstance(value, Sequence):
        return None
    return value


def _decode(ds: Header, value: bytes) -> str:
    # Bytes are an element pydicom did not decode: a private tag read with implicit VR
    # (VR UN). Decode them as pydicom decodes the same element written as LO, with the
    # file's Specific Character Set (none: pydicom's default, ISO 8859-1), so that
    # implicit and explicit VR files, and every reader, give the same text.
    try:
        charset = raw_value(ds, CHARSET_TAG)
    except Exception:
        charset = None
    names = [str(c) for c in charset] if isinstance(charset, MultiValue | list | tuple) else charset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown character set names: pydicom falls back itself
        return decode_bytes(value, convert_encodings(names), _TEXT_DELIMITERS)


def text(ds: Header, tag: int, *, strict: bool = False) -> str | None:
    """The element as text: multi-values joined by ``\\``, padding stripped, None when empty."""
    value = raw_value(ds, tag, strict=strict)
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        result = "\\".join(str(v).strip() for v in value)
    elif isinstance(value, bytes):
        result = _decode(ds, value)
    else:
        result = str(value)
    result = result.strip(" \x00")
    return result or None


def transfer_syntax(ds: Header) -> str:
    """The file meta's transfer syntax; implicit VR little endian when there is none."""
    if isinstance(ds, ScannedHeader):
        return ds.transfer_syntax or DEFAULT_TRANSFER_SYNTAX
    meta = getattr(ds, "file_meta", None)
    value = None
    if meta is not None:
        try:
            value = meta.get("TransferSyntaxUID")
        except Exception:
            value = None
    result = str(value).strip(" \x00") if value else ""
    return result or DEFAULT_TRANSFER_SYNTAX


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few header values a feeder needs at receive time (no bounds applied)."""

    patient_id: str | None
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    study_date: str | None
    accession_number: str | None
    number_of_frames: int | None
    private_tenant: str | None
    transfer_syntax_uid: str | None = None


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number > 0 else None


def read_instance_header(source: Source) -> InstanceHeader:
    """Read the identifying header values of a Part 10 file (its path) or its bytes.

    Raises :class:`FileAccessError` for a file that cannot be opened and
    :class:`ExtractionError` (NOT_DICOM when the data set cannot be decoded, MALFORMED_DICOM
    when its structure is beyond the reader's bounds).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read(source, INSTANCE_TAGS)
            header = InstanceHeader(
                patient_id=text(ds, PATIENT_ID),
                # A UID that pydicom cannot decode means the data set is not readable.
                study_uid=text(ds, STUDY_UID, strict=True),
                series_uid=text(ds, SERIES_UID, strict=True),
                sop_uid=text(ds, SOP_UID, strict=True),
                study_date=text(ds, STUDY_DATE),
                accession_number=text(ds, ACCESSION),
                number_of_frames=_positive_int(text(ds, FRAMES)),
                private_tenant=text(ds, TENANT_PRIVATE_TAG),
                transfer_syntax_uid=transfer_syntax(ds),
            )
    except FileAccessError:
        raise
    except ExtractionError as exc:
        if exc.code == Code.MALFORMED_DICOM:
            raise
        raise ExtractionError(f"cannot decode the data set: {exc.message}", code=Code.NOT_DICOM) from None
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise ExtractionError(f"cannot decode the data set: {type(exc).__name__}: {exc}",
                              code=Code.NOT_DICOM) from None
    if header.study_uid is None and header.series_uid is None and header.sop_uid is None:
        # A forced read takes almost any byte soup without raising; a data set with none
        # of the identifying UIDs is what such soup looks like, so call it undecodable.
        raise ExtractionError("no Study, Series or SOP Instance UID: not a decodable instance",
                              code=Code.NOT_DICOM)
    return header
