"""C-STORE senders for the SCP benchmarks: dcmtk ``storescu`` (else dicomflow's SCU), and a paced sender.

dcmtk is recognised by ``storescu --version`` (pynetdicom installs a ``storescu`` of its
own). It runs with ``TCP_NODELAY=1``: Debian's dcmtk otherwise stalls ~88 ms per instance
(Nagle against the peer's delayed ACK). pynetdicom never sets TCP_NODELAY either: its SCU
(and so ``dicomflow send``) waits ~50 ms per C-STORE on loopback, ~18 instances/s even
against a minimal SCP; the paced sender here sets it on its socket (~7 ms per C-STORE).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicomflow.tools.scu import keep_responses_for_the_sender, send_paths

__all__ = ["SendTiming", "PacedSend", "find_dcmtk_storescu", "send_files", "send_parallel", "send_paced"]

CALLING_AET = "BENCHSCU"


@dataclass(frozen=True)
class SendTiming:
    """One bulk send: which sender, CLOCK_MONOTONIC start and end (end = last C-STORE response)."""

    sender: str
    started: float
    ended: float
    instances: int
    ok: bool
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class PacedSend:
    """A paced send: per instance, the time its request went out and its response came back."""

    requested: list[float]
    responded: list[float]
    statuses: list[int]


def find_dcmtk_storescu() -> str | None:
    """dcmtk's storescu on PATH (or /usr/bin), recognised by its ``--version`` output."""
    folders = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for folder in dict.fromkeys(f for f in folders if f):
        candidate = shutil.which("storescu", path=folder)
        if candidate is None:
            continue
        try:
            proc = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (proc.stdout + proc.stderr).lower()
        if "dcmtk" in text or "offis" in text:
            return candidate
    return None


def send_files(files: Sequence[Path], host: str, port: int, aet: str, *, sender: str = "auto",
               timeout: float = 900.0) -> SendTiming:
    """Send ``files`` over one association with storescu (``sender="storescu"``) or dicomflow's SCU."""
    storescu = find_dcmtk_storescu() if sender in ("auto", "storescu") else None
    if sender == "storescu" and storescu is None:
        raise RuntimeError("dcmtk storescu not found")
    started = time.monotonic()
    if storescu is not None:
        proc = subprocess.run([storescu, "-aet", CALLING_AET, "-aec", aet, host, str(port), *map(str, files)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, "TCP_NODELAY": "1"})
        ended = time.monotonic()
        return SendTiming("dcmtk storescu", started, ended, len(files), proc.returncode == 0,
                          (proc.stderr or proc.stdout)[-500:])
    print("senders: dcmtk storescu not found; dicomflow send (pynetdicom, no TCP_NODELAY) bounds both rates",
          flush=True)
    summary = send_paths(files, host, port, aet, calling_aet=CALLING_AET)
    ended = time.monotonic()
    return SendTiming("dicomflow send (pynetdicom)", started, ended, len(files), summary.ok and
                      summary.succeeded == len(files), str(summary.failures[:3]))


def send_parallel(files: Sequence[Path], host: str, port: int, aet: str, *, associations: int,
                  sender: str = "auto", timeout: float = 900.0) -> SendTiming:
    """Send ``files`` over ``associations`` concurrent associations, each a contiguous slice (whole series
    stay together, as a router sending several series at once does). Timed from the first start to the
    last sender's end."""
    if associations <= 1:
        return send_files(files, host, port, aet, sender=sender, timeout=timeout)
    step = -(-len(files) // associations)
    slices = [list(files[i:i + step]) for i in range(0, len(files), step)]
    storescu = find_dcmtk_storescu() if sender in ("auto", "storescu") else None
    if sender == "storescu" and storescu is None:
        raise RuntimeError("dcmtk storescu not found")
    started = time.monotonic()
    if storescu is not None:
        procs = [subprocess.Popen([storescu, "-aet", CALLING_AET, "-aec", aet, host, str(port), *map(str, part)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "TCP_NODELAY": "1"}) for part in slices]
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        ended = time.monotonic()
        ok = all(p.returncode == 0 for p in procs)
        return SendTiming(f"dcmtk storescu x{len(slices)}", started, ended, len(files), ok,
                          "" if ok else "\n".join(o[-300:] for o in outputs))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(slices)) as pool:
        summaries = list(pool.map(lambda part: send_paths(part, host, port, aet, calling_aet=CALLING_AET), slices))
    ended = time.monotonic()
    ok = all(s.ok and s.succeeded == len(part) for s, part in zip(summaries, slices, strict=True))
    return SendTiming(f"dicomflow send (pynetdicom) x{len(slices)}", started, ended, len(files), ok,
                      "" if ok else str([f for s in summaries for f in s.failures][:3]))


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def send_paced(files: Sequence[Path], host: str, port: int, aet: str, *, rate: float,
               timeout: float = 30.0) -> PacedSend:
    """C-STORE ``files`` in order over one association (TCP_NODELAY), starting one every ``1/rate`` s (or when
    the last answer came, if later). Files are read before the first request, so reading never delays one."""
    datasets = [_read(f) for f in files]
    ae = AE(ae_title=CALLING_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for pair in dict.fromkeys((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets):
        ae.add_requested_context(*pair)
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        raise RuntimeError(f"cannot associate with {aet}@{host}:{port}")
    keep_responses_for_the_sender(assoc)
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    requested: list[float] = []
    responded: list[float] = []
    statuses: list[int] = []
    try:
        start = time.monotonic()
        for k, ds in enumerate(datasets):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            requested.append(time.monotonic())
            rsp = assoc.send_c_store(ds)
            responded.append(time.monotonic())
            status = rsp.get("Status") if rsp is not None else None
            statuses.append(int(status) if status is not None else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return PacedSend(requested, responded, statuses)
