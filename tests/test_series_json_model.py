"""The document model (dicom/json_model.py) and its writer (sinks/json_documents.py), on real files.

The fast path must give exactly what pydicom's own ``Dataset.to_json_dict`` gives, apart from
the departures the module documents, each toward PS3.18 F.2 (and dcm2json): an empty value among
several is null, each value of a multi-valued CS/DA/DT/TM/AS/UI loses its padding, Pixel Data is
always a BulkDataURI, OW/OF/OL/OD/OV InlineBinary is little endian.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import Code, ExtractionError
from dicom.json_model import JsonOptions, instance_json
from feeders.storage import InstanceStore
from feeders.storage import safe_component as store_component
from sinks.json_documents import (
    DocumentWriter,
    document_path,
    iter_document,
    safe_component,
    series_directory,
    write_series_document,
)
from tests.conftest import bundled_dicom_files
from tests.harness import clone_series

OPTIONS = JsonOptions()
_PADDED = {"CS", "DA", "DT", "TM", "AS", "UI"}
_PIXELS = {"7FE00010", "7FE00008", "7FE00009"}


def _as_standard(obj: dict[str, Any], big_endian: bool) -> dict[str, Any]:
    """pydicom's object with the documented departures applied (written apart from the module)."""
    out: dict[str, Any] = {}
    for key, entry in obj.items():
        entry = dict(entry)
        vr = entry["vr"]
        if vr == "SQ":
            entry["Value"] = [_as_standard(item, big_endian) for item in entry.get("Value", [])]
        elif key in _PIXELS and ("InlineBinary" in entry or "BulkDataURI" in entry):
            entry = {"vr": vr, "BulkDataURI": "*"}
        values = entry.get("Value")
        if vr != "SQ" and values is not None and len(values) > 1:
            if vr in _PADDED:
                values = [(v.strip(" ") if vr == "CS" else v.rstrip(" \x00")) if isinstance(v, str) else v
                          for v in values]
            entry["Value"] = [None if v in ("", {"Alphabetic": ""}) else v for v in values]
        if big_endian and "InlineBinary" in entry and vr in ("OW", "OF", "OL", "OD", "OV"):
            entry["InlineBinary"] = "*"  # byte order: checked against dcm2json (test_json_dcm2json.py)
        if "BulkDataURI" in entry:
            entry["BulkDataURI"] = "*"
        out[key] = entry
    return out


def _ours(obj: dict[str, Any], big_endian: bool) -> dict[str, Any]:
    return _as_standard(obj, big_endian)


@pytest.fixture(autouse=True)
def _quiet_pydicom() -> Any:
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_fast_path_equals_pydicom_on_every_bundled_file() -> None:
    compared = 0
    for f in bundled_dicom_files():
        try:
            full = pydicom.dcmread(f)
        except Exception:  # noqa: BLE001 - not readable as Part 10 even by pydicom (no preamble): elsewhere
            continue
        try:
            reference = full.to_json_dict(OPTIONS.bulk_threshold, lambda _e: "*")
        except ValueError:
            assert f.name == "badVR.dcm"  # pydicom cannot encode '1A' as IS: see the next test
            continue
        big = full.original_encoding[1] is False
        try:
            ours = json.loads(instance_json(f, OPTIONS).data)
        except ExtractionError as exc:  # no Study/Series/SOP UID: no series to belong to (nor a row)
            assert exc.code == Code.MISSING_REQUIRED_FIELD, (f.name, exc)
            continue
        assert _ours(ours, big) == _as_standard(reference, big), f.name
        compared += 1
    assert compared >= 60


def test_a_value_pydicom_cannot_encode_is_left_out_not_the_instance() -> None:
    f = next(p for p in bundled_dicom_files() if p.name == "badVR.dcm")
    obj = json.loads(instance_json(f, OPTIONS).data)
    assert "00280008" not in obj and "00080018" in obj


def test_nested_bulk_data_names_its_path(tmp_path: Path, ct_small: Path) -> None:
    ds = pydicom.dcmread(ct_small)
    item = pydicom.Dataset()
    item.add_new(0x60003000, "OW", b"\x01\x02" * 1000)  # Overlay Data, 2,000 bytes: above the bound
    ds.add_new(0x00400275, "SQ", pydicom.Sequence([pydicom.Dataset(), item]))
    path = tmp_path / "nested.dcm"
    ds.save_as(path)
    obj = json.loads(instance_json(path, JsonOptions(bulk_uri_base="http://x")).data)
    nested = obj["00400275"]["Value"][1]["60003000"]
    assert nested["vr"] == "OW"
    assert nested["BulkDataURI"].endswith(f"/instances/{ds.SOPInstanceUID}/bulkdata/00400275/1/60003000")
    assert obj["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")


def test_document_is_ordered_by_instance_number_then_sop_uid(tmp_path: Path, ct_small: Path) -> None:
    files = clone_series(ct_small, tmp_path / "in", series=1, instances=6)
    # Two instances share number 2 and one has none: SOP UID breaks the tie, no number sorts last.
    for f, number in zip(files, [5, 2, 2, None, 1, 3], strict=True):
        ds = pydicom.dcmread(f)
        if number is None:
            del ds.InstanceNumber
        else:
            ds.InstanceNumber = number
        ds.save_as(f)
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    (tmp_path / "in" / "README.txt").write_text("not DICOM")  # a stray file is skipped, reported
    doc = write_series_document([*reversed(files), tmp_path / "in" / "README.txt"], tmp_path / "out" / "s.json",
                                OPTIONS, series_uid=series)
    objects = json.loads(doc.path.read_bytes())
    keys = [(o.get("00200013", {}).get("Value", [None])[0], o["00080018"]["Value"][0]) for o in objects]
    numbered = sorted(k for k in keys if k[0] is not None)
    assert keys == [*numbered, *[k for k in keys if k[0] is None]]
    assert [k[0] for k in keys] == [1, 2, 2, 3, 5, None]
    assert doc.instances == 6 and [s[0] for s in doc.skipped] == [str(tmp_path / "in" / "README.txt")]
    assert doc.bytes_written == doc.path.stat().st_size
    assert sorted(p.name for p in doc.path.parent.iterdir()) == ["s.json"]  # no temp or spool left


def test_gzip_document_streams_back_the_same_bytes(tmp_path: Path, ct_small: Path) -> None:
    files = clone_series(ct_small, tmp_path / "in", series=1, instances=5)
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    plain = write_series_document(files, tmp_path / "a.json", OPTIONS, series_uid=series)
    packed = write_series_document(files, tmp_path / "b.json.gz", OPTIONS, series_uid=series, compress=True)
    assert gzip.decompress(packed.path.read_bytes()) == plain.path.read_bytes()
    assert b"".join(iter_document(packed.path, compressed=True, chunk=100)) == plain.path.read_bytes()
    assert b"".join(iter_document(packed.path, compressed=True, decompress=False)) == packed.path.read_bytes()
    assert packed.bytes_written < plain.bytes_written


def test_a_failed_write_leaves_the_old_document(tmp_path: Path, ct_small: Path) -> None:
    files = clone_series(ct_small, tmp_path / "in", series=1, instances=2)
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    target = tmp_path / "out" / "s.json"
    write_series_document(files, target, OPTIONS, series_uid=series)
    before = target.read_bytes()
    writer = DocumentWriter(target)
    writer.add(instance_json(files[0], OPTIONS))
    os.close(writer._spool.fileno())  # noqa: SLF001 - the spool's disk fails under the assembly
    with pytest.raises(OSError):
        writer.commit()
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["s.json"]  # the temporary file is gone


def _peak(files: list[Path], target: Path, series: str) -> tuple[int, int]:
    tracemalloc.start()
    try:
        doc = write_series_document(files, target, OPTIONS, series_uid=series)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert doc.instances == len(files)
    return peak, doc.bytes_written


def test_a_series_is_never_held_in_memory(tmp_path: Path) -> None:
    """Peak Python memory does not grow with the series: 10x the instances, about the same peak."""
    from bench.clones import build_fast

    data = build_fast(tmp_path / "in", instances=150, series=1)
    series = str(pydicom.dcmread(data.files[0]).SeriesInstanceUID)
    small_peak, small_size = _peak(data.files[:15], tmp_path / "small.json", series)
    peak, size = _peak(data.files, tmp_path / "s.json", series)
    assert size > 9 * small_size
    assert peak < 1.5 * small_peak + 64 * 1024, f"peak {peak} bytes at 150 instances, {small_peak} at 15"
    assert peak < size / 3


@pytest.mark.parametrize("value", ["1.2.840.10008", "t1", "../../etc", ".hidden", "a/b", "", "..", " x ",
                                   "é" * 10, "x" * 200])
def test_path_components_follow_the_instance_store(value: str, tmp_path: Path) -> None:
    assert safe_component(value) == store_component(value)
    store = InstanceStore(tmp_path)
    rel = store.relpath("t1", "20240101", value or "_", "1.2.3", "4.5.6")
    assert series_directory(tmp_path, "t1", "20240101", value or "_", "1.2.3") == tmp_path / rel.parent
    path = document_path(tmp_path, "t1", "20240101", value, value)
    assert path.parent.parent.parent.parent == tmp_path / "t1" and path.resolve().is_relative_to(tmp_path)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789+-.eE \\", min_size=1, max_size=24), st.sampled_from(["DS", "IS"]))
def test_number_strings_match_pydicom_or_go_to_pydicom(text: str, vr: str) -> None:
    """The fast path converts a DS/IS value only when pydicom converts it the same; else it leaves it."""
    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.tag import Tag

    from dicom.json_model import _TABLE

    raw = text.encode()
    if len(raw) % 2:
        raw += b" "
    fast = _TABLE[vr](vr, raw)
    if fast is None:
        return
    element = RawDataElement(Tag(0x00181050 if vr == "DS" else 0x00200013), vr, len(raw), raw, 0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = convert_raw_data_element(element).to_json_dict(None, 1024)
    assert fast == _as_standard({"x": reference}, False)["x"]
