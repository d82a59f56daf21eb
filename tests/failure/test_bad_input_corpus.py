"""A corpus of bad inputs: each ends in the dead-letter topic with its code, and nothing valid is lost."""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pydicom
import pytest
from pydicom.dataset import Dataset

from core.settings import EMBEDDED_PROFILE
from dicomflow.embedded.broker import EmbeddedBroker
from feeders.publisher import EventPublisher
from feeders.storage import InstanceStore
from streams.topology import DLQ, LOG
from tests.harness import WorkerProcess, clone_series, read_topic, worker_env
from tests.support.bad_files import deeply_nested

pytestmark = pytest.mark.integration

Case = tuple[str, bytes | dict[str, Any], str]



def _variant(src: Path, dest: Path, change: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    change(ds)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)


def _build_corpus(root: Path, ct_small: Path, outside: Path) -> list[Case]:
    def ev(path: str, **extra: Any) -> dict[str, Any]:
        return {"tenant_id": "t-corpus", "file_path": path, "trace_id": str(uuid.uuid4()), **extra}

    bad = root / "bad"
    bad.mkdir(parents=True)
    cases: list[Case] = []

    def file_case(name: str, change: Callable[[Dataset], None], code: str) -> None:
        _variant(ct_small, bad / f"{name}.dcm", change)
        cases.append((name, ev(f"bad/{name}.dcm"), code))

    def delete(keyword: str) -> Callable[[Dataset], None]:
        return lambda ds: delattr(ds, keyword)

    def put(keyword: str, value: str) -> Callable[[Dataset], None]:
        return lambda ds: setattr(ds, keyword, value)

    for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "SOPClassUID"):
        file_case(f"missing_{kw}", delete(kw), "MISSING_REQUIRED_FIELD")
        file_case(f"empty_{kw}", put(kw, ""), "MISSING_REQUIRED_FIELD")
    for kw, n in (("PatientID", 65), ("Modality", 17), ("PatientSex", 2), ("StudyID", 17),
                  ("StudyDescription", 65), ("SeriesDescription", 257), ("PatientName", 65)):
        file_case(f"long_{kw}", put(kw, "A" * n), "VALUE_TOO_LONG")
    for i, value in enumerate(("2024-01-02", "20241301", "2024010")):
        file_case(f"bad_studydate_{i}", put("StudyDate", value), "INVALID_DATE")
    for kw in ("StudyTime", "SeriesTime", "ContentTime"):
        file_case(f"bad_{kw}", put(kw, "2599"), "INVALID_TIME")

    data = ct_small.read_bytes()
    (bad / "truncated.dcm").write_bytes(data[:1200])
    cases.append(("truncated", ev("bad/truncated.dcm"), "FILE_TRUNCATED"))
    (bad / "text.dcm").write_text("not a DICOM file")
    cases.append(("not_dicom", ev("bad/text.dcm"), "NOT_DICOM"))
    (bad / "empty.dcm").write_bytes(b"")
    cases.append(("empty_file", ev("bad/empty.dcm"), "NOT_DICOM"))
    os.symlink(outside, bad / "escape.dcm")
    cases.append(("symlink_escape", ev("bad/escape.dcm"), "PATH_ESCAPE"))
    cases.append(("dotdot", ev("../outside.dcm"), "PATH_ESCAPE"))
    cases.append(("absolute_outside", ev(str(outside)), "PATH_ESCAPE"))
    cases.append(("missing_file", ev("bad/nothere.dcm"), "FILE_MISSING"))
    (bad / "adir.dcm").mkdir()
    cases.append(("directory", ev("bad/adir.dcm"), "FILE_UNREADABLE"))
    cases.append(("invalid_json", b"{not json", "INVALID_JSON"))
    cases.append(("binary_garbage", b"\x00\xff\x10", "INVALID_JSON"))
    cases.append(("json_array", b"[1, 2]", "INVALID_EVENT"))
    cases.append(("no_trace", {"tenant_id": "t-corpus", "file_path": "ok/x.dcm"}, "INVALID_EVENT"))
    cases.append(("no_path", {"tenant_id": "t-corpus", "trace_id": "t"}, "INVALID_EVENT"))
    cases.append(("no_tenant", {"file_path": "ok/x.dcm", "trace_id": "t"}, "INVALID_EVENT"))
    cases.append(("tenant_type", {"tenant_id": 7, "file_path": "ok/x.dcm", "trace_id": "t"}, "INVALID_EVENT"))
    cases.append(("unknown_tenant_form", ev("ok/x.dcm", tenant_id="../evil"), "INVALID_EVENT"))
    cases.append(("size_type", ev("ok/x.dcm", file_size="12"), "INVALID_EVENT"))
    cases.append(("unknown_field", ev("ok/x.dcm", colour="red"), "INVALID_EVENT"))
    cases.append(("bad_created_time", ev("ok/x.dcm", created_time="2024-02-30 10:00:00"), "INVALID_EVENT"))

    # Hostile structure: 600 nested undefined-length sequences in 22 KB (once a RecursionError).
    deeply_nested(ct_small, bad / "deep.dcm", depth=600)
    cases.append(("deep_nesting", ev("bad/deep.dcm"), "MALFORMED_DICOM"))
    # Another tenant's instance, stored by the SCP's store (which marks its tenant directory).
    other = pydicom.dcmread(ct_small)
    other.SOPInstanceUID = pydicom.uid.generate_uid()
    store = InstanceStore(root)
    rel = store.relpath("t-other", "20040119", str(other.StudyInstanceUID), str(other.SeriesInstanceUID),
                        str(other.SOPInstanceUID))
    other_file = root / "staging.dcm"
    other.save_as(other_file)
    store.adopt_file(rel, other_file).commit()
    cases.append(("cross_tenant", ev(rel.as_posix()), "TENANT_MISMATCH"))
    # Work in progress and hidden files are never instances.
    for name, path in (("spool", ".spool/x.dcm"), ("part_temporary", "bad/.x.dcm.abc.part"),
                       ("prev_copy", "bad/.x.dcm.0123.prev")):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ct_small, root / path)
        cases.append((f"dot_{name}", ev(path), "PATH_ESCAPE"))
    # A symlink is never followed, even to a file inside the root. (A symlink swapped in between
    # check and parse cannot be timed against a worker process; tests/test_fanout_files.py swaps
    # it deterministically.)
    shutil.copy(ct_small, bad / "real.dcm")
    os.symlink(bad / "real.dcm", bad / "inside-link.dcm")
    cases.append(("symlink_inside_root", ev("bad/inside-link.dcm"), "PATH_ESCAPE"))
    return cases


async def test_corpus_dead_letters_with_the_right_codes(fresh_broker: EmbeddedBroker, tmp_path: Path,
                                                        ct_small: Path, pg_dsn: str) -> None:
    home = tmp_path / "home"
    root = home / "storage"
    outside = tmp_path / "outside.dcm"
    shutil.copy(ct_small, outside)
    cases = _build_corpus(root, ct_small, outside)
    assert len(cases) >= 30
    good = clone_series(ct_small, root / "ok", series=2, instances=5)

    publisher = EventPublisher(fresh_broker.url, EMBEDDED_PROFILE, partitions=4)
    await publisher.start()
    try:
        goods = iter(good)
        for i, (_, value, _) in enumerate(cases):
            if isinstance(value, bytes):
                await publisher.publish_raw(value, None)
            else:
                await publisher.publish(value, None)
            if i % 4 == 0:  # valid events interleaved: the worker must keep going
                path = next(goods, None)
                if path is not None:
                    await publisher.publish({"tenant_id": "t-corpus", "file_path": str(path.relative_to(root)),
                                             "trace_id": str(uuid.uuid4())}, None)
        for path in goods:
            await publisher.publish({"tenant_id": "t-corpus", "file_path": str(path.relative_to(root)),
                                     "trace_id": str(uuid.uuid4())}, None)
    finally:
        await publisher.stop()

    worker = WorkerProcess(worker_env(fresh_broker.url, home, DICOMFLOW_POSTGRES_DSN=pg_dsn),
                           home / "worker.log").start()
    try:
        dlq = await read_topic(fresh_broker.url, DLQ, until=lambda m: len(m) >= len(cases), timeout=120)
        by_trace = {}
        for m in dlq:
            letter = m.json()
            original = letter.get("original")
            if isinstance(original, dict) and "trace_id" in original and original.get("trace_id") != "t":
                by_trace[original["trace_id"]] = letter["error"]
        got = Counter(m.json()["error"]["code"] for m in dlq)
        assert got == Counter(code for _, _, code in cases), worker.log_tail()
        for name, value, code in cases:
            if isinstance(value, dict) and value.get("trace_id") in by_trace:
                error = by_trace[value["trace_id"]]
                assert error["code"] == code, (name, error)
                assert error["message"] and (error["field"] or code in ("NOT_DICOM",)), (name, error)
        logs = await read_topic(fresh_broker.url, LOG, until=lambda m: len(m) >= len(cases) - 2 + len(good))
        assert Counter(m.json()["transfer_status"] for m in logs)["SUCCESS"] == len(good)
        conn = await asyncpg.connect(pg_dsn)
        try:
            import asyncio
            import time

            deadline = time.monotonic() + 60
            rows: list[asyncpg.Record] = []
            while time.monotonic() < deadline:
                try:
                    rows = await conn.fetch("SELECT series_related_instances FROM dicom_state_meta")
                except asyncpg.UndefinedTableError:
                    rows = []
                if sorted(r[0] for r in rows) == [5, 5]:
                    break
                await asyncio.sleep(0.5)
            assert sorted(r[0] for r in rows) == [5, 5], "valid instances were lost among bad input"
        finally:
            await conn.close()
    finally:
        worker.stop()
