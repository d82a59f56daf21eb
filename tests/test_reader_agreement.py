"""The one header reader: the SCP, backfill and ingest read the same text from the same file.

Text that pydicom leaves as bytes (a private tag read with implicit VR, VR UN) is decoded
with the file's Specific Character Set, exactly as pydicom decodes the same element
written with explicit VR LO; neither a fixed UTF-8 nor a fixed Latin-1 does that.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from core.errors import ContractError
from dicom import reader
from dicom.extract import Extracted, extract
from dicom.reader import TENANT_PRIVATE_TAG, read_instance_header
from feeders.backfill import backfill, event_for
from feeders.events import build_event, validated

PATIENT = "MÜLLER-Zoë"
ACCESSION = "ÄB-1"
HOSPITAL = "hôpital-Ø"
CHARSETS = {"ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


def _write(path: Path, charset: str, syntax: str) -> Path:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.PatientID = PATIENT
    ds.PatientName = "Zoë^Ærø"
    ds.AccessionNumber = ACCESSION
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.StudyDate = "20240131"
    ds.add_new(TENANT_PRIVATE_TAG, "LO", HOSPITAL)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(params=[(c, s) for c in CHARSETS for s in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)],
                ids=lambda p: f"{p[0]}-{'implicit' if p[1] == ImplicitVRLittleEndian else 'explicit'}")
def stored(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    charset, syntax = request.param
    return tmp_path, _write(tmp_path / "t1" / "a.dcm", charset, syntax)


def test_private_tag_bytes_decode_with_the_file_charset(stored: tuple[Path, Path]) -> None:
    _, path = stored
    raw = pydicom.dcmread(path)[TENANT_PRIVATE_TAG]
    if raw.VR == "UN":  # implicit VR: pydicom leaves the bytes alone
        charset = str(pydicom.dcmread(path).SpecificCharacterSet)
        assert raw.value.rstrip(b" ") == HOSPITAL.encode(CHARSETS[charset])  # even length: padded
    # The fast scan, pydicom, a file and its bytes: one answer.
    assert read_instance_header(path).private_tenant == HOSPITAL
    assert read_instance_header(path.read_bytes()).private_tenant == HOSPITAL
    with mock.patch.object(reader, "scan_file", return_value=None), \
            mock.patch.object(reader, "scan_bytes", return_value=None):
        assert read_instance_header(path).private_tenant == HOSPITAL
        assert read_instance_header(path.read_bytes()).private_tenant == HOSPITAL


def test_scp_backfill_and_extract_agree_on_non_ascii_values(stored: tuple[Path, Path]) -> None:
    root, path = stored
    extracted = extract(path, "t1")
    assert isinstance(extracted, Extracted), extracted
    assert extracted.state.patient_id == PATIENT
    assert extracted.state.accession_number == ACCESSION
    assert extracted.state.patient_name == "Zoë^Ærø"

    # The SCP reads the bytes it received, then builds its event as every feeder does.
    scp_header = read_instance_header(path.read_bytes())
    scp_event = validated(build_event(tenant="t1", header=scp_header, file_path="t1/a.dcm", file_size=1,
                                      trace_id="x", worker_node_id="w", now=datetime.now()), "x")
    backfill_event, key, readable = event_for(path, root, "t1", "w")
    assert readable and key is not None
    for event in (scp_event, backfill_event):
        assert event["patient_id"] == extracted.object.patient_id == PATIENT
        assert event["accession_number"] == extracted.object.accession_number
        assert event["study_uid"] == extracted.object.study_uid
        assert event["study_uid_hash"] == extracted.object.study_uid_hash
        assert event["study_date"] == extracted.object.study_date.isoformat()  # type: ignore[union-attr]


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], str | None]] = []

    async def publish(self, event: dict[str, Any], key: str | None) -> None:
        self.sent.append((event, key))


def test_backfill_reports_a_contract_failure_and_does_not_publish(tmp_path: Path) -> None:
    path = _write(tmp_path / "t1" / "a.dcm", "ISO_IR 192", ExplicitVRLittleEndian)
    with pytest.raises(ContractError) as info:
        event_for(path, tmp_path, "not a tenant!", "w")
    assert info.value.field == "tenant_id"

    publisher = _Recorder()
    summary = asyncio.run(backfill(tmp_path, storage_root=tmp_path, tenant="not a tenant!", worker="w",
                                   publisher=publisher, progress=False))  # type: ignore[arg-type]
    assert (summary.files, summary.published, summary.failed) == (1, 0, 1)
    assert publisher.sent == []
    assert "tenant_id" in summary.errors[0] and str(path) in summary.errors[0]


def test_backfill_publishes_validated_events(tmp_path: Path) -> None:
    _write(tmp_path / "t1" / "a.dcm", "ISO_IR 100", ImplicitVRLittleEndian)
    (tmp_path / "t1" / "notes.txt").write_text("not dicom")
    publisher = _Recorder()
    summary = asyncio.run(backfill(tmp_path, storage_root=tmp_path, tenant="t1", worker="w",
                                   publisher=publisher, progress=False))  # type: ignore[arg-type]
    assert (summary.published, summary.unreadable_headers, summary.failed) == (2, 1, 0)
    by_path = {event["file_path"]: (event, key) for event, key in publisher.sent}
    event, key = by_path["t1/a.dcm"]
    assert event["patient_id"] == PATIENT and event["source_ae"] == "BACKFILL" and key
    junk, junk_key = by_path["t1/notes.txt"]
    assert junk["study_uid"] is None and junk_key is None
