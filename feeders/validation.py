"""Checking storage events before they are published (``dicomflow validate``).

The verdict is the pipeline's own: :func:`schemas.contract.validate_event`, which ingest and
every feeder apply. It stops at an event's first error, so to show a feeder every error at
once, with its JSON path and the rule it breaks, the same published JSON Schema is also
walked with ``jsonschema`` (all errors), and the contract's checks beyond JSON Schema (byte
bounds in UTF-8, a real ``created_time``) are collected by re-running ``validate_event``
without each field it named. With ``storage_root``, each valid event's file is also opened
as ingest opens it (strictly inside the root, for its tenant) and its header read.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from core.errors import ContractError, DicomflowError
from dicom.paths import open_in_root, path_components
from dicom.reader import read_instance_header
from schemas.contract import schema, validate_event

__all__ = ["Problem", "Checked", "parse_events", "check_event", "check_text"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One error: where in the event (a JSON path), the rule it breaks, and why."""

    path: str
    rule: str
    message: str


@dataclass
class Checked:
    """One event's result: where it was in the input, its trace id, its problems."""

    where: str
    trace_id: str | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_events(text: str) -> Iterator[tuple[str, Any]]:
    """``(where, event)`` for a JSON array or one JSON document per line; a line (or the whole
    input) that is not JSON yields a :class:`Problem` as its event."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = orjson.loads(stripped)
        except orjson.JSONDecodeError as exc:
            yield "input", Problem("$", "json", f"not a JSON array: {exc}")
            return
        for i, item in enumerate(items):
            yield f"item {i}", item
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            yield f"line {n}", Problem("$", "json", f"not JSON: {exc}")


@functools.cache
def _schema_validator() -> Draft202012Validator:
    return Draft202012Validator(schema())


def _json_path(parts: Any) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _schema_problems(event: Any) -> list[Problem]:
    out: list[Problem] = []
    properties = schema()["properties"]
    for err in sorted(_schema_validator().iter_errors(event), key=lambda e: list(map(str, e.absolute_path))):
        path = _json_path(err.absolute_path)
        if err.validator == "required" and isinstance(event, dict):
            missing = [k for k in err.validator_value if k not in event]
            out += [Problem(f"{path}.{k}", "required", f"{k} is required") for k in missing[:1]]
        elif err.validator == "additionalProperties" and isinstance(event, dict):
            out += [Problem(f"{path}.{k}", "additionalProperties", f"{k} is not a field of the storage event contract")
                    for k in sorted(set(event) - set(properties))]
        else:
            out.append(Problem(path, str(err.validator), err.message))
    return list(dict.fromkeys(out))


def _contract_rule(exc: ContractError) -> str:
    if "bytes in UTF-8" in exc.message:
        return "maxBytes (UTF-8)"
    if exc.field == "created_time":
        return "date-time"
    return "contract"


def _contract_problems(event: dict[str, Any], seen: set[str]) -> list[Problem]:
    """The pipeline validator's errors, each field in turn (it stops at the first)."""
    out: list[Problem] = []
    trial = dict(event)
    for _ in range(len(event) + 1):
        try:
            validate_event(trial)
            break
        except ContractError as exc:
            path = f"$.{exc.field}" if exc.field else "$"
            if path not in seen:
                out.append(Problem(path, _contract_rule(exc), exc.message))
                seen.add(path)
            if exc.field is None or exc.field not in trial:
                break
            del trial[exc.field]
    return out


def _file_problems(event: dict[str, Any], storage_root: Path) -> list[Problem]:
    """Open the event's file as ingest does and read its header; compare the UIDs it names."""
    try:
        with open_in_root(storage_root, event["file_path"], event["tenant_id"]) as opened:
            header = read_instance_header(opened.reader_path)
    except DicomflowError as exc:
        return [Problem("$.file_path", exc.code, exc.message)]
    out: list[Problem] = []
    for name in ("study_uid", "series_uid", "sop_uid"):
        said, found = event.get(name), getattr(header, name)
        if said is not None and said != found:
            out.append(Problem(f"$.{name}", "matches the file",
                               f"the event says {said!r}, the file's header {found!r}"))
    return out


def check_event(event: Any, where: str, *, storage_root: Path | None = None) -> Checked:
    """Every problem of one decoded event (and of its file, with ``storage_root``)."""
    if isinstance(event, Problem):
        return Checked(where, None, [event])
    trace = event.get("trace_id") if isinstance(event, dict) else None
    checked = Checked(where, trace if isinstance(trace, str) else None, _schema_problems(event))
    if isinstance(event, dict):
        checked.problems += _contract_problems(event, {p.path for p in checked.problems})
    else:
        try:  # the pipeline's verdict on a non-object, in its own words
            validate_event(event)
        except ContractError as exc:
            if not checked.problems:
                checked.problems.append(Problem("$", "type", exc.message))
    if checked.ok and isinstance(event, dict):
        checked.problems += _path_problems(event)
    if checked.ok and storage_root is not None:
        checked.problems += _file_problems(event, storage_root)
    return checked


def _path_problems(event: dict[str, Any]) -> list[Problem]:
    """What ingest will refuse about ``file_path`` without opening anything (``..``, NUL, dot
    components); an absolute path needs the storage root, so only ``--check-files`` judges it."""
    file_path = event.get("file_path")
    if not isinstance(file_path, str) or file_path.startswith("/"):
        return []
    try:
        path_components(Path("/"), file_path)
    except DicomflowError as exc:
        return [Problem("$.file_path", exc.code, exc.message)]
    return []


def check_text(text: str, *, storage_root: Path | None = None) -> list[Checked]:
    return [check_event(event, where, storage_root=storage_root) for where, event in parse_events(text)]
