"""Wire format: records serialise to Doris/PostgreSQL-ready rows and back."""

from __future__ import annotations

from datetime import date, datetime, time
from pathlib import Path

import orjson

from dicom.extract import Extracted, extract
from schemas import codec
from schemas.records import DicomImageMeta, DicomObjectMeta, DicomStateMeta


def test_formats(ct_small: Path) -> None:
    result = extract(ct_small, "t1", now=datetime(2024, 1, 2, 3, 4, 5))
    assert isinstance(result, Extracted)
    row = orjson.loads(codec.dumps(result.state))
    assert row["created_time"] == "2024-01-02 03:04:05.000000"
    assert row["study_date"] == "2004-01-19"
    assert row["study_time"] == "07:27:30"
    result.state.study_time = time(7, 27, 30, 120000)
    assert orjson.loads(codec.dumps(result.state))["study_time"] == "07:27:30.120000"


def test_roundtrip(ct_small: Path) -> None:
    result = extract(ct_small, "t1")
    assert isinstance(result, Extracted)
    for record, cls in ((result.state, DicomStateMeta), (result.image, DicomImageMeta),
                        (result.object, DicomObjectMeta)):
        back = codec.from_row(cls, orjson.loads(codec.dumps(record)))
        assert back == record


def test_rows_match_routine_load_columns(ct_small: Path) -> None:
    """The seeds' Routine Load column lists name exactly the fields of each message."""
    routine = (Path(__file__).parents[1] / "schemas" / "sql" / "doris_routine_load.sql").read_text()
    result = extract(ct_small, "t1")
    assert isinstance(result, Extracted)
    for job, record in (("medical_object_load", result.object), ("medical_state_load", result.state),
                        ("medical_image_load", result.image)):
        body = routine.split(f"CREATE ROUTINE LOAD {job}")[1].split("COLUMNS (")[1].split(")\nPROPERTIES")[0]
        columns = {c.split("=")[0].strip().strip("`") for c in body.replace("\n", " ").split(",")}
        assert columns == set(codec.to_row(record)), job


def test_from_row_ignores_unknown_keys() -> None:
    row = {"tenant_id": "t", "patient_id": "p", "study_uid": "1", "series_uid": "2", "study_uid_hash": "0",
           "series_uid_hash": "0", "study_date_origin": "20240101", "study_date": "2024-01-01",
           "accession_number": "A", "future_field": 1}
    rec = codec.from_row(DicomStateMeta, row)
    assert rec.study_date == date(2024, 1, 1)
