"""What one instance costs the whole stack: CPU per process and per stage, broker requests, and the peer.

One run, same files, same sender (dcmtk ``storescu``, TCP_NODELAY=1, one association):

1. **Peer**: Orthanc + its PostgreSQL index (``bench.peer_orthanc``), if installed; else the
   last measured figure is stated.
2. **dicomflow**: ``dicomflow up`` (journal + relay, embedded PostgreSQL, one worker, the SCP)
   with the Doris sink on and pointed at the Stream Load emulator (in this process, default
   batching), warmed up with one small series until it is in PostgreSQL and Doris. Then N
   instances: rate = N / (sender start -> every row visible in PostgreSQL *and* in the three
   Doris tables). CPU-seconds per process, read from /proc (utime+stime, children included:
   the worker's parse pool, PostgreSQL's backends) before the send and once every row is
   visible: SCP, worker, relay, ``up`` itself, Tansu, PostgreSQL. The sender, the emulator
   (Doris) and the measuring tools are not part of the stack's cost and are reported apart.
   The same counters over an idle interval before the send give the background rate.
3. **Broker traffic**, counted at the broker's door: Tansu advertises a counting proxy
   (``bench.broker_proxy``, its own process), which parses every request's API key and
   client id and every Produce request's record count. Records per topic come from the
   broker's end offsets (ListOffsets, answered by Tansu). ``--no-proxy`` connects directly.
4. **Profile** (``--profile``): py-spy attached to the worker during the send (its parse
   pool included), twice: raw stacks (shares per stage, times the worker's measured CPU)
   and a flame graph SVG in ``bench/out/``.

    python -m bench.cost [--instances 5000] [--no-peer] [--no-proxy] [--profile] [--no-doris]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.clones import build_fast
from bench.common import OUT_DIR, Figure, figures_table, table, write_result
from bench.doris import DB, PASSWORD, USER, BenchEmulator
from bench.peer_orthanc import LAST_MEASURED, postmaster_pid, run_peer
from bench.procstat import descendants, tree_cpu_seconds
from bench.profiling import PySpy, find_py_spy, summarize_py_spy
from bench.scp import AET, PER_SERIES, Study
from bench.senders import send_files
from bench.stack import UpStack, series_rows
from dicomflow.embedded.broker import tansu_binary
from dicomflow.embedded.ports import free_port, wait_for_port
from tests.harness import REPO

__all__ = ["CostResult", "run_cost", "main"]

TENANT = "bench-cost"
WARM = 20
TARGET_CPU_MS = 8.0
TARGET_PEER_RATIO = 2.0
IDLE_S = 5.0
FLAME_GRAPH = OUT_DIR / "worker-flamegraph.svg"
ROLES = ("scp", "worker-0", "relay", "up", "tansu", "postgres")


@dataclass
class CostResult:
    params: dict[str, Any]
    peer: dict[str, Any] | None
    stack: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    path: Path | None = None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stack_pids(stack: UpStack, tansu: int) -> dict[str, int]:
    """The stack's processes by role; each child of ``up`` is counted as its own tree."""
    assert stack.proc is not None
    pids: dict[str, int] = {"up": stack.proc.pid, "tansu": tansu}
    for pid in descendants(stack.proc.pid):
        cmd = _cmdline(pid)
        for role, marker in (("worker-0", "dicomflow.cli worker"), ("relay", "dicomflow.cli relay"),
                             ("scp", "dicomflow.cli scp")):
            if marker in cmd:
                pids[role] = pid
    pg = postmaster_pid(stack.home / "postgres" / "pgdata")
    if pg is not None:
        pids["postgres"] = pg
    return pids


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for role, pid in pids.items():
        # ``up``'s children are roles of their own: count up alone.
        value = tree_cpu_seconds(pid) if role != "up" else _self_cpu(pid)
        out[role] = value or 0.0
    return out


def _self_cpu(pid: int) -> float | None:
    from bench.procstat import cpu_seconds

    return cpu_seconds(pid)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class _Broker:
    """Tansu on a free port; with ``proxy``, it advertises a counting proxy in front of it."""

    def __init__(self, work: Path, proxy: bool) -> None:
        self.work = work
        self.port = free_port()
        self.proxy_port = free_port() if proxy else None
        self.counts_path = work / "broker-counts.json"
        self.tansu: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.proxy_port or self.port}"

    def start(self) -> _Broker:
        advertised = f"tcp://127.0.0.1:{self.proxy_port or self.port}"
        with open(self.work / "tansu.log", "wb") as log:
            self.tansu = subprocess.Popen([tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
                                           "--advertised-listener-url", advertised, "--storage-engine",
                                           "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "RUST_LOG": "warn"}, start_new_session=True)
        if not wait_for_port("127.0.0.1", self.port, 20):
            raise RuntimeError("Tansu did not listen")
        if self.proxy_port is not None:
            self.proxy = subprocess.Popen([sys.executable, "-m", "bench.broker_proxy", "--listen", str(self.proxy_port),
                                           "--upstream", f"127.0.0.1:{self.port}", "--out", str(self.counts_path)],
                                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                          start_new_session=True)
            if not wait_for_port("127.0.0.1", self.proxy_port, 20):
                raise RuntimeError("broker proxy did not listen")
        return self

    def counts(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = orjson.loads(self.counts_path.read_bytes())
            return data
        except (OSError, orjson.JSONDecodeError):
            return {}

    def stop(self) -> None:
        for proc in (self.proxy, self.tansu):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def _topic_offsets(bootstrap: str) -> dict[str, int]:
    """Records per topic (sum of end offsets over partitions), as the broker answers ListOffsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        topics = await consumer.topics()
        tps = [TopicPartition(t, p) for t in sorted(topics) for p in sorted(consumer.partitions_for_topic(t) or [])]
        ends = await consumer.end_offsets(tps)
        out: dict[str, int] = {}
        for tp, end in ends.items():
            out[tp.topic] = out.get(tp.topic, 0) + end
        return out
    finally:
        await consumer.stop()


def _doris_loaded(emu: BenchEmulator) -> dict[str, int]:
    loaded: dict[str, int] = {}
    for rec in emu.loads:
        if rec.status == "Success":
            loaded[rec.table] = loaded.get(rec.table, 0) + rec.loaded
    return loaded


def _doris_state_complete(emu: BenchEmulator, study: Study) -> bool:
    counts = {r["series_uid"]: int(r["series_related_instances"] or 0) for r in emu.rows("dicom_state_meta")
              if r.get("study_uid") == study.study_uid}
    return sorted(counts.values()) == sorted(study.per_series)


async def _until(what: str, probe: Any, timeout: float, interval: float = 0.2) -> float:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"deadline ({timeout:.0f}s): {what}")
        await asyncio.sleep(interval)
    return time.monotonic()


async def _visible(stack: UpStack, emu: BenchEmulator | None, study: Study, before: int, timeout: float
                   ) -> tuple[float, float | None]:
    """(time every PostgreSQL row is visible, time every Doris row is too)."""
    import asyncpg

    conn = await asyncpg.connect(stack.dsn)
    t_pg: float | None = None
    t_doris: float | None = None
    n = sum(study.per_series)
    try:
        async def done() -> bool:
            nonlocal t_pg, t_doris
            if t_pg is None:
                rows = await series_rows(conn, study.study_uid)
                if len(rows) == len(study.series_uids) and sum(rows.values()) == n:
                    t_pg = time.monotonic()
            if emu is not None and t_doris is None:
                loaded = _doris_loaded(emu)
                if (loaded.get("dicom_object_meta", 0) >= before + n and loaded.get("dicom_image_meta", 0) >= before + n
                        and _doris_state_complete(emu, study)):
                    t_doris = time.monotonic()
            return t_pg is not None and (emu is None or t_doris is not None)

        await _until(f"{n} instances visible in PostgreSQL{' and Doris' if emu else ''}", done, timeout)
    finally:
        await conn.close()
    assert t_pg is not None
    return t_pg, t_doris


def _per_instance(delta: dict[str, float], n: int) -> dict[str, float]:
    return {k: 1000 * v / n for k, v in delta.items()}


async def _measure(stack: UpStack, broker: _Broker, emu: BenchEmulator | None, warm: Study, tput: Study,
                   profile: bool, sender: str, target: str = "worker-0") -> dict[str, Any]:
    info: dict[str, Any] = {"startup_s": stack.startup_s}
    t0 = time.monotonic()
    send = await asyncio.to_thread(send_files, warm.files, "127.0.0.1", stack.scp_port, AET, sender=sender)
    if not send.ok:
        raise RuntimeError(f"warm-up send failed: {send.detail}")
    await _visible(stack, emu, warm, 0, 180)
    info["warm_up_s"] = time.monotonic() - t0
    assert broker.tansu is not None
    pids = _stack_pids(stack, broker.tansu.pid)
    missing = [r for r in ROLES if r not in pids]
    if missing:
        raise RuntimeError(f"processes not found: {missing} (found {pids})")
    await asyncio.sleep(2.0)  # let the warm-up's last flushes and commits settle
    # Background: the same counters over an idle interval.
    idle0, idle_counts0, t_idle = _cpu(pids), broker.counts(), time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle1, idle_counts1 = _cpu(pids), broker.counts()
    idle_s = time.monotonic() - t_idle
    info["idle"] = {"seconds": idle_s, "cpu_s_per_s": {k: (idle1[k] - idle0[k]) / idle_s for k in pids},
                    "requests_per_s": _diff_requests(idle_counts0, idle_counts1, idle_s)}

    offsets0 = await _topic_offsets(broker.url.removeprefix("kafka://"))
    counts0, cpu0, own0, load0 = broker.counts(), _cpu(pids), _own_cpu(), os.getloadavg()
    tools0 = {"proxy": tree_cpu_seconds(broker.proxy.pid) if broker.proxy else None}
    spies: list[PySpy] = []
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if profile:
        exe = find_py_spy()
        if exe is None:
            raise RuntimeError("py-spy not found: pip install -e '.[bench]'")
        raw = PySpy(exe, pids[target], OUT_DIR / f"cost-{target}-{stamp}.txt", rate=100)
        raw.cmd.append("--subprocesses")
        svg = PySpy(exe, pids[target], OUT_DIR / f"cost-{target}-{stamp}.svg", rate=100)
        svg.cmd = [c if c != "raw" else "flamegraph" for c in svg.cmd] + ["--subprocesses"]
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        spies = [raw, svg]
        for spy in spies:
            spy.start()
    n = len(tput.files)
    before = sum(warm.per_series)
    timing = await asyncio.to_thread(send_files, tput.files, "127.0.0.1", stack.scp_port, AET, sender=sender)
    if not timing.ok:
        raise RuntimeError(f"send to the stack failed: {timing.detail}")
    t_pg, t_doris = await _visible(stack, emu, tput, before, 300 + n / 10)
    cpu1, own1, counts1, load1 = _cpu(pids), _own_cpu(), broker.counts(), os.getloadavg()
    tools1 = {"proxy": tree_cpu_seconds(broker.proxy.pid) if broker.proxy else None}
    offsets1 = await _topic_offsets(broker.url.removeprefix("kafka://"))
    for spy in spies:
        spy.stop()
    t_all = max(t_pg, t_doris or t_pg)
    cpu = {k: cpu1[k] - cpu0[k] for k in pids}
    total = sum(cpu.values())
    info.update({
        "instances": n, "sender": timing.sender, "receive_s": timing.seconds, "receive_rate": n / timing.seconds,
        "to_pg_s": t_pg - timing.started, "pg_rate": n / (t_pg - timing.started),
        "to_doris_s": (t_doris - timing.started) if t_doris else None,
        "to_all_s": t_all - timing.started, "rate": n / (t_all - timing.started),
        "loadavg": [load0, load1], "pids": pids,
        "cpu_s": cpu, "cpu_ms_per_instance": _per_instance(cpu, n), "cpu_ms_per_instance_total": 1000 * total / n,
        "cores_busy": {k: v / (t_all - timing.started) for k, v in cpu.items()},
        "outside_stack_cpu_s": {"bench process (Doris emulator, polling)": own1 - own0,
                                **{k: (tools1[k] or 0) - (tools0[k] or 0) for k in tools0 if tools0[k] is not None}},
        "topic_records_per_instance": {t: (offsets1.get(t, 0) - offsets0.get(t, 0)) / n
                                       for t in sorted(set(offsets1) | set(offsets0))
                                       if offsets1.get(t, 0) != offsets0.get(t, 0)},
    })
    info["topic_records_per_instance_total"] = sum(info["topic_records_per_instance"].values())
    if counts1:
        info["broker"] = _broker_delta(counts0, counts1, n)
    if spies:
        prof = summarize_py_spy(spies[0].out, main_pid=pids[target])
        worker_cpu = cpu[target]
        svg_path = spies[1].out
        if target == "worker-0":  # the one profile output that is committed (.gitignore): the worker's
            shutil.copyfile(spies[1].out, FLAME_GRAPH)
            svg_path = FLAME_GRAPH
        info["profile"] = {**prof.as_dict(), "target": target, "svg": str(svg_path),
                           "stage_ms_per_instance": {s: 1000 * share * worker_cpu / n for s, share in prof.by_stage}}
    return info


def _diff_requests(c0: dict[str, Any], c1: dict[str, Any], per: float) -> dict[str, float]:
    a, b = c0.get("requests_by_api", {}), c1.get("requests_by_api", {})
    return {k: (b.get(k, 0) - a.get(k, 0)) / per for k in sorted(set(a) | set(b)) if b.get(k, 0) != a.get(k, 0)}


def _broker_delta(c0: dict[str, Any], c1: dict[str, Any], n: int) -> dict[str, Any]:
    by_client: dict[str, dict[str, float]] = {}
    old = {(r["client"], r["api"]): r["count"] for r in c0.get("requests", [])}
    for r in c1.get("requests", []):
        d = r["count"] - old.get((r["client"], r["api"]), 0)
        if d:
            by_client.setdefault(r["client"] or "-", {})[r["api"]] = d / n
    rec0, rec1 = c0.get("produce_records_by_client", {}), c1.get("produce_records_by_client", {})
    return {"requests_per_instance": _diff_requests(c0, c1, n),
            "requests_per_instance_by_client": by_client,
            "produce_records_per_instance": (c1.get("produce_records", 0) - c0.get("produce_records", 0)) / n,
            "produce_records_per_instance_by_client": {k: (v - rec0.get(k, 0)) / n for k, v in rec1.items()
                                                       if v != rec0.get(k, 0)},
            "unparsed_produce_requests": c1.get("unparsed_produce_requests", 0)}


def _pynetdicom_floor(files: list[Path], work: Path, sender: str) -> dict[str, Any]:
    """CPU per instance of ``bench.minimal_scp --durable`` (pynetdicom, temp file, fsync, rename, directory
    fsync): what any pynetdicom SCP that keeps the durability rule costs before its own work."""
    port = free_port()
    rx = work / "rx-floor"
    rx.mkdir(parents=True, exist_ok=True)
    with open(work / "minimal_scp.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.minimal_scp", "--port", str(port), "--dir", str(rx),
                                 "--aet", AET, "--durable"], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        if not wait_for_port("127.0.0.1", port, 60):
            raise RuntimeError("minimal SCP did not listen")
        cpu0 = tree_cpu_seconds(proc.pid) or 0.0
        timing = send_files(files, "127.0.0.1", port, AET, sender=sender)
        cpu1 = tree_cpu_seconds(proc.pid) or 0.0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
    if not timing.ok:
        raise RuntimeError(f"send to the minimal SCP failed: {timing.detail}")
    n = len(files)
    return {"instances": n, "rate": n / timing.seconds, "cpu_s": cpu1 - cpu0,
            "cpu_ms_per_instance": 1000 * (cpu1 - cpu0) / n}


def run_cost(*, instances: int = 5000, peer: bool = True, proxy: bool = True, profile: bool = False,
             doris: bool = True, sender: str = "storescu", extra_env: dict[str, str] | None = None,
             profile_target: str = "worker-0", workdir: Path | None = None) -> CostResult:
    own = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="dicomflow-bench-cost-"))
    try:
        print(f"cost: building {instances} + {WARM} instances ...", flush=True)
        tput = Study.of(build_fast(work / "send" / "tput", instances=instances,
                                   series=max(1, instances // PER_SERIES)))
        warm = Study.of(build_fast(work / "send" / "warm", instances=WARM, series=1))
        peer_result = None
        if peer:
            print("cost: peer, Orthanc + PostgreSQL ...", flush=True)
            peer_result = run_peer(tput.files, work / "orthanc", sender=sender)
            if peer_result is None:
                print(f"cost: Orthanc not installed; last measured: {LAST_MEASURED}", flush=True)
        print("cost: pynetdicom floor (bench.minimal_scp --durable) ...", flush=True)
        floor = _pynetdicom_floor(tput.files, work, sender)
        print(f"cost: dicomflow up{' + Doris emulator' if doris else ''}"
              f"{', broker proxy' if proxy else ''}{', py-spy' if profile else ''} ...", flush=True)
        stack_info = asyncio.run(_stack_run(work, tput, warm, proxy=proxy, profile=profile, doris=doris,
                                            sender=sender, extra_env=extra_env or {}, target=profile_target))
        stack_info["pynetdicom_floor"] = floor
        params = {"instances": instances, "series": len(tput.series_uids), "per_series": PER_SERIES,
                  "doris": doris, "proxy": proxy, "profile": profile, "sender": sender, "extra_env": extra_env or {}}
        result = CostResult(params, peer_result, stack_info)
        result.figures = _figures(result)
        result.path = write_result("cost", {"params": params, "peer": peer_result,
                                            "peer_last_measured": LAST_MEASURED, "stack": stack_info,
                                            "figures": [f.as_dict() for f in result.figures]})
        return result
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


async def _stack_run(work: Path, tput: Study, warm: Study, *, proxy: bool, profile: bool, doris: bool,
                     sender: str, extra_env: dict[str, str], target: str = "worker-0") -> dict[str, Any]:
    broker = _Broker(work, proxy).start()
    emu: BenchEmulator | None = None
    try:
        env = {"DICOMFLOW_BROKER": broker.url, "DICOMFLOW_BROKER_PROFILE": "tansu", "DICOMFLOW_JOURNAL": "1",
               **extra_env}
        if doris:
            emu = BenchEmulator(user=USER, password=PASSWORD, databases=(DB,))
            await emu.start()
            env.update({"DICOMFLOW_DORIS_FE_URL": emu.fe_url, "DICOMFLOW_DORIS_USER": USER,
                        "DICOMFLOW_DORIS_PASSWORD": PASSWORD, "DICOMFLOW_DORIS_DATABASE": DB})
        stack = UpStack(work / "home", TENANT, extra_env=env)
        await asyncio.to_thread(stack.start)
        try:
            return await _measure(stack, broker, emu, warm, tput, profile, sender, target)
        except BaseException:
            for name in ("worker-0", "relay", "scp"):
                print(f"--- {name} log tail:\n{stack.log_tail(15, name)}")
            raise
        finally:
            await asyncio.to_thread(stack.stop)
    finally:
        if emu is not None:
            await emu.stop()
        broker.stop()


def _figures(r: CostResult) -> list[Figure]:
    s = r.stack
    peer_rate = r.peer["rate"] if r.peer else LAST_MEASURED["rate"]
    peer_name = (f"{r.peer['system']}, same run" if r.peer else
                 f"{LAST_MEASURED['system']}, last measured {LAST_MEASURED['date']}")
    figures = [
        Figure("whole-stack CPU per instance (SCP, worker, relay, up, Tansu, PostgreSQL)",
               s["cpu_ms_per_instance_total"], "ms", r.peer["cpu_ms_per_instance_total"] if r.peer else None,
               "peer CPU ms/instance (Orthanc + PostgreSQL)", f"<= {TARGET_CPU_MS:g}",
               s["cpu_ms_per_instance_total"] <= TARGET_CPU_MS),
        Figure("storescu -> every row in PostgreSQL" + (" and Doris" if r.params["doris"] else ""), s["rate"],
               "inst/s", peer_rate, peer_name, f">= {TARGET_PEER_RATIO:g}x",
               s["rate"] >= TARGET_PEER_RATIO * peer_rate),
        Figure("storescu -> every row in PostgreSQL", s["pg_rate"], "inst/s", peer_rate, peer_name),
        Figure("C-STORE receive (last response)", s["receive_rate"], "inst/s",
               r.peer["receive_rate"] if r.peer else None, "peer receive"),
    ]
    if "broker" in s:
        figures.append(Figure("produce requests per instance (at the broker)",
                              s["broker"]["requests_per_instance"].get("Produce", 0.0), "req"))
        figures.append(Figure("fetch requests per instance (at the broker)",
                              s["broker"]["requests_per_instance"].get("Fetch", 0.0), "req"))
    return figures


def report(r: CostResult) -> str:
    s = r.stack
    n = s["instances"]
    rows = [[role, s["cpu_s"][role], s["cpu_ms_per_instance"][role], s["cores_busy"][role],
             s["idle"]["cpu_s_per_s"].get(role, 0.0)] for role in s["cpu_s"]]
    rows.append(["whole stack", sum(s["cpu_s"].values()), s["cpu_ms_per_instance_total"],
                 sum(s["cores_busy"].values()), sum(s["idle"]["cpu_s_per_s"].values())])
    if r.peer:
        for k, v in r.peer["cpu_s"].items():
            rows.append([f"peer: {k}", v, r.peer["cpu_ms_per_instance"][k], None, None])
    floor = s.get("pynetdicom_floor")
    if floor:
        rows.append(["minimal durable pynetdicom SCP", floor["cpu_s"], floor["cpu_ms_per_instance"], None, None])
    lines = [f"cost: {n} instances, {s['sender']}, load average {s['loadavg'][0][0]:.2f} -> {s['loadavg'][1][0]:.2f}",
             table(["process", "cpu s", "ms/instance", "cores busy", "idle cpu s/s"], rows),
             f"outside the stack: {s['outside_stack_cpu_s']}", ""]
    if "profile" in s:
        lines.append(table(["worker stage (py-spy share x worker CPU)", "ms/instance"],
                           [[k, v] for k, v in s["profile"]["stage_ms_per_instance"].items()]))
        lines.append(f"flame graph: {s['profile']['svg']}")
        lines.append("")
    lines.append(table(["topic", "records/instance"], [[k, v] for k, v in s["topic_records_per_instance"].items()]
                       + [["all topics", s["topic_records_per_instance_total"]]]))
    if "broker" in s:
        b = s["broker"]
        lines += ["", table(["request (at the broker)", "per instance"],
                            [[k, v] for k, v in sorted(b["requests_per_instance"].items(), key=lambda kv: -kv[1])]
                            + [["produce records", b["produce_records_per_instance"]]]),
                  f"by client: {b['requests_per_instance_by_client']}",
                  f"produce records by client: {b['produce_records_per_instance_by_client']}"]
    lines += ["", figures_table(r.figures), f"\nresults: {r.path}" if r.path else ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--no-peer", action="store_true", help="skip Orthanc (state its last measured figure)")
    parser.add_argument("--no-proxy", action="store_true", help="no request counting (clients talk to Tansu)")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker: stage shares and a flame graph")
    parser.add_argument("--profile-target", choices=["worker-0", "scp", "relay"], default="worker-0")
    parser.add_argument("--no-doris", action="store_true")
    parser.add_argument("--sender", choices=["storescu", "pynetdicom"], default="storescu")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for dicomflow up (e.g. DICOMFLOW_INGEST_PROCESSES=0)")
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    extra = dict(e.split("=", 1) for e in args.env)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(report(run_cost(instances=args.instances, peer=not args.no_peer, proxy=not args.no_proxy,
                          profile=args.profile, doris=not args.no_doris, sender=args.sender, extra_env=extra,
                          profile_target=args.profile_target, workdir=args.workdir)))


if __name__ == "__main__":
    main()
