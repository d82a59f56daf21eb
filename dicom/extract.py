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

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from core.errors import Code, ExtractionError, FileAccessError
from dicom import reader
from dicom.reader import DEFAULT_TRANSFER_SYNTAX, TENANT_PRIVATE_TAG, Header, looks_truncated, read_header
from dicom.values import accession_number, parse_da, parse_tm, uid_hash
from schemas.records import DicomImageMeta, DicomObjectMeta, DicomStateMeta, bounds

__all__ = ["Extracted", "Header", "extract", "read_header", "read_fast", "looks_truncated", "DEFAULT_TRANSFER_SYNTAX",
           "TENANT_PRIVATE_TAG"]

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

# String bounds come from the records (schemas/records.py), the one place they are declared.
_STATE_BOUNDS = bounds(DicomStateMeta)
_IMAGE_BOUNDS = bounds(DicomImageMeta)


@dataclass(slots=True)
class Extracted:
    """The records built from one header, one per ``schemas.records.OUTPUT_RECORDS`` entry."""

    state: DicomStateMeta
    image: DicomImageMeta
    object: DicomObjectMeta

    def records(self) -> tuple[Any, ...]:
        """Every record, in ``OUTPUT_RECORDS`` order (the order outputs are produced)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def read_fast(path: str | os.PathLike[str]) -> Header:
    """The header by the fast scan when it can read the file exactly, else by pydicom.

    Raises as :func:`read_header` does.
    """
    return reader.read(path, _SCAN_TAGS)


def _raw(ds: Header, keyword: str) -> Any:
    """The element's value, or None when absent/empty/undecodable."""
    return reader.raw_value(ds, _TAG_OF[keyword])


def _text(ds: Header, keyword: str) -> str | None:
    return reader.text(ds, _TAG_OF[keyword])


def _bounded(ds: Header, keyword: str, limit: int) -> str | None:
    text = _text(ds, keyword)
    if text is not None and len(text.encode("utf-8")) > limit:
        raise ExtractionError(
            f"{keyword} is {len(text.encode('utf-8'))} bytes, longer than its bound of {limit}",
            code=Code.VALUE_TOO_LONG, field=keyword,
        )
    return text


def _required(ds: Header, keyword: str, limit: int) -> str:
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


#: How an optional column is read: its converter, or ``None`` for a bounded string
#: (the bound is the record's). Listed in column order, which is also the order in
#: which a header with several bad values reports the first.
_Reader = Callable[[Header, str], Any] | None
_STATE_COLUMNS: tuple[tuple[str, str, _Reader], ...] = (
    ("patient_name", "PatientName", None),
    ("patient_sex", "PatientSex", None),
    ("patient_birth_date", "PatientBirthDate", _date),
    ("patient_birth_time", "PatientBirthTime", _time),
    ("patient_age", "PatientAge", None),
    ("patient_size", "PatientSize", _float),
    ("patient_weight", "PatientWeight", _float),
    ("study_time", "StudyTime", _time),
    ("study_id", "StudyID", None),
    ("study_description", "StudyDescription", None),
    ("modality", "Modality", None),
    ("series_number", "SeriesNumber", _int),
    ("series_date", "SeriesDate", _date),
    ("series_time", "SeriesTime", _time),
    ("series_description", "SeriesDescription", None),
    ("body_part_examined", "BodyPartExamined", None),
    ("protocol_name", "ProtocolName", None),
    ("series_related_instances", "NumberOfSeriesRelatedInstances", _int),
)
_IMAGE_COLUMNS: tuple[tuple[str, str, _Reader], ...] = (
    ("content_date", "ContentDate", _date),
    ("content_time", "ContentTime", _time),
    ("instance_number", "InstanceNumber", _int),
    ("image_type", "ImageType", None),
    ("image_orientation_patient", "ImageOrientationPatient", None),
    ("image_position_patient", "ImagePositionPatient", None),
    ("slice_thickness", "SliceThickness", _float),
    ("spacing_between_slices", "SpacingBetweenSlices", _float),
    ("slice_location", "SliceLocation", _float),
    ("samples_per_pixel", "SamplesPerPixel", _int),
    ("photometric_interpretation", "PhotometricInterpretation", None),
    ("width", "Rows", _int),
    ("columns", "Columns", _int),
    ("bits_allocated", "BitsAllocated", _int),
    ("bits_stored", "BitsStored", _int),
    ("high_bit", "HighBit", _int),
    ("pixel_representation", "PixelRepresentation", _int),
    ("rescale_intercept", "RescaleIntercept", _float),
    ("rescale_slope", "RescaleSlope", _float),
    ("rescale_type", "RescaleType", None),
    ("window_center", "WindowCenter", None),
    ("window_width", "WindowWidth", None),
)


def _columns(ds: Header, columns: tuple[tuple[str, str, _Reader], ...], limits: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, keyword, read in columns:
        out[name] = _bounded(ds, keyword, limits[name]) if read is None else read(ds, keyword)
    return out


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
    tenant_max = _STATE_BOUNDS["tenant_id"]
    if not tenant_id or len(tenant_id.encode("utf-8")) > tenant_max:
        raise ExtractionError(f"tenant_id must be 1 to {tenant_max} bytes", code=Code.INVALID_EVENT,
                              field="tenant_id")
    patient_id = _required(ds, "PatientID", _STATE_BOUNDS["patient_id"])
    study_uid = _required(ds, "StudyInstanceUID", _STATE_BOUNDS["study_uid"])
    series_uid = _required(ds, "SeriesInstanceUID", _STATE_BOUNDS["series_uid"])
    sop_uid = _required(ds, "SOPInstanceUID", _IMAGE_BOUNDS["sop_uid"])
    study_date_str = _text(ds, "StudyDate")
    if study_date_str is None:
        raise ExtractionError("StudyDate is required but missing or empty",
                              code=Code.MISSING_REQUIRED_FIELD, field="StudyDate")
    try:
        study_date = parse_da(study_date_str)
    except ValueError as exc:
        raise ExtractionError(f"StudyDate must be in YYYYMMDD format: {exc}",
                              code=Code.INVALID_DATE, field="StudyDate") from None
    sop_class_uid = _required(ds, "SOPClassUID", _IMAGE_BOUNDS["sop_class_uid"])

    accession = accession_number(_text(ds, "AccessionNumber"), tenant_id, study_uid)
    study_hash = uid_hash(study_uid)
    series_hash = uid_hash(series_uid)
    transfer_syntax = reader.transfer_syntax(ds)
    if len(transfer_syntax) > _IMAGE_BOUNDS["transfer_syntax_uid"]:
        raise ExtractionError(f"TransferSyntaxUID is longer than {_IMAGE_BOUNDS['transfer_syntax_uid']} bytes",
                              code=Code.VALUE_TOO_LONG, field="TransferSyntaxUID")

    # The columns all three records share, spelled once.
    series: dict[str, Any] = {"tenant_id": tenant_id, "patient_id": patient_id, "study_uid": study_uid,
                              "series_uid": series_uid}
    hashes: dict[str, Any] = {"study_uid_hash": study_hash, "series_uid_hash": series_hash}
    stamps: dict[str, Any] = {"created_time": now, "updated_time": now}
    state = DicomStateMeta(
        **series, **hashes, study_date_origin=study_date_str, study_date=study_date, accession_number=accession,
        **_columns(ds, _STATE_COLUMNS, _STATE_BOUNDS), **stamps,
    )
    image = DicomImageMeta(
        **series, sop_uid=sop_uid, **hashes, study_date_origin=study_date_str, transfer_syntax_uid=transfer_syntax,
        sop_class_uid=sop_class_uid, **_columns(ds, _IMAGE_COLUMNS, _IMAGE_BOUNDS), image_status="ACTIVE",
        space_size=file_size, **stamps,
    )
    obj = DicomObjectMeta(
        trace_id=trace_id, worker_node_id=worker_node_id, **series, sop_uid=sop_uid, file_size=file_size,
        file_path=file_path, transfer_syntax_uid=transfer_syntax, number_of_frames=_int(ds, "NumberOfFrames"),
        created_time=now, **hashes, accession_number=accession, study_date=study_date, transfer_status="SUCCESS",
    )
    return Extracted(state=state, image=image, object=obj)
