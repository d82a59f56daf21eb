"""The ingest core (agents/fanout.py) on hostile files and paths: a dead letter with its code
and a transfer-log row, never an INTERNAL error, never another tenant's file."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson

from agents.fanout import Outcome, process_many
from streams.topology import DLQ, LOG
from tests.support.bad_files import deeply_nested


def _run(root: Path, tenant: str, file_path: str) -> tuple[Outcome, dict[str, Any]]:
    event = {"tenant_id": tenant, "file_path": file_path, "trace_id": str(uuid.uuid4())}
    [outcome] = process_many([(orjson.dumps(event), None, {})], root, "w1")
    return outcome, event


def _dead_letter(outcome: Outcome) -> dict[str, Any]:
    letters = [orjson.loads(o.value) for o in outcome.outputs if o.topic == DLQ]
    assert len(letters) == 1, outcome
    return letters[0]["error"]  # type: ignore[no-any-return]


def _log_status(outcome: Outcome) -> list[str]:
    return [orjson.loads(o.value)["transfer_status"] for o in outcome.outputs if o.topic == LOG]


def test_deep_nesting_is_a_malformed_dicom_dead_letter_with_a_log_row(tmp_path: Path, ct_small: Path) -> None:
    deeply_nested(ct_small, tmp_path / "old" / "deep.dcm", depth=600)
    outcome, _ = _run(tmp_path, "t1", "old/deep.dcm")
    error = _dead_letter(outcome)
    assert error["code"] == "MALFORMED_DICOM", error
    assert "nested deeper than" in error["message"]
    assert _log_status(outcome) == ["MALFORMED_DICOM"]
