"""The fast header scan agrees with pydicom, value by value, or declines the file.

Every comparison runs ``extract`` twice on the same file: once as shipped (the scan, with
pydicom for what it declines) and once with the scan switched off (pydicom only, the
reference). Records, or error code, field and message, must be identical.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom import extract as extract_module
from dicom import reader as reader_module
from dicom.extract import _SCAN_TAGS, extract, looks_truncated
from dicom.headerscan import ScannedHeader, scan_bytes, scan_file
from tests.conftest import bundled_dicom_files
from tests.test_extract import _ds

NOW = datetime(2026, 1, 2, 3, 4, 5)


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


@contextmanager
def pydicom_only() -> Iterator[None]:
    # The fast scan lives in the one reader; without it every file is read by pydicom.
    with mock.patch.object(reader_module, "scan_file", return_value=None), \
            mock.patch.object(reader_module, "scan_bytes", return_value=None):
        yield


def outcome(result: Any) -> Any:
    if isinstance(result, extract_module.Extracted):
        return result
    return (type(result).__name__, str(result.code), result.field, result.message)


def both(path: Path) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = outcome(extract(path, "t-scan", trace_id="tr", now=NOW))
        with pydicom_only():
            ref = outcome(extract(path, "t-scan", trace_id="tr", now=NOW))
    return fast, ref


@pytest.mark.parametrize("path", bundled_dicom_files(), ids=lambda p: p.name)
def test_bundled_files_agree(path: Path) -> None:
    fast, ref = both(path)
    assert fast == ref


def test_scan_reads_the_common_layouts_itself() -> None:
    """The shortcut must actually be taken for ordinary files, or it buys nothing."""
    names = {p.name: p for p in bundled_dicom_files()}
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
                 "JPEG2000-embedded-sequence-delimiter.dcm"):
        assert isinstance(scan_file(names[name], _SCAN_TAGS), ScannedHeader), name
    # Big endian and files without a preamble are pydicom's.
    for name in ("MR_small_bigendian.dcm", "ExplVR_LitEndNoMeta.dcm"):
        assert scan_file(names[name], _SCAN_TAGS) is None, name


def test_truncated_and_cut_files_are_declined(tmp_path: Path, ct_small: Path) -> None:
    data = ct_small.read_bytes()
    declined = 0
    for cut in range(100, 6000, 37):
        target = tmp_path / f"cut{cut}.dcm"
        target.write_bytes(data[:cut])
        if looks_truncated(target):  # cut mid-element, not between two elements
            assert scan_file(target, _SCAN_TAGS) is None, cut
            declined += 1
        fast, ref = both(target)
        assert fast == ref, cut
    assert declined > 50


def test_undefined_length_sequences_are_skipped() -> None:
    ds = _base(ExplicitVRLittleEndian)
    item = Dataset()
    item.PatientID = "INNER"  # must not leak into the top level
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedImageSequence = [item, item]
    data = _encode(ds, ExplicitVRLittleEndian)
    scanned = scan_bytes(data, _SCAN_TAGS)
    assert scanned is not None
    assert scanned.value(_tag("PatientID")) == "PID-1"


def test_missing_file_errors_are_unchanged(tmp_path: Path) -> None:
    fast, ref = both(tmp_path / "absent.dcm")
    assert fast == ref
    assert fast[1] == "FILE_MISSING"


# ------------------------------------------------------------------------------------------ generated files


def _base(ts: str) -> Dataset:
    ds = _ds(SpecificCharacterSet=None, PatientID="PID-1", StudyInstanceUID="1.2.3.4", SeriesInstanceUID="1.2.3.4.6")
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.file_meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    return ds


def _encode(ds: Dataset, ts: str) -> bytes:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in _LONG:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


_KEYWORDS = [k for k in extract_module._TAGS if isinstance(k, str) and k != "SpecificCharacterSet"]
_CHARSETS = [None, "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87", "ISO_IR 144", "GB18030", "ISO_IR 6",
             "\\ISO 2022 IR 100", "NOT A CHARSET"]
_ALPHABET = "0123456789.+-eE ^=\\\x00ABCZabcz \t/éß中\x1b$B()"

_values = st.one_of(
    st.text(alphabet=_ALPHABET, max_size=24).map(lambda s: s.encode("utf-8")),
    st.text(alphabet=_ALPHABET, max_size=24).map(lambda s: s.encode("latin-1", "replace")),
    st.from_regex(r"\A *[+-]?[0-9]{0,4}(\.[0-9]{0,3})?([eE][+-]?[0-9])? *(\\ *[+-]?[0-9]{1,3} *)?\Z")
      .map(str.encode),
    st.binary(max_size=12),
)


@st.composite
def _files(draw: st.DrawFn) -> bytes:
    implicit = draw(st.booleans())
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = _base(ts)
    charset = draw(st.sampled_from(_CHARSETS))
    if charset is not None:
        ds.SpecificCharacterSet = charset
    for keyword in draw(st.lists(st.sampled_from(["PatientID", "StudyInstanceUID", "StudyDate"]), max_size=2,
                                 unique=True)):
        delattr(ds, keyword)
    data = _encode(ds, ts)
    extra = b""
    for keyword in draw(st.lists(st.sampled_from(_KEYWORDS), max_size=8, unique=True)):
        tag = tag_for_keyword(keyword)
        if tag is None or keyword in ds:
            continue
        vr = dictionary_VR(tag)
        if not implicit and draw(st.integers(0, 5)) == 0:
            vr = draw(st.sampled_from(["LO", "UN", "CS", "DS", "US", "SH", "UT"]))
        value = draw(_values)
        if vr == "US" and draw(st.booleans()):
            count = draw(st.integers(1, 3))
            value = struct.pack(f"<{count}H", *draw(st.lists(st.integers(0, 65535), min_size=count,
                                                              max_size=count)))
        extra += _element(tag, vr, value, implicit)
    return data + extra


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=_files())
def test_generated_files_agree(blob: bytes, tmp_path: Path) -> None:
    path = tmp_path / "gen.dcm"
    path.write_bytes(blob)
    fast, ref = both(path)
    assert fast == ref


def test_generated_files_take_the_fast_path(tmp_path: Path) -> None:
    ds = _base(ImplicitVRLittleEndian)
    ds.PatientName = "Doe^Jane"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.Rows = 512
    data = _encode(ds, ImplicitVRLittleEndian)
    scanned = scan_bytes(data, _SCAN_TAGS)
    assert scanned is not None and scanned.implicit
    assert scanned.value(_tag("PatientName")) == "Doe^Jane"
    assert scanned.value(_tag("Rows")) == 512
    assert scanned.value(_tag("ImageOrientationPatient")) == ["1", "0", "0", "0", "1", "0"]
    parsed = pydicom.dcmread(DicomBytesIO(data))
    assert str(parsed.PatientName) == "Doe^Jane"


def test_a_header_longer_than_the_first_read_is_read_further(tmp_path: Path) -> None:
    ds = _base(ExplicitVRLittleEndian)
    ds.add_new(0x00291010, "OB", b"\x01" * 300_000)  # a large private blob before the wanted tags end
    ds.PatientName = "Long^Header"
    ds.PixelData = b"\x00" * 2_000_000
    ds["PixelData"].VR = "OB"
    path = tmp_path / "long.dcm"
    path.write_bytes(_encode(ds, ExplicitVRLittleEndian))
    scanned = scan_file(path, _SCAN_TAGS)
    assert scanned is not None
    assert scanned.value(_tag("PatientName")) == "Long^Header"
    fast, ref = both(path)
    assert fast == ref


# ------------------------------------------------------------------------------------------ hostile structure


def test_deep_nesting_is_malformed_dicom_on_both_paths(tmp_path: Path, ct_small: Path) -> None:
    """600 nested undefined-length sequences (22 KB) once raised RecursionError out of the reader."""
    from tests.support.bad_files import deeply_nested

    path = deeply_nested(ct_small, tmp_path / "deep.dcm", depth=600)
    fast, ref = both(path)
    assert fast == ref
    assert fast[1] == "MALFORMED_DICOM", fast
    assert "nested deeper than" in fast[3]


def test_nesting_within_the_bound_is_read(tmp_path: Path, ct_small: Path) -> None:
    from tests.support.bad_files import deeply_nested

    path = deeply_nested(ct_small, tmp_path / "nested.dcm", depth=20)
    fast, ref = both(path)
    assert fast == ref
    assert isinstance(fast, extract_module.Extracted)


def test_too_many_elements_is_malformed_dicom_on_both_paths(tmp_path: Path) -> None:
    from dicom.headerscan import MAX_ELEMENTS

    ds = _base(ExplicitVRLittleEndian)
    blob = bytearray(_encode(ds, ExplicitVRLittleEndian))
    count = 0
    for group in range(0x0029, 0x0041, 2):  # private groups after every element of the base
        for elem in range(0x1000, 0x10000):
            blob += struct.pack("<HH2sH", group, elem, b"LO", 0)
            count += 1
            if count > MAX_ELEMENTS:
                break
        if count > MAX_ELEMENTS:
            break
    path = tmp_path / "many.dcm"
    path.write_bytes(bytes(blob))
    fast, ref = both(path)
    assert fast == ref
    assert fast[1] == "MALFORMED_DICOM", fast
    assert f"more than {MAX_ELEMENTS}" in fast[3]


def test_a_header_over_the_scan_limit_does_not_load_large_values(tmp_path: Path) -> None:
    """Past 16 MB the scan gives up and pydicom reads the header: it must skip large values
    (defer_size), not hold them in memory. The blob is a hole in a sparse file."""
    import tracemalloc

    blob_len = 200 * 1024 * 1024
    ds = _base(ExplicitVRLittleEndian)
    head = _encode(ds, ExplicitVRLittleEndian)
    # The base ends with group 0028 at most; a private OB after it, then more wanted elements.
    tail = _element(0x00291010, "OB", b"", False)[:8] + struct.pack("<I", blob_len)
    after = _element(0x00400254, "LO", b"AFTER BLOB", False)  # PerformedProcedureStepDescription
    path = tmp_path / "huge-header.dcm"
    with open(path, "wb") as fh:
        fh.write(head + tail)
        fh.seek(blob_len, 1)
        fh.write(after)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = extract(path, "t-scan", trace_id="tr", now=NOW)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, extract_module.Extracted), result
    assert peak < 100 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB: the large value was read"
