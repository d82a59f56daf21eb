"""The backfill walk: stored instances only, never the SCP's work in progress."""

from __future__ import annotations

from pathlib import Path

from feeders.backfill import iter_files
from feeders.scp import SPOOL_DIR


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
