"""JSON wire format of the records (orjson).

Dates are ``YYYY-MM-DD``, datetimes ``YYYY-MM-DD HH:MM:SS.ffffff`` and times
``HH:MM:SS[.ffffff]``: the forms Doris casts into DATE/DATETIME/VARCHAR columns and
PostgreSQL accepts, so a message is a table row as it stands.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Any, TypeVar

import orjson

__all__ = ["dumps", "loads", "to_row", "from_row", "format_datetime"]

T = TypeVar("T")

_OPTS = orjson.OPT_PASSTHROUGH_DATETIME


def format_datetime(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _default(value: Any) -> Any:
    # Only reached for the types OPT_PASSTHROUGH_DATETIME hands back to us.
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, time):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """Serialise a record (dataclass), or a dict of plain values, to JSON bytes."""
    return orjson.dumps(value, default=_default, option=_OPTS)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def to_row(record: Any) -> dict[str, Any]:
    """A record as a dict of JSON-ready values (the shape of a table row)."""
    return orjson.loads(dumps(record))


def _parse_datetime(value: str) -> datetime:
    return datetime.fromisoformat(value)


_PARSERS: dict[Any, Callable[[Any], Any]] = {
    date: date.fromisoformat,
    time: time.fromisoformat,
    datetime: _parse_datetime,
}
_CONVERTERS: dict[type, dict[str, Callable[[Any], Any]]] = {}


def _converters(cls: type) -> dict[str, Callable[[Any], Any]]:
    conv = _CONVERTERS.get(cls)
    if conv is None:
        conv = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            for arg in args:
                if arg in _PARSERS:
                    conv[f.name] = _PARSERS[arg]
        _CONVERTERS[cls] = conv
    return conv


def from_row(cls: type[T], row: dict[str, Any]) -> T:
    """Rebuild a record from its row dict; unknown keys are ignored (forward compatible)."""
    conv = _converters(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in row.items():
        if name not in names:
            continue
        if value is not None and name in conv and isinstance(value, str):
            value = conv[name](value)
        kwargs[name] = value
    return cls(**kwargs)
