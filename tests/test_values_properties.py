"""Property tests: DA/TM parsing and the storage-event validator."""

from __future__ import annotations

from datetime import date, time
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import Code, ContractError
from dicom.values import parse_da, parse_tm
from schemas.contract import parse_event, schema, validate_event


@given(st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)))
def test_da_roundtrip(d: date) -> None:
    assert parse_da(d.strftime("%Y%m%d").rjust(8, "0")) == d


@given(st.text(max_size=12))
def test_da_never_crashes(s: str) -> None:
    try:
        parse_da(s)
    except ValueError as exc:
        assert repr(s) in str(exc) or "calendar" in str(exc)


@given(st.times(), st.integers(min_value=0, max_value=3), st.integers(min_value=1, max_value=6))
def test_tm_forms(t: time, form: int, digits: int) -> None:
    hh, mm, ss = f"{t.hour:02d}", f"{t.minute:02d}", f"{t.second:02d}"
    frac = f"{t.microsecond:06d}"[:digits]
    text, want = {
        0: (hh, time(t.hour)),
        1: (hh + mm, time(t.hour, t.minute)),
        2: (hh + mm + ss, time(t.hour, t.minute, t.second)),
        3: (f"{hh}{mm}{ss}.{frac}", time(t.hour, t.minute, t.second, int(frac.ljust(6, "0")))),
    }[form]
    assert parse_tm(text) == want


@given(st.text(max_size=16))
def test_tm_never_crashes(s: str) -> None:
    try:
        parse_tm(s)
    except ValueError:
        pass


@pytest.mark.parametrize("bad", ["24", "2360", "235961", "1", "12345", "12.5", "ab", "120000.1234567"])
def test_tm_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_tm(bad)


# ---- storage-event contract ----------------------------------------------------------------

_tenant = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=36).filter(
    lambda t: len(t.encode("utf-8")) <= 36)
_valid = st.fixed_dictionaries(
    {"tenant_id": _tenant, "file_path": _text, "trace_id": _text},
    optional={"file_size": st.integers(0, 2**40), "source_ae": st.text(max_size=16) | st.none(),
              "study_date": st.dates().map(date.isoformat), "number_of_frames": st.integers(0, 5000)},
)


@given(_valid)
def test_valid_events_pass(event: dict[str, Any]) -> None:
    parsed = parse_event(orjson.dumps(event))
    assert parsed.tenant_id == event["tenant_id"] and parsed.trace_id == event["trace_id"]


@given(_valid, st.sampled_from(["tenant_id", "file_path", "trace_id"]))
def test_missing_required_names_the_field(event: dict[str, Any], field: str) -> None:
    del event[field]
    with pytest.raises(ContractError) as info:
        validate_event(event)
    assert info.value.field == field and field in info.value.message


@given(_valid, st.sampled_from(sorted(schema()["properties"])), st.one_of(st.booleans(), st.lists(st.integers())))
def test_wrong_type_names_the_field(event: dict[str, Any], field: str, value: Any) -> None:
    event[field] = value
    with pytest.raises(ContractError) as info:
        validate_event(event)
    assert info.value.field == field and info.value.code == Code.INVALID_EVENT


@given(_valid, st.text(min_size=1, max_size=10).filter(lambda k: k not in schema()["properties"]))
def test_unknown_field_is_named(event: dict[str, Any], key: str) -> None:
    event[key] = 1
    with pytest.raises(ContractError) as info:
        validate_event(event)
    assert info.value.field == key


@given(st.binary(max_size=64).filter(lambda b: not b.strip().startswith((b"{", b"[", b'"'))))
def test_non_json_is_invalid_json(raw: bytes) -> None:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        with pytest.raises(ContractError) as info:
            parse_event(raw)
        assert info.value.code == Code.INVALID_JSON


def test_bounds_are_bytes_not_characters() -> None:
    event = {"tenant_id": "t", "file_path": "a", "trace_id": "x", "source_ae": "\u00e9" * 40}
    with pytest.raises(ContractError) as info:
        validate_event(event)
    assert info.value.field == "source_ae" and "bytes" in info.value.message
