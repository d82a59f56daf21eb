"""The storage-event contract: validation of what feeders publish to ``storage_queue``.

The JSON Schema file is the published contract; it is compiled once (fastjsonschema)
because every event passes through it.
"""

from __future__ import annotations

import functools
from datetime import datetime
from importlib import resources
from typing import Any

import fastjsonschema
import orjson

from core.errors import Code, ContractError
from schemas.records import DicomObjectMeta, StorageEvent, bounds

__all__ = ["SCHEMA_VERSION", "schema", "validate_event", "parse_event"]

SCHEMA_VERSION = 1
_SCHEMA_FILE = "storage_event.v1.schema.json"
#: An event's fields are ``dicom_object_meta`` columns: their byte bounds are that record's
#: (schemas/records.py declares them once; tests/test_contract_bounds.py holds the JSON
#: Schema's maxLength and the SQL DDL to the same numbers).
_BYTE_BOUNDS: dict[str, int] = bounds(DicomObjectMeta)


@functools.cache
def schema() -> dict[str, Any]:
    text = resources.files("schemas").joinpath(_SCHEMA_FILE).read_bytes()
    return orjson.loads(text)


@functools.cache
def _validator() -> Any:
    return fastjsonschema.compile(schema())


def _field_of(exc: fastjsonschema.JsonSchemaValueException) -> str | None:
    path = [p for p in (exc.path or []) if p != "data"]
    if exc.rule == "required" and isinstance(exc.rule_definition, list):
        missing = [k for k in exc.rule_definition if not isinstance(exc.value, dict) or k not in exc.value]
        return missing[0] if missing else None
    if exc.rule == "additionalProperties" and isinstance(exc.value, dict):
        extra = sorted(set(exc.value) - set(schema()["properties"]))
        return extra[0] if extra else None
    return str(path[0]) if path else None


def validate_event(data: Any) -> StorageEvent:
    """Validate a decoded event; raise :class:`ContractError` naming the field and the reason."""
    try:
        _validator()(data)
    except fastjsonschema.JsonSchemaValueException as exc:
        field = _field_of(exc)
        reason = exc.message.replace("data.", "").replace("data ", "event ")
        if exc.rule == "required" and field:
            reason = f"{field} is required"
        elif exc.rule == "additionalProperties" and field:
            reason = f"{field} is not a field of storage event v{SCHEMA_VERSION}"
        raise ContractError(reason, code=Code.INVALID_EVENT, field=field) from None
    for name in schema()["properties"]:  # in the contract's field order, as before
        value, limit = data.get(name), _BYTE_BOUNDS.get(name)
        if isinstance(value, str) and limit is not None and len(value.encode("utf-8")) > limit:
            # JSON Schema counts characters; PostgreSQL/Doris VARCHAR bounds here count bytes.
            raise ContractError(f"{name} is {len(value.encode('utf-8'))} bytes in UTF-8, over its bound of {limit}",
                                code=Code.INVALID_EVENT, field=name)
    created = data.get("created_time")
    if created:
        try:
            datetime.fromisoformat(created)
        except ValueError:
            raise ContractError(f"created_time is not a real date and time: {created!r}",
                                code=Code.INVALID_EVENT, field="created_time") from None
    return StorageEvent.from_dict(data)


def parse_event(raw: bytes) -> StorageEvent:
    """Decode JSON bytes and validate; INVALID_JSON when the bytes are not a JSON document."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"message is not valid JSON: {exc}", code=Code.INVALID_JSON,
                            field=None) from None
    return validate_event(data)
