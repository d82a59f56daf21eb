"""The ingest core (agents/fanout.py) on hostile files and paths: a dead letter with its code
and a transfer-log row, never an INTERNAL error, never another tenant's file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

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


# ------------------------------------------------------------------------------------------ whose file, which file


def _store(root: Path, tenant: str, source: Path) -> str:
    """Store ``source`` as the SCP does (InstanceStore), under ``tenant``; its event path."""
    from pydicom import dcmread

    from feeders.storage import InstanceStore

    ds = dcmread(source, stop_before_pixels=True)
    store = InstanceStore(root)
    relpath = store.relpath(tenant, str(ds.StudyDate), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                            str(ds.SOPInstanceUID))
    store.write_bytes(relpath, source.read_bytes()).commit()
    return relpath.as_posix()


def _succeeded(outcome: Outcome) -> bool:
    return outcome.error is None and not any(o.topic == DLQ for o in outcome.outputs)


def test_another_tenants_stored_file_is_refused(tmp_path: Path, ct_small: Path) -> None:
    path = _store(tmp_path, "t2", ct_small)
    outcome, _ = _run(tmp_path, "t1", path)
    error = _dead_letter(outcome)
    assert error["code"] == "TENANT_MISMATCH", error
    assert "t2" in error["message"] and error["field"] == "file_path"
    assert _log_status(outcome) == ["TENANT_MISMATCH"]
    assert _succeeded(_run(tmp_path, "t2", path)[0])  # its own tenant reads it


def test_a_folder_no_tenant_owns_is_read_for_the_event_tenant(tmp_path: Path, ct_small: Path) -> None:
    """Backfill of arbitrary folders under the root (README: storage/old) keeps working."""
    _store(tmp_path, "t2", ct_small)  # the root also holds another tenant's tree
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x.dcm").write_bytes(ct_small.read_bytes())
    outcome, _ = _run(tmp_path, "t1", "old/x.dcm")
    assert _succeeded(outcome), outcome
    rows = [orjson.loads(o.value) for o in outcome.outputs if o.topic == LOG]
    assert [r["tenant_id"] for r in rows] == ["t1"]


@pytest.mark.parametrize("file_path", [".spool/x.dcm", "a/.x.part", "a/.x.dcm.0123.prev", "./a/x.dcm",
                                       "a/./x.dcm"])
def test_dot_components_are_refused(tmp_path: Path, ct_small: Path, file_path: str) -> None:
    target = tmp_path / file_path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(ct_small.read_bytes())
    outcome, _ = _run(tmp_path, "t1", file_path)
    error = _dead_letter(outcome)
    assert error["code"] == "PATH_ESCAPE", error
    assert error["field"] == "file_path"
    assert _log_status(outcome) == ["PATH_ESCAPE"]


def test_a_symlink_inside_the_root_is_not_followed(tmp_path: Path, ct_small: Path) -> None:
    own = _store(tmp_path, "t2", ct_small)
    (tmp_path / "t1").mkdir()
    os.symlink(tmp_path / own, tmp_path / "t1" / "link.dcm")  # t1's path, t2's file
    (tmp_path / "lnk").symlink_to(tmp_path / "t1")
    for file_path in ("t1/link.dcm", f"lnk/{Path(own).name}"):
        error = _dead_letter(_run(tmp_path, "t1", file_path)[0])
        assert error["code"] == "PATH_ESCAPE", (file_path, error)


def test_a_symlink_swapped_in_after_the_check_is_not_read(tmp_path: Path, ct_small: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is parsed from the descriptor that was checked, never reopened by name: a swap
    between check and parse (here: right before extraction starts) changes nothing."""
    from pydicom import dcmread

    from agents import fanout
    from dicom.extract import extract as real_extract

    victim = tmp_path / "victim.dcm"  # another tenant's file, or one outside the root
    victim.write_bytes(ct_small.read_bytes())
    victim_ds = dcmread(victim)
    victim_ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.99.1"
    victim_ds.save_as(victim)
    (tmp_path / "t1").mkdir()
    mine = tmp_path / "t1" / "x.dcm"
    mine.write_bytes(ct_small.read_bytes())

    def swap_then_extract(*args: Any, **kwargs: Any) -> Any:
        os.replace(mine, tmp_path / "t1" / "moved.dcm")
        os.symlink(victim, mine)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(fanout, "extract", swap_then_extract)
    outcome, _ = _run(tmp_path, "t1", "t1/x.dcm")
    assert _succeeded(outcome), outcome
    rows = [orjson.loads(o.value) for o in outcome.outputs if o.topic == LOG]
    assert [r["sop_uid"] for r in rows] == [str(dcmread(ct_small, stop_before_pixels=True).SOPInstanceUID)]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.dcm")
    error = _dead_letter(_run(tmp_path, "t1", "pipe.dcm")[0])
    assert error["code"] == "FILE_UNREADABLE", error
