"""Series JSON (#16): generation rate against the raw header parse, and C-STORE -> JSON latency.

1. **Generation rate.** A 1,000-instance series (CT_small clones, pixel data included) is
   written as one document (``sinks.json_documents.write_series_document``: parse, DICOM JSON,
   spool, ordered assembly, fsync, rename), against ``pydicom.dcmread(stop_before_pixels=True)``
   of the same files, in the same process and run. Both are timed in alternating rounds after a
   warm-up (page cache warm for both); each figure is the median round. Target: >= 0.5x.
2. **Latency.** ``dicomflow up`` (embedded stack) with ``DICOMFLOW_JSON_QUIET_SECONDS`` set;
   dcmtk storescu sends one series over one association; the clock runs from the last C-STORE
   response to the moment the worker serves the series' document with every instance
   (``GET /studies/{study}/series/{series}/metadata``, polled every 0.1 s). Once per quiet time
   given (default: 300 s, the default, and 1 s).

    python -m bench.json_rates                     # both parts (about 6 min: one run waits the default 300 s)
    python -m bench.json_rates --quiet 1           # the latency at 1 s only
    python -m bench.json_rates --skip-latency
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom

from bench.clones import build_fast
from bench.common import Figure, figures_table, poll_until, write_result
from bench.senders import send_files
from bench.stack import UpStack
from dicom.json_model import JsonOptions
from dicomflow.stack import read_stack_file
from sinks.json_documents import write_series_document

__all__ = ["generation_rates", "latency", "main"]

TENANT = "bench-json"


def _median_rate(seconds: list[float], n: int) -> float:
    return n / statistics.median(seconds)


def generation_rates(workdir: Path, instances: int = 1000, rounds: int = 5) -> dict[str, Any]:
    data = build_fast(workdir / "series", instances=instances, series=1)
    files = data.files
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    options = JsonOptions()
    for f in files:  # warm the page cache for both sides
        f.read_bytes()
    raw_s: list[float] = []
    json_s: list[float] = []
    raw_cpu: list[float] = []
    json_cpu: list[float] = []
    size = 0
    for r in range(rounds):
        started, cpu = time.perf_counter(), time.process_time()
        for f in files:
            pydicom.dcmread(f, stop_before_pixels=True)
        raw_s.append(time.perf_counter() - started)
        raw_cpu.append(time.process_time() - cpu)
        started, cpu = time.perf_counter(), time.process_time()
        doc = write_series_document(files, workdir / "out" / f"round{r}.json", options, series_uid=series)
        json_s.append(time.perf_counter() - started)
        json_cpu.append(time.process_time() - cpu)
        assert doc.instances == instances, doc.skipped[:3]
        size = doc.bytes_written
    raw_rate, json_rate = _median_rate(raw_s, instances), _median_rate(json_s, instances)
    raw_cpu_rate, json_cpu_rate = _median_rate(raw_cpu, instances), _median_rate(json_cpu, instances)
    return {"instances": instances, "rounds": rounds, "raw_seconds": raw_s, "json_seconds": json_s,
            "raw_cpu_seconds": raw_cpu, "json_cpu_seconds": json_cpu,
            "raw_per_s": raw_rate, "json_per_s": json_rate, "ratio": json_rate / raw_rate,
            "raw_per_cpu_s": raw_cpu_rate, "json_per_cpu_s": json_cpu_rate, "cpu_ratio": json_cpu_rate / raw_cpu_rate,
            "document_bytes": size, "bytes_per_instance": size / instances, "loadavg": list(os.getloadavg())}


def _document(url: str, tenant: str) -> list[Any] | None:
    request = urllib.request.Request(url, headers={"X-Tenant-Id": tenant})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - the benchmark's own worker
            return list(json.loads(resp.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def latency(workdir: Path, quiet_s: float, instances: int = 50) -> dict[str, Any]:
    """Seconds from the last C-STORE response of a series to its complete JSON being served."""
    data = build_fast(workdir / f"send-{quiet_s:g}", instances=instances, series=1)
    ds = pydicom.dcmread(data.files[0], stop_before_pixels=True)
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    stack = UpStack(workdir / f"home-{quiet_s:g}", TENANT,
                    extra_env={"DICOMFLOW_JSON_QUIET_SECONDS": str(quiet_s)})
    with stack:
        web = read_stack_file(stack.home)["workers"][0]["web"]  # env() would draw new ports
        url = f"{web}/studies/{study}/series/{series}/metadata"
        timing = send_files(data.files, "127.0.0.1", stack.scp_port, "DICOMFLOW")
        if not timing.ok:
            raise RuntimeError(f"send failed: {timing.detail}")

        async def probe() -> list[Any] | None:
            return await asyncio.to_thread(_document, url, TENANT)

        _, seen = asyncio.run(poll_until(probe, lambda doc: doc is not None and len(doc) == instances,
                                         timeout=quiet_s + 180, what="the series JSON"))
    return {"quiet_s": quiet_s, "instances": instances, "sender": timing.sender,
            "send_seconds": timing.seconds, "latency_s": seen - timing.ended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quiet", default="300,1", help="quiet times (s) to measure the latency at, comma-separated")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-rates", action="store_true")
    args = parser.parse_args()
    figures: list[Figure] = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-json-") as tmp:
        work = Path(tmp)
        if not args.skip_rates:
            rates = result["generation"] = generation_rates(work, args.instances, args.rounds)
            figures.append(Figure(f"series JSON generation, {args.instances}-instance series", rates["json_per_s"],
                                  "inst/s", rates["raw_per_s"], "raw dcmread(stop_before_pixels)", ">= 0.5",
                                  rates["ratio"] >= 0.5))
            figures.append(Figure("  same, per CPU-second", rates["json_per_cpu_s"], "inst/cpu-s",
                                  rates["raw_per_cpu_s"], "raw dcmread per CPU-second", ">= 0.5",
                                  rates["cpu_ratio"] >= 0.5))
        if not args.skip_latency:
            result["latency"] = []
            for quiet in (float(q) for q in args.quiet.split(",") if q.strip()):
                got = latency(work, quiet)
                result["latency"].append(got)
                figures.append(Figure(f"last C-STORE -> JSON served, quiet {quiet:g} s ({got['instances']} inst.)",
                                      got["latency_s"], "s"))
    result["figures"] = [f.as_dict() for f in figures]
    path = write_result("json_rates", result)
    print(figures_table(figures))
    print(f"result: {path}")


if __name__ == "__main__":
    main()
