"""The backfill walk: stored instances only, never the SCP's work in progress."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from feeders.backfill import iter_files
from feeders.scp import SPOOL_DIR
from tests.conftest import PYDICOM_TEST_FILES


def test_walk_skips_spool_temporaries_and_safety_copies(tmp_path: Path) -> None:
    series = tmp_path / "t" / "20240101" / "1.2" / "1.3"
    series.mkdir(parents=True)
    (series / "1.4.dcm").write_bytes(b"a")
    (series / "1.5.dcm").write_bytes(b"b")
    (series / ".1.6.dcm.abc.part").write_bytes(b"half")  # a placement being written
    (series / ".1.4.dcm.0123.prev").write_bytes(b"old")  # a revocable earlier version
    (tmp_path / SPOOL_DIR).mkdir()
    (tmp_path / SPOOL_DIR / "tmpabc.dcm").write_bytes(b"arriving")
    (tmp_path / "link.dcm").symlink_to(series / "1.4.dcm")
    assert list(iter_files(tmp_path)) == [series / "1.4.dcm", series / "1.5.dcm"]


def test_walk_skips_the_series_json_documents_in_the_storage_root(tmp_path: Path) -> None:
    # the embedded default writes {storage}/{tenant}/metadata/{date}/{study}/{series}.json
    instance = tmp_path / "default" / "20240101" / "1.2" / "1.3" / "1.4.dcm"
    document = tmp_path / "default" / "metadata" / "20240101" / "1.2" / "1.3.json"
    for path in (instance, document):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    assert list(iter_files(tmp_path, json_root=tmp_path)) == [instance]
    assert list(iter_files(tmp_path / "default", json_root=tmp_path)) == [instance]
    # a folder named metadata elsewhere is an ordinary folder
    assert document in list(iter_files(tmp_path, json_root=tmp_path / "elsewhere"))


class _Recorder:
    """Stands in for EventPublisher: keeps what was published."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def publish(self, event: dict[str, Any], key: str | None) -> None:
        self.events.append(event)


async def test_a_malformed_file_is_reported_failed_and_the_run_goes_on(tmp_path: Path, ct_small: Path) -> None:
    from feeders.backfill import backfill
    from tests.support.bad_files import deeply_nested

    root = tmp_path / "storage"
    deeply_nested(ct_small, root / "old" / "a-deep.dcm", depth=600)
    shutil.copy(ct_small, root / "old" / "b-good.dcm")
    publisher = _Recorder()
    summary = await backfill(root / "old", storage_root=root, tenant="t1", worker="w",
                             publisher=publisher, progress=False)  # type: ignore[arg-type]
    assert [e["file_path"] for e in publisher.events] == ["old/b-good.dcm"]
    assert (summary.files, summary.published, summary.failed) == (2, 1, 1)
    assert len(summary.errors) == 1 and "a-deep.dcm" in summary.errors[0]
    assert "MALFORMED_DICOM" in summary.errors[0] and "nested deeper than" in summary.errors[0]


def _stored(root: Path, tenant: str, source: Path) -> Path:
    from pydicom import dcmread

    from feeders.storage import InstanceStore

    ds = dcmread(source, stop_before_pixels=True)
    store = InstanceStore(root)
    relpath = store.relpath(tenant, str(ds.StudyDate), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                            str(ds.SOPInstanceUID))
    store.write_bytes(relpath, source.read_bytes()).commit()
    return root / relpath


async def test_backfill_refuses_another_tenants_tree(tmp_path: Path, ct_small: Path) -> None:
    from core.errors import ConfigError
    from feeders.backfill import backfill

    root = tmp_path / "storage"
    _stored(root, "t2", ct_small)
    publisher = _Recorder()
    with pytest.raises(ConfigError) as info:
        await backfill(root / "t2", storage_root=root, tenant="t1", worker="w", publisher=publisher,  # type: ignore[arg-type]
                       progress=False)
    assert "t2" in info.value.message
    assert publisher.events == []


async def test_backfill_of_the_whole_root_publishes_only_the_tenants_and_unowned_files(
        tmp_path: Path, ct_small: Path) -> None:
    from feeders.backfill import backfill

    root = tmp_path / "storage"
    theirs = _stored(root, "t2", ct_small)
    mine = _stored(root, "t1", PYDICOM_TEST_FILES / "MR_small.dcm")
    (root / "old").mkdir()
    shutil.copy(ct_small, root / "old" / "x.dcm")
    publisher = _Recorder()
    summary = await backfill(root, storage_root=root, tenant="t1", worker="w", publisher=publisher,  # type: ignore[arg-type]
                             progress=False)
    published = sorted(e["file_path"] for e in publisher.events)
    assert published == sorted([mine.relative_to(root).as_posix(), "old/x.dcm"])
    assert (summary.files, summary.published, summary.failed) == (3, 2, 1)
    assert str(theirs) in summary.errors[0] and "TENANT_MISMATCH" in summary.errors[0]
