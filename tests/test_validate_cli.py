"""`dicomflow validate`: storage events checked with the pipeline's own validator, every error
with its JSON path and rule, the exit code, and --check-files against real files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pydicom

from core.errors import ContractError
from schemas.contract import validate_event
from tests.harness import REPO


def _validate(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow.cli", "validate", *args], input=stdin, cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)


def _pipeline_accepts(event: object) -> bool:
    try:
        validate_event(event)
    except ContractError:
        return False
    return True


GOOD = {"tenant_id": "t1", "file_path": "t1/a/ct.dcm", "trace_id": "trace-good", "file_size": 10,
        "created_time": "2026-12-02 08:00:00.000000"}
MANY = {"tenant_id": "bad tenant!", "file_path": "x.dcm", "file_size": -1, "colour": "blue"}
WIDE = {"tenant_id": "t1", "file_path": "t1/b.dcm", "trace_id": "trace-wide", "patient_id": "\u674e" * 30}
BAD_TIME = {"tenant_id": "t1", "file_path": "t1/c.dcm", "trace_id": "trace-time", "created_time": "2026-02-30 08:00:00"}


def test_every_error_with_path_and_rule_and_exit_code(tmp_path: Path) -> None:
    lines = [orjson.dumps(e).decode() for e in (GOOD, MANY, WIDE, BAD_TIME)] + ["{not json"]
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(lines) + "\n")

    proc = _validate(str(source))

    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert "line 1 trace_id=trace-good: ok" in out
    many = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in out if line.startswith("line 2")}
    assert set(many) == {"$.trace_id", "$.tenant_id", "$.file_size", "$.colour"}, out
    assert many["$.trace_id"].startswith("[required]") and many["$.tenant_id"].startswith("[pattern]")
    assert many["$.file_size"].startswith("[minimum]") and many["$.colour"].startswith("[additionalProperties]")
    # Beyond JSON Schema: the byte bound (90 bytes, 30 characters) and a date that does not exist.
    assert "line 3 trace_id=trace-wide: $.patient_id: [maxBytes (UTF-8)] patient_id is 90 bytes in UTF-8, " \
           "over its bound of 64" in out
    assert any(line.startswith("line 4 trace_id=trace-time: $.created_time: [date-time]") for line in out), out
    assert any(line.startswith("line 5: $: [json]") for line in out), out
    assert "5 events, 1 valid, 4 invalid" in proc.stderr
    # The verdict is the pipeline's, event by event.
    for n, event in enumerate((GOOD, MANY, WIDE, BAD_TIME), 1):
        assert _pipeline_accepts(event) == (f"line {n} trace_id={event.get('trace_id')}: ok" in out
                                            or f"line {n}: ok" in out)


def test_json_array_on_stdin_passes() -> None:
    proc = _validate("-", stdin=orjson.dumps([GOOD, {**GOOD, "trace_id": "trace-2"}]).decode())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["item 0 trace_id=trace-good: ok", "item 1 trace_id=trace-2: ok"]


def test_no_event_is_a_failure() -> None:
    proc = _validate("-", stdin="\n")
    assert proc.returncode == 1 and "0 events" in proc.stderr


def test_check_files_opens_each_file_under_the_storage_root(tmp_path: Path, ct_small: Path) -> None:
    root = tmp_path / "storage"
    (root / "t1" / "a").mkdir(parents=True)
    shutil.copy(ct_small, root / "t1" / "a" / "ct.dcm")
    (root / "t1" / "a" / "junk.dcm").write_text("not dicom")
    sop = str(pydicom.dcmread(ct_small, stop_before_pixels=True).SOPInstanceUID)
    events = [
        {**GOOD, "sop_uid": sop},
        {**GOOD, "trace_id": "trace-missing", "file_path": "t1/a/gone.dcm"},
        {**GOOD, "trace_id": "trace-junk", "file_path": "t1/a/junk.dcm"},
        {**GOOD, "trace_id": "trace-other", "sop_uid": "1.2.3.4"},
        {**GOOD, "trace_id": "trace-escape", "file_path": "../outside.dcm"},
    ]
    env = {"PATH": "/usr/bin:/bin", "DICOMFLOW_HOME": str(tmp_path / "home"), "DICOMFLOW_STORAGE_ROOT": str(root)}
    proc = _validate("--check-files", "-", stdin="\n".join(orjson.dumps(e).decode() for e in events), env=env)

    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert "line 1 trace_id=trace-good: ok" in out
    assert any(line.startswith("line 2 trace_id=trace-missing: $.file_path: [FILE_MISSING]") for line in out), out
    assert any(line.startswith("line 3 trace_id=trace-junk: $.file_path: [NOT_DICOM]") for line in out), out
    assert any(line.startswith("line 4 trace_id=trace-other: $.sop_uid: [matches the file]") and sop in line
               for line in out), out
    assert any(line.startswith("line 5 trace_id=trace-escape: $.file_path: [PATH_ESCAPE]") for line in out), out



def test_a_path_ingest_will_refuse_fails_without_check_files() -> None:
    # ingest refuses it when it opens the file (PATH_ESCAPE); that needs no file to tell
    escaping = {**GOOD, "trace_id": "trace-esc", "file_path": "../etc/passwd"}
    proc = _validate("-", stdin=orjson.dumps(escaping).decode())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any(line.startswith("line 1 trace_id=trace-esc: $.file_path: [PATH_ESCAPE]")
               for line in proc.stdout.splitlines()), proc.stdout
