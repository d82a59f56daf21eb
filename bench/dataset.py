"""Benchmark data: N instances in S series, cloned from pydicom's bundled CT_small.dcm.

Cloned in-process from one parsed base dataset per series: only the UIDs and numbers
change between files, each file is written with ``save_as`` (pixel data included, as a real
instance would be; the pipeline never reads it).

    python -m bench.dataset DEST --instances 2000 --series 20
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

__all__ = ["CT_SMALL", "BenchDataset", "build", "split"]

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


@dataclass(frozen=True)
class BenchDataset:
    root: Path
    files: list[Path]
    series: int
    study_uid: str
    seconds: float

    @property
    def instances(self) -> int:
        return len(self.files)

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def split(instances: int, series: int) -> list[int]:
    """Instances per series, as even as possible (the first series take the remainder)."""
    if series < 1 or instances < series:
        raise ValueError(f"need 1 <= series <= instances, got series={series} instances={instances}")
    base, extra = divmod(instances, series)
    return [base + (1 if s < extra else 0) for s in range(series)]


def _write_series(source: Path, folder: Path, study: str, number: int, count: int) -> list[Path]:
    """One series of ``count`` instances: a parsed base, mutated in place, saved per instance."""
    base = pydicom.dcmread(source)
    base.StudyInstanceUID = study
    base.SeriesInstanceUID = generate_uid()
    base.SeriesNumber = number
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        sop = generate_uid()
        base.SOPInstanceUID = sop
        base.file_meta.MediaStorageSOPInstanceUID = sop
        base.InstanceNumber = i + 1
        path = folder / f"i{i:05d}.dcm"
        base.save_as(path)
        files.append(path)
    return files


def build(dest: Path, *, instances: int, series: int, source: Path = CT_SMALL,
          jobs: int | None = None) -> BenchDataset:
    """Write ``instances`` files in ``series`` series of one study below ``dest`` (``sNNN/iNNNNN.dcm``).

    ``save_as`` of this 267-element header is the cost (a few ms per file), so series are
    written by ``jobs`` processes (default: one per core).
    """
    started = time.perf_counter()
    study = generate_uid()
    counts = split(instances, series)
    jobs = max(1, min(jobs or os.cpu_count() or 1, series))
    args = [(source, dest / f"s{s:03d}", study, s + 1, n) for s, n in enumerate(counts)]
    if jobs == 1:
        parts = [_write_series(*a) for a in args]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            parts = list(pool.map(_write_series, *zip(*args, strict=True)))
    files = [f for part in parts for f in part]
    return BenchDataset(dest, files, series, study, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=None, help="writer processes (default: one per core)")
    args = parser.parse_args()
    ds = build(args.dest, instances=args.instances, series=args.series, jobs=args.jobs)
    print(f"{ds.instances} files in {ds.series} series ({ds.bytes / 1e6:.1f} MB) under {ds.root} "
          f"in {ds.seconds:.1f}s ({ds.instances / ds.seconds:,.0f} files/s)")


if __name__ == "__main__":
    main()
