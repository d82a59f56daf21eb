"""`dicomflow inspect`: the feeder's debugging tool, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from dicom.values import uid_hash
from schemas.identity import trace_id_for
from tests.conftest import PYDICOM_TEST_FILES


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomflow.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_inspect_ct_small_json(ct_small: Path) -> None:
    proc = _run("inspect", str(ct_small), "--tenant", "t1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = orjson.loads(proc.stdout)
    assert set(out) == {"file", "state", "image", "object"}
    state = out["state"]
    assert state["study_uid_hash"] == uid_hash(state["study_uid"])
    assert state["accession_number"].startswith("X32CRC")
    assert state["study_date"] == "2004-01-19"
    assert len(state["created_time"]) == len("2004-01-19 07:27:30.000000")
    assert out["image"]["sop_uid"] == out["object"]["sop_uid"]
    assert out["object"]["trace_id"] == trace_id_for("t1", out["image"]["sop_uid"], str(ct_small))


def test_inspect_rejection_and_mixed(tmp_path: Path, ct_small: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    proc = _run("inspect", str(junk), str(PYDICOM_TEST_FILES / "rtstruct.dcm"), str(ct_small),
                "--tenant", "t1", "--json")
    lines = [orjson.loads(x) for x in proc.stdout.splitlines()]
    assert proc.returncode == 0  # at least one file extracted
    assert lines[0]["error"]["code"] == "NOT_DICOM"
    assert lines[1]["error"] == {"code": "MISSING_REQUIRED_FIELD", "field": "StudyDate",
                                 "message": "StudyDate is required but missing or empty"}
    assert "state" in lines[2]


def test_inspect_all_rejected_exits_nonzero(tmp_path: Path) -> None:
    proc = _run("inspect", str(tmp_path / "missing.dcm"), "--tenant", "t1")
    assert proc.returncode == 1
    assert "FILE_MISSING" in proc.stdout


def test_inspect_every_bundled_file_without_crash() -> None:
    files = [str(p) for p in sorted(PYDICOM_TEST_FILES.rglob("*.dcm"))]
    proc = _run("inspect", *files, "--tenant", "t1", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [orjson.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == len(files)
    assert all(("error" in x) != ("state" in x) for x in lines)


def test_inspect_prints_the_rejection_of_a_deeply_nested_file(tmp_path: Path, ct_small: Path) -> None:
    from tests.support.bad_files import deeply_nested

    deep = deeply_nested(ct_small, tmp_path / "deep.dcm", depth=600)
    proc = _run("inspect", str(deep), str(ct_small), "--tenant", "t1", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [orjson.loads(x) for x in proc.stdout.splitlines()]
    assert lines[0]["error"]["code"] == "MALFORMED_DICOM", lines[0]
    assert "nested deeper than" in lines[0]["error"]["message"]
    assert "state" in lines[1]
