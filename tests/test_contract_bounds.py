"""String bounds are declared once, in schemas/records.py; every other place must agree.

The SQL DDL and the published JSON Schema are files other systems read, so they keep
their own numbers; these tests hold them to the records' ``max_len`` metadata.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from schemas.contract import schema
from schemas.ddl import parse_ddl
from schemas.records import DicomImageMeta, DicomObjectMeta, DicomStateMeta, StorageEvent, bounds

SQL = Path(__file__).resolve().parents[1] / "schemas" / "sql"
RECORDS = {"dicom_state_meta": DicomStateMeta, "dicom_image_meta": DicomImageMeta,
           "dicom_object_meta": DicomObjectMeta}


def _string_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if "str" in str(f.type)}


def _check(table: str, varchar: dict[str, int], cls: type) -> None:
    declared = bounds(cls)
    assert {n: varchar.get(n) for n in declared} == declared, f"{table}: VARCHAR lengths differ from the record"
    # A string column of the record bounded in SQL must be bounded in the record too.
    unbounded = sorted(n for n in varchar if n in _string_fields(cls) and n not in declared)
    assert unbounded == [], f"{table}: bounded in SQL, not in the record"


def _postgres_varchars() -> dict[str, dict[str, int]]:
    # schemas.ddl reads Doris' dialect only; PostgreSQL's column lines are simple enough.
    text = (SQL / "postgres.sql").read_text(encoding="utf-8")
    out: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"CREATE TABLE IF NOT EXISTS (\w+)\s*\((.*?)\n\);", text, re.S):
        cols = re.findall(r"^\s*(\w+)\s+varchar\((\d+)\)", m.group(2), re.M | re.I)
        out[m.group(1)] = {name: int(n) for name, n in cols}
    return out


@pytest.mark.parametrize("table", sorted(RECORDS))
def test_doris_ddl_matches_record_bounds(table: str) -> None:
    spec = parse_ddl((SQL / "doris.sql").read_text(encoding="utf-8"))[table]
    _check(table, {c.name: c.length for c in spec.columns if c.type == "VARCHAR" and c.length}, RECORDS[table])


def test_postgres_ddl_matches_record_bounds() -> None:
    tables = _postgres_varchars()
    assert "dicom_state_meta" in tables
    _check("dicom_state_meta", tables["dicom_state_meta"], DicomStateMeta)


def test_json_schema_matches_record_bounds() -> None:
    """Every event field is a dicom_object_meta column, bounded as that record declares."""
    declared = bounds(DicomObjectMeta)
    props = schema()["properties"]
    assert set(props) == {f.name for f in dataclasses.fields(StorageEvent)}
    for name, spec in props.items():
        if name == "tenant_id":
            # Bounded by its pattern: one leading character and at most (bound - 1) more.
            assert spec["pattern"].endswith(f"{{0,{declared[name] - 1}}}$")
            continue
        if "string" in spec["type"] and "pattern" not in spec:
            assert spec.get("maxLength") == declared[name], name
