"""C-STORE to PostgreSQL: the whole embedded stack against a minimal SCP, and the latency to a visible row.

Same files, same sender (dcmtk ``storescu`` with TCP_NODELAY=1 if installed, else
``dicomflow send``), same run:

1. **Baseline**: ``bench.minimal_scp`` (pynetdicom, every storage context, the handler only
   writes ``event.encoded_dataset()`` to disk), its own process. Rate = N / (sender start ->
   last C-STORE response, i.e. the sender's exit). Also the same SCP with ``--durable``
   (temp file, fsync, rename, directory fsync): the floor that issue #6's durability rule
   puts under any SCP on this disk, before any parsing or broker round trip.
2. **Full stack**: ``dicomflow up`` (embedded Tansu and PostgreSQL, one worker, the SCP) in a
   fresh home, warmed up with one small series until its row is in PostgreSQL. Then the
   same N files: rate = N / (sender start -> every row visible in ``dicom_state_meta``: the
   study's series all present with the sum of series_related_instances = N, polled every
   0.2 s). Also the SCP alone: N / (sender start -> last C-STORE response).
3. **Latency**: another study sent series after series, instances in order, with
   pynetdicom at a steady rate (``--latency-rate``), recording when each C-STORE response
   arrived; PostgreSQL is polled every 50 ms, and an instance is visible when its series'
   row count reaches the instance's position in the series. Run on the stack of step 2
   (default series window, 5 s) and on a second stack with DICOMFLOW_SERIES_WINDOW_SECONDS=1.
   The poll adds ~25 ms on average.

    python -m bench.scp [--instances 5000] [--latency-instances 500] [--latency-rate 50] [--sender auto]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pydicom

from bench.clones import build_fast
from bench.common import Figure, figures_table, table, write_result
from bench.dataset import BenchDataset
from bench.senders import PacedSend, SendTiming, send_paced, send_parallel
from bench.stack import UpStack, series_rows
from dicomflow.embedded.ports import free_port
from tests.harness import REPO

__all__ = ["ScpResult", "run_scp", "main"]

TENANT = "bench-scp"
AET = "DICOMFLOW"
TARGET_RATIO = 0.9
PER_SERIES = 100
POLL_S = 0.2
LATENCY_POLL_S = 0.05
WARM_INSTANCES = 20


@dataclass
class ScpResult:
    params: dict[str, Any]
    baseline: dict[str, Any]
    stack: dict[str, Any]
    latency: dict[str, dict[str, Any]]
    figures: list[Figure] = field(default_factory=list)
    path: Path | None = None


@dataclass(frozen=True)
class Study:
    """A built data set with what the PostgreSQL check needs: study UID, series UIDs, instances per series."""

    files: list[Path]
    study_uid: str
    series_uids: list[str]
    per_series: list[int]

    @classmethod
    def of(cls, ds: BenchDataset) -> Study:
        folders = list(dict.fromkeys(f.parent for f in ds.files))
        uids = [str(pydicom.dcmread(next(iter(sorted(d.iterdir()))), stop_before_pixels=True).SeriesInstanceUID)
                for d in folders]
        per = [sum(1 for f in ds.files if f.parent == d) for d in folders]
        return cls(ds.files, ds.study_uid, uids, per)

    def positions(self) -> list[tuple[int, int]]:
        """(series index, 1-based position in the series) of each file, in send order."""
        return [(s, i + 1) for s, n in enumerate(self.per_series) for i in range(n)]


# ---------------------------------------------------------------------------------------------- baseline


def _await_ready(proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait for the minimal SCP's ``ready`` line; fail at the deadline or if it exits."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"minimal SCP not ready after {timeout:.0f}s")
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"minimal SCP did not start: {line!r}")


def _baseline(files: list[Path], rx: Path, sender: str, associations: int = 1,
              durable: bool = False) -> dict[str, Any]:
    port = free_port()
    rx.mkdir(parents=True, exist_ok=True)
    with open(rx.parent / "minimal_scp.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.minimal_scp", "--port", str(port), "--dir", str(rx),
                                 "--aet", AET, *(["--durable"] if durable else [])],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            _await_ready(proc, 60)
            timing = send_parallel(files, "127.0.0.1", port, AET, associations=associations, sender=sender)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
    stats = orjson.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    if not timing.ok or stats.get("received") != len(files):
        raise RuntimeError(f"baseline send failed: {timing}, SCP stats {stats}, "
                           f"log {(rx.parent / 'minimal_scp.log').read_text()[-500:]}")
    return {**_timing_dict(timing), "received": stats["received"],
            "first_store_after_start_s": stats["first"] - timing.started,
            "last_store_before_end_s": timing.ended - stats["last"]}


def _timing_dict(t: SendTiming) -> dict[str, Any]:
    return {"sender": t.sender, "instances": t.instances, "seconds": t.seconds, "rate": t.instances / t.seconds}


# ---------------------------------------------------------------------------------------------- stack


async def _rows(conn: asyncpg.Connection, study: Study) -> dict[str, int]:
    return await series_rows(conn, study.study_uid)


def _complete(rows: dict[str, int], study: Study) -> bool:
    return len(rows) == len(study.series_uids) and sum(rows.values()) == sum(study.per_series)


async def _until_visible(dsn: str, study: Study, timeout: float, interval: float = POLL_S) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await _rows(conn, study)
            now = time.monotonic()
            if _complete(rows, study):
                return now
            if now > deadline:
                raise TimeoutError(f"deadline ({timeout:.0f}s): {len(rows)} of {len(study.series_uids)} series, "
                                   f"{sum(rows.values())} of {sum(study.per_series)} instances visible")
            await asyncio.sleep(interval)
    finally:
        await conn.close()


def _batch_sizes(stack: UpStack) -> tuple[bool, list[int]]:
    """(worker Ready, sizes of its ingest batches so far), from its log (``ingest batch events=N``)."""
    text = (stack.home / "logs" / "worker-0.log").read_text(errors="replace")
    return "[^Worker]: Ready" in text, [int(m) for m in re.findall(r"ingest batch events=(\d+)", text)]


async def _warm_up(stack: UpStack, warm: Study, timeout: float = 120.0) -> float:
    """Once the worker is Ready, one small series until the worker has ingested it: the consumer group has
    joined and the ingest pool is up. Its row lands in PostgreSQL later, unwaited (another study)."""
    started = time.monotonic()
    deadline = started + timeout
    while not _batch_sizes(stack)[0]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not Ready after {timeout:.0f}s:\n{stack.log_tail(20, 'worker-0')}")
        await asyncio.sleep(0.2)
    paced = await asyncio.to_thread(send_paced, warm.files, "127.0.0.1", stack.scp_port, AET, rate=1000.0)
    if any(s != 0 for s in paced.statuses):
        raise RuntimeError(f"warm-up send failed: statuses {Counter(paced.statuses)}")
    while sum(_batch_sizes(stack)[1]) < len(warm.files):
        if time.monotonic() > deadline:
            raise TimeoutError(f"warm-up not ingested after {timeout:.0f}s:\n{stack.log_tail(20, 'worker-0')}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _throughput(stack: UpStack, study: Study, sender: str, associations: int = 1) -> dict[str, Any]:
    n = len(study.files)
    before, handled = len(_batch_sizes(stack)[1]), len(_handler_ms(stack))
    timing = await asyncio.to_thread(send_parallel, study.files, "127.0.0.1", stack.scp_port, AET,
                                     associations=associations, sender=sender)
    if not timing.ok:
        raise RuntimeError(f"send to the stack failed: {timing.detail}")
    visible = await _until_visible(stack.dsn, study, timeout=300 + n / 10)
    handler = _handler_ms(stack)[handled:]
    return {"ingest_batches": _batch_stats(_batch_sizes(stack)[1][before:]), **_timing_dict(timing),
            "scp_handler_ms": {"p50": _percentile(handler, 0.5), "p95": _percentile(handler, 0.95),
                               "mean": statistics.fmean(handler), "count": len(handler)} if handler else None,
            "scp_rate": n / timing.seconds, "send_to_visible_s": visible - timing.started,
            "last_response_to_visible_s": visible - timing.ended, "rate": n / (visible - timing.started)}


def _handler_ms(stack: UpStack) -> list[float]:
    """The SCP's C-STORE handler time per stored instance, from its log (``stored ... elapsed_ms=X``)."""
    text = (stack.home / "logs" / "scp.log").read_text(errors="replace")
    return [float(m) for m in re.findall(r"stored trace_id=.*?elapsed_ms=([\d.]+)", text)]


def _batch_stats(sizes: list[int]) -> dict[str, Any]:
    if not sizes:
        return {"batches": 0}
    return {"batches": len(sizes), "mean": statistics.fmean(sizes), "p50": statistics.median(sizes),
            "max": max(sizes), "of_size_1": sum(1 for s in sizes if s == 1)}


# ---------------------------------------------------------------------------------------------- latency


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _latency(stack: UpStack, study: Study, rate: float, window_s: float) -> dict[str, Any]:
    n = len(study.files)
    index = {uid: s for s, uid in enumerate(study.series_uids)}
    history: list[list[tuple[float, int]]] = [[] for _ in study.series_uids]
    conn = await asyncpg.connect(stack.dsn)
    try:
        sending = asyncio.create_task(asyncio.to_thread(send_paced, study.files, "127.0.0.1", stack.scp_port,
                                                        AET, rate=rate))
        deadline = time.monotonic() + n / rate + 120
        while True:
            rows = await _rows(conn, study)
            now = time.monotonic()
            for uid, count in rows.items():
                h = history[index[uid]]
                if not h or h[-1][1] != count:
                    h.append((now, count))
            if sending.done() and _complete(rows, study):
                break
            if now > deadline:
                raise TimeoutError(f"latency run: {sum(rows.values())} of {n} instances visible")
            await asyncio.sleep(LATENCY_POLL_S)
        paced: PacedSend = await sending
    finally:
        await conn.close()
    if any(s != 0 for s in paced.statuses):
        raise RuntimeError(f"latency run: C-STORE statuses {Counter(paced.statuses)}")
    latencies = []
    for (s, pos), responded in zip(study.positions(), paced.responded, strict=True):
        seen = next(t for t, count in history[s] if count >= pos)
        latencies.append(seen - responded)
    rtt = [b - a for a, b in zip(paced.requested, paced.responded, strict=True)]
    return {"window_s": window_s, "instances": n, "series": len(study.series_uids), "rate": rate,
            "achieved_rate": n / (paced.responded[-1] - paced.requested[0]),
            "p50_s": _percentile(latencies, 0.5), "p95_s": _percentile(latencies, 0.95), "max_s": max(latencies),
            "min_s": min(latencies), "mean_s": statistics.fmean(latencies),
            "c_store_rtt_p50_ms": 1000 * _percentile(rtt, 0.5), "c_store_rtt_p95_ms": 1000 * _percentile(rtt, 0.95),
            "row_updates_seen": sum(len(h) for h in history)}


# ---------------------------------------------------------------------------------------------- run


async def _stack_runs(stack: UpStack, warm: Study, tput: Study | None, lat: Study, rate: float, window_s: float,
                      sender: str, par: Study | None = None,
                      associations: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    info: dict[str, Any] = {"startup_s": stack.startup_s, "warm_up_s": await _warm_up(stack, warm)}
    if tput is not None:
        print(f"scp: {len(tput.files)} instances to the stack ...", flush=True)
        info.update(await _throughput(stack, tput, sender))
    if par is not None:
        print(f"scp: {len(par.files)} instances to the stack over {associations} associations ...", flush=True)
        info["parallel"] = await _throughput(stack, par, sender, associations)
    print(f"scp: latency, {len(lat.files)} instances at {rate:g}/s, window {window_s:g} s ...", flush=True)
    latency = await _latency(stack, lat, rate, window_s)
    return info, latency


def run_scp(*, instances: int, latency_instances: int, latency_rate: float = 50.0, latency_per_series: int = 100,
            sender: str = "auto", associations: int = 4, workdir: Path | None = None) -> ScpResult:
    own = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="dicomflow-bench-scp-"))
    try:
        print(f"scp: building {instances} + {latency_instances} + {WARM_INSTANCES} instances ...", flush=True)
        tput = Study.of(build_fast(work / "send" / "tput", instances=instances,
                              series=max(1, instances // PER_SERIES)))
        lat = Study.of(build_fast(work / "send" / "lat", instances=latency_instances,
                             series=max(1, latency_instances // latency_per_series)))
        warm = Study.of(build_fast(work / "send" / "warm", instances=WARM_INSTANCES, series=1))
        par = Study.of(build_fast(work / "send" / "par", instances=instances, series=max(1, instances // PER_SERIES))) \
            if associations > 1 else None
        print("scp: baseline, minimal pynetdicom SCP ...", flush=True)
        baseline = _baseline(tput.files, work / "rx", sender)
        baseline["durable"] = _baseline(tput.files, work / "rx-durable", sender, durable=True)
        if par is not None:
            baseline["parallel"] = _baseline(par.files, work / "rx-par", sender, associations)
        print(f"scp: baseline {baseline['rate']:,.0f}/s with {baseline['sender']}; starting dicomflow up ...",
              flush=True)
        with UpStack(work / "stack-default", TENANT) as stack:
            info, lat_default = asyncio.run(_stack_runs(stack, warm, tput, lat, latency_rate, 5.0, sender, par,
                                                        associations))
        info["stop_s"], info["scp_killed_at_stop"] = stack.stop_s, stack.scp_killed
        with UpStack(work / "stack-window1", TENANT, {"DICOMFLOW_SERIES_WINDOW_SECONDS": "1"}) as stack1:
            info1, lat_1 = asyncio.run(_stack_runs(stack1, warm, None, lat, latency_rate, 1.0, sender))
        info["window1_stack"] = {**info1, "stop_s": stack1.stop_s, "scp_killed_at_stop": stack1.scp_killed}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    params = {"instances": instances, "series": len(tput.series_uids), "latency_instances": latency_instances,
              "latency_series": len(lat.series_uids), "latency_rate": latency_rate, "sender": baseline["sender"],
              "stack": "dicomflow up: embedded Tansu + PostgreSQL 16, 1 worker, SCP", "poll_s": POLL_S,
              "latency_poll_s": LATENCY_POLL_S, "target_ratio": TARGET_RATIO, "associations": associations}
    latency = {"5": lat_default, "1": lat_1}
    result = ScpResult(params, baseline, info, latency, _figures(baseline, info, latency))
    result.path = write_result("scp", {"params": params, "baseline": baseline, "stack": info, "latency": latency,
                                       "figures": [f.as_dict() for f in result.figures]})
    return result


def _figures(base: dict[str, Any], info: dict[str, Any], latency: dict[str, dict[str, Any]]) -> list[Figure]:
    figures = [
        Figure("C-STORE -> PostgreSQL inst/s (full stack)", info["rate"], "inst/s", base["rate"],
               "minimal pynetdicom SCP inst/s", f">= {TARGET_RATIO} x", info["rate"] / base["rate"] >= TARGET_RATIO),
        Figure("C-STORE receive inst/s (dicomflow SCP)", info["scp_rate"], "inst/s", base["rate"],
               "minimal pynetdicom SCP inst/s"),
        Figure("durability floor: minimal SCP + fsync/rename", base["durable"]["rate"], "inst/s", base["rate"],
               "minimal pynetdicom SCP inst/s"),
        Figure("C-STORE receive inst/s (dicomflow SCP)", info["scp_rate"], "inst/s", base["durable"]["rate"],
               "minimal SCP + fsync/rename inst/s"),
        Figure("C-STORE -> PostgreSQL inst/s (full stack)", info["rate"], "inst/s", base["durable"]["rate"],
               "minimal SCP + fsync/rename inst/s"),
    ]
    if "parallel" in info:
        bp, sp = base["parallel"], info["parallel"]
        assoc = sp["sender"].rsplit("x", 1)[-1]
        figures += [
            Figure(f"C-STORE -> PostgreSQL inst/s, {assoc} associations", sp["rate"], "inst/s", bp["rate"],
                   f"minimal SCP inst/s, {assoc} assoc."),
            Figure(f"C-STORE receive inst/s, {assoc} associations", sp["scp_rate"], "inst/s", bp["rate"],
                   f"minimal SCP inst/s, {assoc} assoc."),
        ]
    for key, lat in latency.items():
        for q in ("p50", "p95"):
            figures.append(Figure(f"C-STORE rsp -> PG row {q} (window {key} s)", lat[f"{q}_s"], "s"))
    return figures


def report(r: ScpResult) -> str:
    b, s = r.baseline, r.stack
    lat_rows = [[f"window {k} s", v["instances"], v["achieved_rate"], v["p50_s"], v["p95_s"], v["min_s"],
                 v["max_s"], v["c_store_rtt_p50_ms"]] for k, v in r.latency.items()]
    return "\n".join([
        f"scp: {r.params['instances']} instances in {r.params['series']} series, sender {b['sender']}",
        table(["run", "s", "inst/s"], [
            ["minimal pynetdicom SCP: send start -> last response", b["seconds"], b["rate"]],
            ["minimal SCP + temp file, fsync, rename, dir fsync: -> last response", b["durable"]["seconds"],
             b["durable"]["rate"]],
            ["dicomflow up: send start -> last response", s["seconds"], s["scp_rate"]],
            ["dicomflow up: send start -> all rows in PostgreSQL", s["send_to_visible_s"], s["rate"]],
            *([[f"minimal SCP, {b['parallel']['sender']}: send start -> last response", b["parallel"]["seconds"],
                b["parallel"]["rate"]],
               [f"dicomflow up, {s['parallel']['sender']}: send start -> last response", s["parallel"]["seconds"],
                s["parallel"]["scp_rate"]],
               [f"dicomflow up, {s['parallel']['sender']}: send start -> all rows", s["parallel"]["send_to_visible_s"],
                s["parallel"]["rate"]]] if "parallel" in s else []),
        ]),
        f"stack: up {s['startup_s']:.1f} s, worker Ready + {WARM_INSTANCES} warm-up instances ingested "
        f"{s['warm_up_s']:.1f} s, last response -> all rows {s['last_response_to_visible_s']:.1f} s",
        f"ingest batches while receiving: {s['ingest_batches']}; SCP handler ms: {s['scp_handler_ms']}",
        "",
        table(["latency C-STORE rsp -> PG row", "inst", "inst/s", "p50 s", "p95 s", "min s", "max s",
               "C-STORE rtt p50 ms"], lat_rows),
        "",
        figures_table(r.figures),
        f"\nresults: {r.path}" if r.path else "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--latency-instances", type=int, default=500)
    parser.add_argument("--latency-rate", type=float, default=50.0, help="instances/s of the paced latency send")
    parser.add_argument("--latency-per-series", type=int, default=100)
    parser.add_argument("--sender", choices=["auto", "storescu", "pynetdicom"], default="auto")
    parser.add_argument("--associations", type=int, default=4,
                        help="also send the same number of instances over this many concurrent associations (1: skip)")
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    print(report(run_scp(instances=args.instances, latency_instances=args.latency_instances,
                         latency_rate=args.latency_rate, latency_per_series=args.latency_per_series,
                         sender=args.sender, associations=args.associations, workdir=args.workdir)))


if __name__ == "__main__":
    main()
