"""Header extraction: one DICOM file header -> the seeds' three records, or a typed error.

Pure: no I/O beyond reading the file it is given (and none at all for a Dataset).
The rules are the Rust system's ``make_state_info``/``make_image_info``:

* PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID: required, non-empty,
  at most 64 bytes; StudyDate: required, ``YYYYMMDD``; SOPClassUID: required.
* Every optional string keeps its bound; a longer value rejects the file, as in the
  seeds (BoundedString::try_from). Bounds count UTF-8 bytes, as Rust's ``str::len``
  and Doris VARCHAR do, so a row that passes here is never filtered by Doris.
* An optional TM that does not parse rejects the file; an optional DA that does not
  parse is dropped to NULL (the seeds' ``get_date_value_dicom`` returns an Option);
  unparsable numbers are NULL (``get_int_value``/``get_decimal_value``).
* AccessionNumber missing, empty or longer than 16 -> ``X32CRC<crc32>`` fallback.
* Pixel data is never read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from core.errors import Code, ExtractionError, FileAccessError
from dicom.headerscan import ScannedHeader, scan_file
from dicom.values import accession_fallback, parse_da, parse_tm, uid_hash
from schemas.records import DicomImageMeta, DicomObjectMeta, DicomStateMeta

__all__ = ["Extracted", "Header", "extract", "read_header", "read_fast", "looks_truncated", "DEFAULT_TRANSFER_SYNTAX",
           "TENANT_PRIVATE_TAG"]

DEFAULT_TRANSFER_SYNTAX = "1.2.840.10008.1.2"
#: The seeds' private tag carrying a tenant id (used by the SCP when configured).
TENANT_PRIVATE_TAG = 0x12111217

# The tags the rules read, resolved once: keyword lookups cost more than the values.
_TAGS: list[int | str] = [
    "SpecificCharacterSet", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "SOPClassUID", "StudyDate", "AccessionNumber", "Modality", "PatientName", "PatientSex",
    "PatientBirthDate", "PatientBirthTime", "PatientAge", "PatientSize", "PatientWeight",
    "StudyTime", "StudyID", "StudyDescription", "SeriesNumber", "SeriesDate", "SeriesTime",
    "SeriesDescription", "BodyPartExamined", "ProtocolName", "NumberOfSeriesRelatedInstances",
    "InstanceNumber", "ContentDate", "ContentTime", "ImageType", "ImageOrientationPatient",
    "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices", "SliceLocation",
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
    "RescaleType", "WindowCenter", "WindowWidth", "NumberOfFrames", TENANT_PRIVATE_TAG,
]
_TAG_OF: dict[str, BaseTag] = {k: BaseTag(tag_for_keyword(k) or 0) for k in _TAGS if isinstance(k, str)}
_SCAN_TAGS = frozenset(int(t) for t in _TAG_OF.values())

#: What the rules read values from: pydicom's Dataset, or the fast scan of a file.
Header = Dataset | ScannedHeader


@dataclass(slots=True)
class Extracted:
    """The three records built from one header."""

    state: DicomStateMeta
    image: DicomImageMeta
    object: DicomObjectMeta


def read_header(path: str | os.PathLike[str]) -> Dataset:
    """Read a DICOM header without pixel data.

    Raises :class:`FileAccessError` (FILE_MISSING / FILE_UNREADABLE) or
    :class:`ExtractionError` (NOT_DICOM).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # No specific_tags: pydicom's per-element tag filter costs more than it saves,
                # and values are only decoded when the rules ask for them.
                return pydicom.dcmread(path, stop_before_pixels=True)
            except InvalidDicomError:
                # Files without the 128-byte preamble (ACR-NEMA style, or a raw dataset) are
                # still DICOM; accept them only if a forced read finds real elements.
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                if not any(elem.tag.group >= 0x0008 and elem.keyword for elem in ds):
                    raise ExtractionError(
                        "not a DICOM file: no preamble/DICM prefix and no recognisable elements",
                        code=Code.NOT_DICOM, field="file_path",
                    ) from None
                return ds
    except FileNotFoundError:
        raise FileAccessError(f"file not found: {path}", code=Code.FILE_MISSING,
                              field="file_path") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise FileAccessError(f"cannot read file: {exc.strerror}", code=Code.FILE_UNREADABLE,
                              field="file_path") from None
    except ExtractionError:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise ExtractionError(f"cannot parse DICOM header: {type(exc).__name__}: {exc}",
                              code=Code.NOT_DICOM, field="file_path") from None


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


def read_fast(path: str | os.PathLike[str]) -> Header:
    """The header by the fast scan when it can read the file exactly, else by pydicom.

    Raises as :func:`read_header` does.
    """
    try:
        scanned = scan_file(path, _SCAN_TAGS)
    except (OSError, ValueError):
        scanned = None  # read_header classifies the failure (missing, unreadable, ...)
    return scanned if scanned is not None else read_header(path)


def _raw(ds: Header, keyword: str) -> Any:
    """The element's value, or None when absent/empty/undecodable."""
    tag = _TAG_OF[keyword]
    try:
        if isinstance(ds, ScannedHeader):
            value = ds.value(tag)
        elif ds.get_item(tag) is None:
            return None
        else:
            value = ds[tag].value
    except Exception:  # lazy decoding of a malformed element
        return None
    if value is None or value == "" or isinstance(value, Sequence):
        return None
    return value


def _text(ds: Header, keyword: str) -> str | None:
    value = _raw(ds, keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v).strip() for v in value)
    elif isinstance(value, bytes):
        text = value.decode("latin-1")
    else:
        text = str(value)
    text = text.strip(" \x00")
    return text or None


def _bounded(ds: Header, keyword: str, limit: int) -> str | None:
    text = _text(ds, keyword)
    if text is not None and len(text.encode("utf-8")) > limit:
        raise ExtractionError(
            f"{keyword} is {len(text.encode('utf-8'))} bytes, longer than its bound of {limit}",
            code=Code.VALUE_TOO_LONG, field=keyword,
        )
    return text


def _required(ds: Header, keyword: str, limit: int = 64) -> str:
    text = _text(ds, keyword)
    if text is None:
        raise ExtractionError(f"{keyword} is required but missing or empty",
                              code=Code.MISSING_REQUIRED_FIELD, field=keyword)
    if len(text.encode("utf-8")) > limit:
        raise ExtractionError(f"{keyword} is longer than {limit} bytes",
                              code=Code.VALUE_TOO_LONG, field=keyword)
    return text


def _first(value: Any) -> Any:
    if isinstance(value, MultiValue | list | tuple):
        return value[0] if len(value) else None
    return value


def _int(ds: Header, keyword: str) -> int | None:
    try:
        value = _first(_raw(ds, keyword))
        return None if value is None else int(float(str(value).strip()))
    except (TypeError, ValueError, OverflowError):
        return None


def _float(ds: Header, keyword: str) -> float | None:
    try:
        value = _first(_raw(ds, keyword))
        return None if value is None else float(str(value).strip())
    except (TypeError, ValueError):
        return None


def _date(ds: Header, keyword: str) -> Any:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        return parse_da(text)
    except ValueError:
        return None


def _time(ds: Header, keyword: str) -> Any:
    text = _text(ds, keyword)
    if text is None:
        return None
    try:
        return parse_tm(text)
    except ValueError as exc:
        raise ExtractionError(f"{keyword}: {exc}", code=Code.INVALID_TIME, field=keyword) from None


def _transfer_syntax(ds: Header) -> str:
    if isinstance(ds, ScannedHeader):
        return ds.transfer_syntax or DEFAULT_TRANSFER_SYNTAX
    meta = getattr(ds, "file_meta", None)
    value = None
    if meta is not None:
        try:
            value = meta.get("TransferSyntaxUID")
        except Exception:
            value = None
    text = str(value).strip(" \x00") if value else ""
    return text or DEFAULT_TRANSFER_SYNTAX


def extract(
    source: str | os.PathLike[str] | Dataset,
    tenant_id: str,
    *,
    trace_id: str = "",
    worker_node_id: str = "",
    file_path: str | None = None,
    file_size: int | None = None,
    now: datetime | None = None,
) -> Extracted | ExtractionError | FileAccessError:
    """Build the three records from a file path or a Dataset; return the error instead of raising.

    ``file_path``/``file_size`` describe the stored file for the transfer log; they
    default to the path given and its size on disk.
    """
    ds: Header
    try:
        if isinstance(source, Dataset):
            ds = source
        else:
            path = Path(source)
            ds = read_fast(path)
            if file_size is None:
                file_size = path.stat().st_size
            if file_path is None:
                file_path = str(path)
        return _build(ds, tenant_id, trace_id, worker_node_id, file_path, file_size,
                      now or datetime.now())
    except (ExtractionError, FileAccessError) as exc:
        if exc.code == Code.MISSING_REQUIRED_FIELD and not isinstance(source, Dataset) and looks_truncated(source):
            return ExtractionError(f"the file is truncated: its header ends mid-element ({exc.message})",
                                   code=Code.FILE_TRUNCATED, field="file_path")
        return exc


def _build(ds: Header, tenant_id: str, trace_id: str, worker_node_id: str, file_path: str | None,
           file_size: int | None, now: datetime) -> Extracted:
    if not tenant_id or len(tenant_id.encode("utf-8")) > 64:
        raise ExtractionError("tenant_id must be 1 to 64 bytes", code=Code.INVALID_EVENT,
                              field="tenant_id")
    patient_id = _required(ds, "PatientID")
    study_uid = _required(ds, "StudyInstanceUID")
    series_uid = _required(ds, "SeriesInstanceUID")
    sop_uid = _required(ds, "SOPInstanceUID")
    study_date_str = _text(ds, "StudyDate")
    if study_date_str is None:
        raise ExtractionError("StudyDate is required but missing or empty",
                              code=Code.MISSING_REQUIRED_FIELD, field="StudyDate")
    try:
        study_date = parse_da(study_date_str)
    except ValueError as exc:
        raise ExtractionError(f"StudyDate must be in YYYYMMDD format: {exc}",
                              code=Code.INVALID_DATE, field="StudyDate") from None
    sop_class_uid = _required(ds, "SOPClassUID")

    accession = _text(ds, "AccessionNumber")
    if accession is None or len(accession.encode("utf-8")) > 16:
        accession = accession_fallback(tenant_id, study_uid)
    study_hash = uid_hash(study_uid)
    series_hash = uid_hash(series_uid)
    transfer_syntax = _transfer_syntax(ds)
    if len(transfer_syntax) > 64:
        raise ExtractionError("TransferSyntaxUID is longer than 64 bytes",
                              code=Code.VALUE_TOO_LONG, field="TransferSyntaxUID")

    state = DicomStateMeta(
        tenant_id=tenant_id,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        study_uid_hash=study_hash,
        series_uid_hash=series_hash,
        study_date_origin=study_date_str,
        study_date=study_date,
        accession_number=accession,
        patient_name=_bounded(ds, "PatientName", 64),
        patient_sex=_bounded(ds, "PatientSex", 1),
        patient_birth_date=_date(ds, "PatientBirthDate"),
        patient_birth_time=_time(ds, "PatientBirthTime"),
        patient_age=_bounded(ds, "PatientAge", 16),
        patient_size=_float(ds, "PatientSize"),
        patient_weight=_float(ds, "PatientWeight"),
        study_time=_time(ds, "StudyTime"),
        study_id=_bounded(ds, "StudyID", 16),
        study_description=_bounded(ds, "StudyDescription", 64),
        modality=_bounded(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_date=_date(ds, "SeriesDate"),
        series_time=_time(ds, "SeriesTime"),
        series_description=_bounded(ds, "SeriesDescription", 256),
        body_part_examined=_bounded(ds, "BodyPartExamined", 64),
        protocol_name=_bounded(ds, "ProtocolName", 64),
        series_related_instances=_int(ds, "NumberOfSeriesRelatedInstances"),
        created_time=now,
        updated_time=now,
    )
    image = DicomImageMeta(
        tenant_id=tenant_id,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        study_uid_hash=study_hash,
        series_uid_hash=series_hash,
        study_date_origin=study_date_str,
        transfer_syntax_uid=transfer_syntax,
        sop_class_uid=sop_class_uid,
        content_date=_date(ds, "ContentDate"),
        content_time=_time(ds, "ContentTime"),
        instance_number=_int(ds, "InstanceNumber"),
        image_type=_bounded(ds, "ImageType", 128),
        image_orientation_patient=_bounded(ds, "ImageOrientationPatient", 128),
        image_position_patient=_bounded(ds, "ImagePositionPatient", 64),
        slice_thickness=_float(ds, "SliceThickness"),
        spacing_between_slices=_float(ds, "SpacingBetweenSlices"),
        slice_location=_float(ds, "SliceLocation"),
        samples_per_pixel=_int(ds, "SamplesPerPixel"),
        photometric_interpretation=_bounded(ds, "PhotometricInterpretation", 32),
        width=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored"),
        high_bit=_int(ds, "HighBit"),
        pixel_representation=_int(ds, "PixelRepresentation"),
        rescale_intercept=_float(ds, "RescaleIntercept"),
        rescale_slope=_float(ds, "RescaleSlope"),
        rescale_type=_bounded(ds, "RescaleType", 64),
        window_center=_bounded(ds, "WindowCenter", 64),
        window_width=_bounded(ds, "WindowWidth", 64),
        image_status="ACTIVE",
        space_size=file_size,
        created_time=now,
        updated_time=now,
    )
    obj = DicomObjectMeta(
        trace_id=trace_id,
        worker_node_id=worker_node_id,
        tenant_id=tenant_id,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        file_size=file_size,
        file_path=file_path,
        transfer_syntax_uid=transfer_syntax,
        number_of_frames=_int(ds, "NumberOfFrames"),
        created_time=now,
        series_uid_hash=series_hash,
        study_uid_hash=study_hash,
        accession_number=accession,
        study_date=study_date,
        transfer_status="SUCCESS",
    )
    return Extracted(state=state, image=image, object=obj)
