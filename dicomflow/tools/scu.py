"""The C-STORE SCU: send DICOM files and folders to an SCP (``dicomflow send``).

Files are scanned first (header only) so that exactly the presentation contexts
they need are proposed: one context per (SOP class, transfer syntax) pair, each
with that single syntax, so every file is sent in the encoding it is stored in
and the receiver can keep it as it came. More than 128 distinct pairs (the
protocol's limit per association) are spread over consecutive associations.

Nothing here raises for a bad file, a refused association or a failed C-STORE:
every outcome is counted in the returned :class:`SendSummary`, so a CLI can print
it and choose its exit code. A permanent association rejection (or an SCP that does
not answer) stops the whole send at once: every later association would meet the
same refusal, so the rest is counted as not sent and :attr:`SendSummary.stopped` names
the cause and what to change.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import MediaStorageDirectoryStorage
from pynetdicom import AE
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS
from tqdm import tqdm

from core.net import no_delay

__all__ = ["SendSummary", "iter_files", "send_paths", "keep_responses_for_the_sender"]

log = logging.getLogger(__name__)

#: The most presentation contexts one A-ASSOCIATE-RQ may propose (ids 1..255, odd).
MAX_CONTEXTS = 128


@dataclass
class SendSummary:
    """What happened to each file given to :func:`send_paths`."""

    #: Status 0x0000.
    succeeded: int = 0
    #: Warning statuses (0xB000, 0xB006, 0xB007): stored, but the SCP changed something.
    warnings: int = 0
    #: A failure status, no response, or not sent because the association failed.
    failed: int = 0
    #: Not sendable: not DICOM, no SOP class / transfer syntax, or a DICOMDIR.
    skipped: int = 0
    #: Count of each status code the SCP returned.
    statuses: Counter[int] = field(default_factory=Counter)
    #: (file, reason) for every failed or skipped file.
    failures: list[tuple[Path, str]] = field(default_factory=list)
    #: Failed files counted by a short reason (the rows of :meth:`table`).
    failed_by: Counter[str] = field(default_factory=Counter)
    #: Why the send stopped before the end (one line: the cause and the remedy), or None.
    stopped: str | None = None
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return self.succeeded + self.warnings + self.failed + self.skipped

    @property
    def ok(self) -> bool:
        """True when every sendable file was stored (skipped files do not count)."""
        return self.failed == 0

    def table(self) -> list[str]:
        """The outcome as a short table: succeeded, warnings, failed by reason, skipped."""
        rows = [("succeeded", self.succeeded), ("warnings", self.warnings), ("failed", self.failed)]
        rows += [(f"  {reason}", n) for reason, n in self.failed_by.most_common()]
        if self.skipped:
            rows.append(("skipped (not DICOM, no SOP class, DICOMDIR)", self.skipped))
        width = max(len(label) for label, _ in rows)
        return [f"  {label:<{width}}  {n:>7}" for label, n in rows]

    def line(self) -> str:
        """One summary line: counts, time and rate."""
        rate = (self.succeeded + self.warnings) / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"send: {self.total} files in {self.elapsed_s:.1f} s ({rate:.1f} stored/s): "
                f"{self.succeeded} succeeded, {self.warnings} warnings, {self.failed} failed, "
                f"{self.skipped} skipped")


@dataclass(frozen=True, slots=True)
class _Item:
    path: Path
    sop_class: str
    transfer_syntax: str


def iter_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """Every regular file named, or found below a named folder, in a stable order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def _scan(path: Path) -> _Item | str:
    """The file's SOP class and transfer syntax, or why it cannot be sent."""
    if not path.is_file():
        return "no such file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception as exc:  # pydicom raises many types on non-DICOM input
        return f"not DICOM: {type(exc).__name__}: {exc}"
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID") or "") if meta is not None else ""
    sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
    if not ts:
        return "no Transfer Syntax UID in the file meta information"
    if not sop_class:
        return "no SOP Class UID"
    if sop_class == MediaStorageDirectoryStorage:
        return "DICOMDIR (a media directory, not an instance)"
    return _Item(path, sop_class.strip(), ts.strip())


def _batches(items: list[_Item]) -> Iterator[tuple[list[tuple[str, str]], list[_Item]]]:
    """Group files so that each association proposes at most MAX_CONTEXTS contexts."""
    pairs = list(dict.fromkeys((i.sop_class, i.transfer_syntax) for i in items))
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chunk = pairs[start:start + MAX_CONTEXTS]
        wanted = set(chunk)
        yield chunk, [i for i in items if (i.sop_class, i.transfer_syntax) in wanted]


def _status_of(rsp: Dataset) -> int | None:
    status = rsp.get("Status") if rsp is not None else None
    return int(status) if status is not None else None


def send_paths(paths: Iterable[Path | str], host: str, port: int, called_aet: str,
               calling_aet: str = "DICOMFLOW_SCU", progress: bool = False, *,
               ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
               timeout_s: float = 30.0) -> SendSummary:
    """Send every DICOM file in ``paths`` (files or folders, recursively) by C-STORE.

    Parameters
    ----------
    paths
        Files and/or folders; folders are walked recursively.
    host, port, called_aet
        The SCP to send to.
    calling_aet
        Our AE title; the SCP may map it to a tenant or reject it.
    progress
        Show a tqdm progress bar on stderr.
    ssl_context
        Send over TLS (e.g. ``ssl.create_default_context(cafile=...)``).
    timeout_s
        ACSE, DIMSE and network timeout.

    Returns
    -------
    SendSummary
        Counts per outcome and the reason for every file not stored.
    """
    summary = SendSummary()
    items: list[_Item] = []
    for path in iter_files(paths):
        scanned = _scan(path)
        if isinstance(scanned, str):
            summary.skipped += 1
            summary.failures.append((path, scanned))
            log.info("skipped path=%s reason=%s", path, scanned)
        else:
            items.append(scanned)
    started = time.monotonic()
    # tqdm's bar shows the rate and the time left (ETA) as it goes.
    with tqdm(total=len(items), disable=not progress, unit="file", desc=f"C-STORE {called_aet}") as bar:
        batches = list(_batches(items))
        for n, (contexts, batch) in enumerate(batches):
            refusal = _send_batch(batch, contexts, host, port, called_aet, calling_aet, ssl_context,
                                  server_hostname, timeout_s, summary, bar)
            if refusal is not None and refusal.stop is not None:
                summary.stopped = refusal.stop
                rest = [item for _, later in batches[n + 1:] for item in later]
                for item in rest:
                    _fail(summary, item, f"not sent: {refusal.reason}", refusal.short)
                bar.update(len(rest))
                break
    summary.elapsed_s = time.monotonic() - started
    log.info("send finished host=%s port=%s called_aet=%s succeeded=%d warnings=%d failed=%d skipped=%d",
             host, port, called_aet, summary.succeeded, summary.warnings, summary.failed, summary.skipped)
    return summary


def _fail(summary: SendSummary, item: _Item, reason: str, short: str | None = None) -> None:
    summary.failed += 1
    summary.failures.append((item.path, reason))
    summary.failed_by[short or reason] += 1
    # INFO, not WARNING: the summary table reports failures by reason; a line per file would
    # bury it (a CLI with no logging set up prints warnings to stderr).
    log.info("store failed path=%s reason=%s", item.path, reason)


def _status_name(status: int) -> str:
    name = (STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status) or ("", ""))[1]
    return f"status 0x{status:04X}" + (f" ({name})" if name else "")


#: What to change for a rejection, by (result source, diagnostic) of the A-ASSOCIATE-RJ.
_REMEDIES = {
    (1, 3): ("calling AE title {calling!r} not recognised",
             "on the SCP set DICOMFLOW_TENANT_BY_CALLING_AE={calling}=<tenant> (or DICOMFLOW_DEFAULT_TENANT="
             "<tenant> for every unmapped caller), or send with --calling-aet set to a mapped AE title"),
    (1, 7): ("called AE title {called!r} not recognised",
             "send with --aet set to the SCP's AE title (its DICOMFLOW_SCP_AET)"),
    (1, 2): ("application context not supported", "the SCP is not a DICOM storage SCP"),
}


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why an association was not established."""

    #: The full reason, kept per file.
    reason: str
    #: The short reason, a row of the summary table.
    short: str
    #: The one line (cause and remedy) that stops the whole send; None: later associations may work.
    stop: str | None = None


def _refusal(assoc: Any, called_aet: str, calling_aet: str, host: str, port: int) -> _Refusal:
    where = f"{called_aet}@{host}:{port}"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        if rj is None:
            return _Refusal(f"association rejected by {where}", "association rejected")
        reason = (f"association rejected by {where} (result={rj.result_str}, source={rj.source_str}, "
                  f"reason={rj.reason_str})")
        if rj.result != 0x01:  # transient: another association may be accepted
            return _Refusal(reason, f"association rejected (transient): {rj.reason_str}")
        cause, remedy = _REMEDIES.get((rj.result_source, rj.diagnostic),
                                      (str(rj.reason_str), "see the SCP's log for why"))
        cause, remedy = (cause.format(calling=calling_aet, called=called_aet),
                         remedy.format(calling=calling_aet, called=called_aet))
        return _Refusal(reason, cause, f"association rejected permanently by {where}: {cause}. Remedy: {remedy}.")
    if assoc.is_aborted:
        return _Refusal(f"association aborted by {where}", "association aborted")
    return _Refusal(f"cannot associate with {where}", "no association (refused, TLS failed, or no answer)",
                    f"no DICOM association with {where}: the connection was refused, the TLS handshake failed, or "
                    "nothing answered. Remedy: start the SCP (`dicomflow up` or `dicomflow scp`) or give its address "
                    "with --host/--port (DICOMFLOW_SCP_PORT); with TLS, trust its certificate with --tls-ca and "
                    "--tls-server-name.")


def keep_responses_for_the_sender(assoc: Any) -> None:
    """Close pynetdicom 3.0's requestor race: its association reactor may take a C-STORE response
    off the DIMSE queue meant for ``send_c_store``, which then waits out its timeout and aborts.

    ``send_c_store`` pauses the reactor by clearing an event and waiting for ``_is_paused``; the
    reactor sets ``_is_paused`` just before waiting on that event, so it can pass the event,
    still reported paused, and poll the queue while the response arrives. Measured: with 4
    associations from one process, one was lost in a few thousand C-STOREs; sooner the faster
    the SCP answers. A storage SCU serves no request of its own on the association, so the
    reactor's non-blocking poll is simply given nothing; the sender's blocking read gets it all.
    """
    get_msg = assoc.dimse.get_msg

    def sender_only(block: bool = False) -> Any:
        return get_msg(block=True) if block else (None, None)

    assoc.dimse.get_msg = sender_only


def _send_batch(batch: list[_Item], contexts: list[tuple[str, str]], host: str, port: int,
                called_aet: str, calling_aet: str, ssl_context: ssl.SSLContext | None,
                server_hostname: str | None, timeout_s: float, summary: SendSummary,
                bar: tqdm[None]) -> _Refusal | None:
    """Send one batch over one association; returns the refusal if it was not established."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    tls_args = (ssl_context, server_hostname or host) if ssl_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args)
    no_delay(assoc)
    keep_responses_for_the_sender(assoc)
    if not assoc.is_established:
        refusal = _refusal(assoc, called_aet, calling_aet, host, port)
        for item in batch:
            _fail(summary, item, refusal.reason, refusal.short)
        bar.update(len(batch))
        return refusal
    try:
        for item in batch:
            try:
                if not assoc.is_established:
                    raise RuntimeError("association lost")
                rsp = assoc.send_c_store(_read(item.path))
            except Exception as exc:  # a file pydicom cannot re-read, or a dropped association
                _fail(summary, item, f"{type(exc).__name__}: {exc}", f"error: {type(exc).__name__}")
                bar.update(1)
                continue
            status = _status_of(rsp)
            if status is None:
                _fail(summary, item, "no C-STORE response (timeout or aborted association)")
            else:
                summary.statuses[status] += 1
                if status == 0x0000:
                    summary.succeeded += 1
                elif status in (0xB000, 0xB006, 0xB007):
                    summary.warnings += 1
                else:
                    _fail(summary, item, f"status 0x{status:04X}", _status_name(status))
            bar.update(1)
    finally:
        if assoc.is_established:
            assoc.release()
    return None


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)
