"""The Doris tables as data: a small parser for ``schemas/sql/doris.sql`` and a row check.

The sink checks every row against the table before a Stream Load, so that one bad row is
dead-lettered with a reason naming its column instead of failing (or, with
``max_filter_ratio`` above 0, silently dropping from) the whole load. The check follows
Doris semantics where they matter: VARCHAR(n) bounds count UTF-8 bytes, a missing key
and a JSON ``null`` are the same NULL, INT/BIGINT have their 32/64-bit ranges.

It is stricter than Doris in one way on purpose: DATE/DATETIME values must have the wire
form of :mod:`schemas.codec` (``YYYY-MM-DD`` / ``YYYY-MM-DD HH:MM:SS[.ffffff]``), because
any other form in a row means a bug upstream, not a value worth loading.

Only ``CREATE TABLE`` statements are read; only the column types the schema uses are
supported (an unknown type fails loudly at first use rather than passing unchecked).
Nothing is read at import; the parsed file is cached on first use.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from importlib import resources
from typing import Any

from core.errors import Code, ConfigError

__all__ = [
    "ColumnSpec",
    "TableSpec",
    "RowError",
    "parse_ddl",
    "tables",
    "table_spec",
    "check_row",
    "validate_row",
]

#: Types the parser accepts; integers map to their inclusive range.
_INT_RANGES = {
    "TINYINT": (-(2**7), 2**7 - 1),
    "SMALLINT": (-(2**15), 2**15 - 1),
    "INT": (-(2**31), 2**31 - 1),
    "BIGINT": (-(2**63), 2**63 - 1),
}
_STRING_TYPES = ("VARCHAR", "CHAR")
_FLOAT_TYPES = ("DOUBLE", "FLOAT")
_TEMPORAL_TYPES = ("DATE", "DATETIME")
_SUPPORTED = set(_INT_RANGES) | set(_STRING_TYPES) | set(_FLOAT_TYPES) | set(_TEMPORAL_TYPES)


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """One column: ``type`` is the upper-case base name, ``length`` the VARCHAR/CHAR bound."""

    name: str
    type: str
    length: int | None
    nullable: bool

    @property
    def sql_type(self) -> str:
        return f"{self.type}({self.length})" if self.length is not None else self.type


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One table: ordered columns, key model (DUPLICATE/UNIQUE/AGGREGATE) and key columns."""

    name: str
    columns: tuple[ColumnSpec, ...]
    key_model: str
    key_columns: tuple[str, ...]
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def sequence_column(self) -> str | None:
        """The UNIQUE KEY sequence column (``function_column.sequence_col``), if any."""
        return self.properties.get("function_column.sequence_col")

    def column(self, name: str) -> ColumnSpec:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class RowError:
    """Why a row cannot be loaded: the column, an error code (:class:`Code`) and a reason."""

    column: str
    code: str
    reason: str

    def __str__(self) -> str:
        return f"{self.column}: {self.reason}"


# --- parsing -------------------------------------------------------------------------


def _strip_comments(sql: str) -> str:
    """Drop ``-- ...`` comments outside quotes (COMMENT strings may contain dashes)."""
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(sql):
        ch = sql[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(sql):
                out.append(sql[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
            out.append(ch)
        elif sql.startswith("--", i):
            while i < len(sql) and sql[i] != "\n":
                i += 1
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside quotes and parentheses."""
    parts: list[str] = []
    depth = 0
    quote: str | None = None
    start = 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _paren_body(text: str, open_at: int) -> tuple[str, int]:
    """The text inside the parenthesis opening at ``open_at`` and the index after it."""
    depth = 0
    quote: str | None = None
    for i in range(open_at, len(text)):
        ch = text[i]
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
    raise ValueError("unbalanced parentheses in CREATE TABLE")


def _ident(name: str) -> str:
    return name.strip().strip("`")


_CREATE_RE = re.compile(r"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([`\w.]+)\s*\(", re.I)
_COLUMN_RE = re.compile(r"^(`[^`]+`|\w+)\s+(\w+)\s*(?:\(\s*(\d+)\s*(?:,\s*\d+\s*)?\))?(.*)$", re.I | re.S)
_KEY_RE = re.compile(r"\b(DUPLICATE|UNIQUE|AGGREGATE)\s+KEY\s*\(([^)]*)\)", re.I)
_PROPS_RE = re.compile(r"\bPROPERTIES\s*\(", re.I)
_PROP_ITEM_RE = re.compile(r"""^\s*["']([^"']+)["']\s*=\s*["']([^"']*)["']\s*$""")
_NON_COLUMN = ("INDEX", "KEY", "PRIMARY", "CONSTRAINT", "UNIQUE")


def _parse_column(item: str, table: str) -> ColumnSpec:
    m = _COLUMN_RE.match(item)
    if m is None:
        raise ValueError(f"{table}: cannot parse column definition {item!r}")
    name, base, length, rest = _ident(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    if base not in _SUPPORTED:
        raise ValueError(f"{table}.{name}: unsupported column type {base}")
    if base in _STRING_TYPES and length is None:
        raise ValueError(f"{table}.{name}: {base} needs a length")
    # Only string types carry a byte bound; DATETIME(n) is a precision, not a length.
    bound = int(length) if base in _STRING_TYPES and length is not None else None
    # Strip quoted text (COMMENT '... NOT NULL ...') before looking at nullability.
    flags = re.sub(r"'[^']*'|\"[^\"]*\"", "", rest).upper()
    # Doris 2.x columns are nullable unless declared NOT NULL.
    nullable = re.search(r"\bNOT\s+NULL\b", flags) is None
    return ColumnSpec(name=name, type=base, length=bound, nullable=nullable)


def parse_ddl(sql: str) -> dict[str, TableSpec]:
    """Parse every ``CREATE TABLE`` statement of ``sql``; other statements are ignored."""
    specs: dict[str, TableSpec] = {}
    for stmt in _split_top(_strip_comments(sql), ";"):
        m = _CREATE_RE.match(stmt)
        if m is None:
            continue
        name = _ident(m.group(1).split(".")[-1])
        body, after = _paren_body(stmt, m.end() - 1)
        columns = tuple(
            _parse_column(item, name)
            for item in _split_top(body, ",")
            if item.split(None, 1)[0].upper() not in _NON_COLUMN
        )
        tail = stmt[after:]
        key = _KEY_RE.search(tail)
        key_model = key.group(1).upper() if key else "DUPLICATE"
        # Doris defaults to DUPLICATE KEY on the leading columns; only explicit keys are used here.
        key_columns = tuple(_ident(k) for k in key.group(2).split(",")) if key else ()
        props: dict[str, str] = {}
        pm = _PROPS_RE.search(tail)
        if pm:
            pbody, _ = _paren_body(tail, pm.end() - 1)
            for item in _split_top(pbody, ","):
                im = _PROP_ITEM_RE.match(item)
                if im:
                    props[im.group(1)] = im.group(2)
        names = {c.name for c in columns}
        missing = [k for k in key_columns if k not in names]
        if missing:
            raise ValueError(f"{name}: key columns {missing} are not columns")
        specs[name] = TableSpec(name, columns, key_model, key_columns, props)
    return specs


@functools.cache
def tables() -> dict[str, TableSpec]:
    """The tables of the packaged ``schemas/sql/doris.sql`` (parsed once)."""
    sql = resources.files("schemas").joinpath("sql/doris.sql").read_text(encoding="utf-8")
    return parse_ddl(sql)


def table_spec(name: str) -> TableSpec:
    """One packaged table by name; :class:`ConfigError` if the schema has no such table."""
    try:
        return tables()[name]
    except KeyError:
        raise ConfigError(
            f"table {name!r} is not in schemas/sql/doris.sql (known: {sorted(tables())})",
            field="table",
        ) from None


# --- row check -----------------------------------------------------------------------

_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?$")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_value(col: ColumnSpec, value: Any) -> RowError | None:
    t = col.type
    if t in _STRING_TYPES:
        if not isinstance(value, str):
            return RowError(col.name, Code.SINK_REJECTED, f"not a string: {_short(value)}")
        size = len(value.encode("utf-8"))
        if col.length is not None and size > col.length:
            return RowError(col.name, Code.VALUE_TOO_LONG, f"{size} bytes exceeds {col.sql_type}")
        return None
    if t in _INT_RANGES:
        number: int
        if isinstance(value, bool):
            return RowError(col.name, Code.SINK_REJECTED, f"not an {t}: {_short(value)}")
        if isinstance(value, int):
            number = value
        elif isinstance(value, str) and _INT_TEXT.match(value):
            number = int(value)
        else:
            return RowError(col.name, Code.SINK_REJECTED, f"not an {t}: {_short(value)}")
        low, high = _INT_RANGES[t]
        if not low <= number <= high:
            return RowError(col.name, Code.SINK_REJECTED, f"{number} is out of {t} range")
        return None
    if t in _FLOAT_TYPES:
        if isinstance(value, bool):
            return RowError(col.name, Code.SINK_REJECTED, f"not a {t}: {_short(value)}")
        if isinstance(value, int | float):
            number_f = float(value)
        elif isinstance(value, str):
            try:
                number_f = float(value)
            except ValueError:
                return RowError(col.name, Code.SINK_REJECTED, f"not a {t}: {_short(value)}")
        else:
            return RowError(col.name, Code.SINK_REJECTED, f"not a {t}: {_short(value)}")
        if not math.isfinite(number_f):
            return RowError(col.name, Code.SINK_REJECTED, f"not a finite {t}: {_short(value)}")
        return None
    if t == "DATE":
        if isinstance(value, str) and _DATE_TEXT.match(value):
            try:
                date.fromisoformat(value)
                return None
            except ValueError:
                pass
        return RowError(col.name, Code.INVALID_DATE, f"not a DATE: {_short(value)}")
    if t == "DATETIME":
        if isinstance(value, str) and _DATETIME_TEXT.match(value):
            try:
                datetime.fromisoformat(value)
                return None
            except ValueError:
                pass
        return RowError(col.name, Code.INVALID_DATE, f"not a DATETIME: {_short(value)}")
    raise AssertionError(f"unhandled column type {t}")  # parse_ddl admits only the types above


def check_row(spec: TableSpec, row: Mapping[str, Any]) -> RowError | None:
    """The first problem of ``row`` for ``spec`` (in column order), or None if Doris will take it.

    Keys that are not columns are ignored, as Stream Load ignores unknown JSON keys.
    """
    for col in spec.columns:
        value = row.get(col.name)
        if value is None:
            if not col.nullable:
                what = "missing" if col.name not in row else "null"
                return RowError(col.name, Code.MISSING_REQUIRED_FIELD, f"NOT NULL column is {what}")
            continue
        problem = _check_value(col, value)
        if problem is not None:
            return problem
    return None


def validate_row(spec: TableSpec, row: Mapping[str, Any]) -> str | None:
    """``check_row`` as text: ``"<column>: <reason>"``, or None when the row is loadable."""
    problem = check_row(spec, row)
    return None if problem is None else str(problem)
